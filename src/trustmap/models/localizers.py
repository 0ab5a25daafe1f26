"""Localization networks: the "high baseline" of the trust protocol (Arun et al. 2021).

Arun et al. 2021 compare saliency maps with networks trained to localize
directly: a U-Net for the pneumothorax masks and a RetinaNet for the pneumonia boxes. Here
:class:`SegmentationLocalizer` wraps MONAI's U-Net and :class:`BoxLocalizer` is a small
anchor-free detector in the style of CenterNet (Zhou et al. 2019, Objects as points), written
without torchvision.

Both are plain ``nn.Module`` s whose ``forward`` returns one dense tensor, and both provide

- ``target_kind``: ``"mask"`` or ``"boxes"``, the ground truth ``loss`` learns from;
- ``loss(output, masks, boxes)``: a scalar training loss;
- ``localization_map(output, spatial)``: ``(B, 1, *spatial)`` per-pixel lesion scores in
  ``[0, 1]``, the map scored (AUPRC) like a saliency map.

:class:`BoxLocalizer` also has ``predict_boxes(output)``.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.batching import upsample_to

__all__ = ["BoxLocalizer", "Localizer", "SegmentationLocalizer", "is_localizer", "nms"]

Box = tuple[float, float, float, float]
ScoredBox = tuple[float, float, float, float, float]


@runtime_checkable
class Localizer(Protocol):
    """What the training loop and the trust protocol need from a localizer."""

    target_kind: str

    def loss(
        self,
        output: torch.Tensor,
        masks: torch.Tensor | None,
        boxes: Sequence[Sequence[Box]] | None,
    ) -> torch.Tensor: ...

    def localization_map(self, output: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor: ...


def is_localizer(model: object) -> bool:
    """True if ``model`` provides the localizer interface (``target_kind``, ``loss``,
    ``localization_map``)."""
    return isinstance(model, nn.Module) and isinstance(model, Localizer)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the spatial axes at their far end up to a multiple of ``multiple``."""
    pads: list[int] = []
    # F.pad lists (before, after) pairs from the last axis backwards.
    for size in reversed(x.shape[2:]):
        pads += [0, (-size) % multiple]
    if not any(pads):
        return x
    # Replicate, not zeros: a zero border would be an edge the network has never seen.
    return F.pad(x, pads, mode="replicate")


def _check_dense(output: object, channels: int, dims: int, who: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{who}: output must be a torch.Tensor, got {type(output).__name__}")
    if output.ndim != dims + 2 or output.shape[1] != channels:
        layout = "(B, {c}, H, W)" if dims == 2 else "(B, {c}, D, H, W)"
        raise ValueError(
            f"{who}: output must have shape {layout.format(c=channels)} (the model's forward "
            f"output), got {tuple(output.shape)}"
        )
    return output


def _check_spatial(spatial: Sequence[int], dims: int, who: str) -> tuple[int, ...]:
    try:
        # operator.index accepts numpy and torch integers but not floats.
        sizes = tuple(operator.index(s) for s in spatial)
    except TypeError:
        sizes = ()
    if len(sizes) != dims or not all(s > 0 for s in sizes):
        raise ValueError(f"{who}: spatial must be {dims} positive integers, got {spatial!r}")
    return sizes


class SegmentationLocalizer(nn.Module):
    """MONAI U-Net predicting one lesion logit per pixel (voxel), 2D or 3D.

    ``forward(x)`` returns logits ``(B, 1, *spatial)`` at the input's size: inputs whose
    size is not a multiple of ``prod(strides)`` are padded (replicate) and the output is
    cropped back.

    Loss: ``BCEWithLogits(z, m) + dice_weight * (1 - (2 sum(p m) + 1) / (sum p + sum m + 1))``
    with ``p = sigmoid(z)``. The soft Dice is pooled over the whole batch, so it is defined
    on batches without lesions and, unlike the per-pixel BCE, is not swamped by the
    background when lesions are tiny.

    Parameters
    ----------
    spatial_dims, in_channels : int
        Image rank (2 or 3) and channels.
    channels, strides, num_res_units, kernel_size, norm, act, dropout
        Passed to :class:`monai.networks.nets.UNet`. ``norm`` defaults to batch norm (as
        the U-Net of Arun et al. 2021), not MONAI's instance norm, which normalises away the
        per-image contrast that makes a lesion stand out and trains markedly slower here.
    pos_weight : float or None
        Weight of lesion pixels in the BCE term (``None``: 1).
    dice_weight : float
        Weight of the soft Dice term.
    """

    target_kind = "mask"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        *,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
        kernel_size: int = 3,
        norm: str = "BATCH",
        act: str = "PRELU",
        dropout: float = 0.0,
        pos_weight: float | None = None,
        dice_weight: float = 1.0,
    ) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        if spatial_dims not in (2, 3):
            raise ValueError(f"unet: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        channels, strides = tuple(channels), tuple(strides)
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError(
                f"unet: need at least 2 channels and one stride fewer than channels, got "
                f"channels={channels}, strides={strides}"
            )
        if pos_weight is not None and not (math.isfinite(pos_weight) and pos_weight > 0):
            raise ValueError(f"unet: pos_weight must be a positive number, got {pos_weight!r}")
        if not (math.isfinite(dice_weight) and dice_weight >= 0):
            raise ValueError(f"unet: dice_weight must be >= 0, got {dice_weight!r}")
        self.spatial_dims = spatial_dims
        self.pos_weight = pos_weight
        self.dice_weight = dice_weight
        self.size_multiple = math.prod(strides)
        self.unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            kernel_size=kernel_size,
            norm=norm,
            act=act,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        out = self.unet(_pad_to_multiple(x, self.size_multiple))
        return out[(..., *(slice(0, s) for s in spatial))]

    def loss(
        self,
        output: torch.Tensor,
        masks: torch.Tensor | None,
        boxes: Sequence[Sequence[Box]] | None = None,
    ) -> torch.Tensor:
        """BCE-with-logits plus batch soft Dice of ``output`` against ``masks``.

        ``masks`` is ``(B, 1, *spatial)`` with values in ``[0, 1]`` (box ground truth
        enters as the union-of-boxes mask); ``boxes`` is ignored.
        """
        output = _check_dense(output, 1, self.spatial_dims, "unet loss")
        if masks is None:
            raise ValueError("unet loss needs masks (B, 1, *spatial); got None")
        if not isinstance(masks, torch.Tensor) or masks.shape != output.shape:
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(
                f"unet loss: masks must have the output's shape {tuple(output.shape)}, got {shape}"
            )
        target = masks.to(device=output.device, dtype=output.dtype)
        if not bool(((target >= 0) & (target <= 1)).all()):
            raise ValueError("unet loss: masks must hold values in [0, 1]")
        pos_weight = (
            None
            if self.pos_weight is None
            else torch.tensor(self.pos_weight, device=output.device, dtype=output.dtype)
        )
        bce = F.binary_cross_entropy_with_logits(output, target, pos_weight=pos_weight)
        prob = torch.sigmoid(output)
        dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        return bce + self.dice_weight * dice

    def localization_map(self, output: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """``sigmoid(output)`` resized (bi/trilinearly) to ``spatial``: ``(B, 1, *spatial)``."""
        output = _check_dense(output, 1, self.spatial_dims, "unet localization_map")
        spatial = _check_spatial(spatial, self.spatial_dims, "unet localization_map")
        # Interpolating values in [0, 1] stays in [0, 1]; the clamp only absorbs rounding.
        return upsample_to(torch.sigmoid(output), spatial).clamp(0, 1)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(c_out),
            relu=nn.ReLU(),
        )
    )


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression; indices of the kept boxes, by decreasing score.

    ``boxes`` is ``(K, 4)`` as ``(x, y, w, h)``. A box is dropped when its IoU with a kept,
    higher-scoring box exceeds ``iou_threshold``.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    area = boxes[:, 2].clamp(min=0) * boxes[:, 3].clamp(min=0)
    # All pairwise IoUs at once: K is at most top_k (tens), so K x K is small.
    iw = (torch.minimum(x1[:, None], x1[None]) - torch.maximum(x0[:, None], x0[None])).clamp(min=0)
    ih = (torch.minimum(y1[:, None], y1[None]) - torch.maximum(y0[:, None], y0[None])).clamp(min=0)
    inter = iw * ih
    iou = inter / (area[:, None] + area[None] - inter).clamp(min=1e-12)
    order = torch.argsort(scores, descending=True).tolist()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep: list[int] = []
    iou_cpu = iou.cpu()
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou_cpu[i] > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


class BoxLocalizer(nn.Module):
    """A small anchor-free box detector (CenterNet style), 2D only.

    A convolutional encoder down to stride 16 with a top-down path back to stride 4 feeds
    two heads. ``forward(x)`` returns ``(B, 5, ceil(H/4), ceil(W/4))``: channel 0 the
    logit of the box-centre heatmap, channels 1-2 the sub-cell offset ``(dx, dy)`` of the
    centre, channels 3-4 ``log(w / 4), log(h / 4)``. A box at cell ``(i, j)`` decodes to
    centre ``((j + dx) * 4, (i + dy) * 4)`` and size ``(4 e^{s_w}, 4 e^{s_h})`` in input
    pixels (continuous coordinates: pixel column ``c`` spans ``[c, c + 1)``).

    Training targets: each box's centre cell gets heatmap 1 and a Gaussian around it
    (``sigma = max(size / 6, 0.5)`` cells per axis; overlapping boxes take the maximum);
    loss = penalty-reduced focal loss on the heatmap (``alpha=2, beta=4``, as CenterNet)
    + ``offset_weight * L1(offset)`` + ``size_weight * L1(log size)`` at the centre
    cells, each normalised by the number of boxes.

    ``localization_map`` paints each decoded box (top-k, score >= ``map_threshold``, no
    NMS) with its score and takes the per-pixel maximum, so a pixel's value is the
    confidence of the best box covering it, and 0 outside every box. That is the map a
    RetinaNet's boxes give when scored by AUPRC against the box mask (Arun et al. 2021); a
    blurred centre heatmap would instead rank box centres above box edges, which the box
    ground truth does not do.

    Parameters
    ----------
    spatial_dims : int
        Must be 2 (3D box ground truth: train ``unet`` on the union-of-boxes masks).
    in_channels : int
        Channels of the input image.
    width : int
        Channels of the first stage (stages have ``width * (1, 2, 4, 8)``).
    score_threshold, top_k, nms_iou : float, int, float
        Defaults of :meth:`predict_boxes`.
    map_threshold : float
        Lowest score of a box painted into :meth:`localization_map`; low, because the map
        is ranked (AUPRC), not thresholded.
    offset_weight, size_weight : float
        Weights of the regression terms of the loss.
    """

    target_kind = "boxes"
    stride = 4

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        *,
        width: int = 16,
        score_threshold: float = 0.3,
        top_k: int = 10,
        nms_iou: float = 0.5,
        map_threshold: float = 0.05,
        offset_weight: float = 1.0,
        size_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(
                f"box_localizer is 2D only (spatial_dims=2), got spatial_dims={spatial_dims!r}; "
                "for 3D box ground truth train 'unet' on the union-of-boxes masks"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"box_localizer: width must be a positive integer, got {width!r}")
        self.spatial_dims = 2
        self.score_threshold = score_threshold
        self.top_k = top_k
        self.nms_iou = nms_iou
        self.map_threshold = map_threshold
        self.offset_weight = offset_weight
        self.size_weight = size_weight
        w = width
        self.stage1 = nn.Sequential(_conv_bn_relu(in_channels, w), _conv_bn_relu(w, w, 2))
        self.stage4 = nn.Sequential(_conv_bn_relu(w, 2 * w, 2), _conv_bn_relu(2 * w, 2 * w))
        self.stage8 = nn.Sequential(_conv_bn_relu(2 * w, 4 * w, 2), _conv_bn_relu(4 * w, 4 * w))
        self.stage16 = nn.Sequential(_conv_bn_relu(4 * w, 8 * w, 2), _conv_bn_relu(8 * w, 8 * w))
        self.lateral16 = nn.Conv2d(8 * w, 2 * w, 1)
        self.lateral8 = nn.Conv2d(4 * w, 2 * w, 1)
        self.lateral4 = nn.Conv2d(2 * w, 2 * w, 1)
        self.fuse = _conv_bn_relu(2 * w, 2 * w)
        self.heat_head = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(2 * w, 2 * w, 3, padding=1),
                relu=nn.ReLU(),
                out=nn.Conv2d(2 * w, 1, 1),
            )
        )
        self.box_head = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(2 * w, 2 * w, 3, padding=1),
                relu=nn.ReLU(),
                out=nn.Conv2d(2 * w, 4, 1),
            )
        )
        with torch.no_grad():
            # Focal-loss prior (Lin et al. 2017): start every cell at P(centre) = 0.01, so
            # the many background cells do not dominate the first steps.
            self.heat_head.out.bias.fill_(-math.log((1 - 0.01) / 0.01))
            # Offsets start at the cell centre, sizes at one cell.
            self.box_head.out.weight.mul_(0.1)
            self.box_head.out.bias.copy_(torch.tensor([0.5, 0.5, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = _pad_to_multiple(x, 16)
        c4 = self.stage4(self.stage1(x))
        c8 = self.stage8(c4)
        c16 = self.stage16(c8)
        p8 = self.lateral8(c8) + F.interpolate(self.lateral16(c16), scale_factor=2.0)
        p4 = self.lateral4(c4) + F.interpolate(p8, scale_factor=2.0)
        feat = self.fuse(p4)
        out = torch.cat([self.heat_head(feat), self.box_head(feat)], dim=1)
        return out[..., : math.ceil(h / self.stride), : math.ceil(w / self.stride)]

    # -- training targets and loss -------------------------------------------------------

    def encode(
        self, boxes: Sequence[Sequence[Box]], grid: Sequence[int], *, device: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training targets for ``boxes`` on an output grid ``(h, w)``.

        Returns ``heat (B, 1, h, w)`` in ``[0, 1]``, ``centres (N, 3)`` long rows
        ``(b, i, j)`` of the centre cells and ``regression (N, 4)``: ``(dx, dy, log(w/4),
        log(h/4))`` for each of the N boxes whose centre lies on the grid.
        """
        gh, gw = (int(g) for g in grid)
        s = float(self.stride)
        heat = torch.zeros(len(boxes), 1, gh, gw, device=device)
        rows = torch.arange(gh, device=device, dtype=torch.float32)[:, None]
        cols = torch.arange(gw, device=device, dtype=torch.float32)[None, :]
        centres: list[tuple[int, int, int]] = []
        regression: list[tuple[float, float, float, float]] = []
        for b, image_boxes in enumerate(boxes):
            for k, box in enumerate(image_boxes):
                x, y, bw, bh = _box(box, f"boxes[{b}][{k}]")
                fx, fy = (x + bw / 2) / s, (y + bh / 2) / s
                j, i = math.floor(fx), math.floor(fy)
                if not (0 <= i < gh and 0 <= j < gw):
                    continue  # centre outside the image: nothing to learn there
                sx, sy = max(bw / s / 6, 0.5), max(bh / s / 6, 0.5)
                g = torch.exp(-((cols - j) ** 2) / (2 * sx**2) - (rows - i) ** 2 / (2 * sy**2))
                heat[b, 0] = torch.maximum(heat[b, 0], g)
                centres.append((b, i, j))
                regression.append((fx - j, fy - i, math.log(bw / s), math.log(bh / s)))
        centre_t = torch.tensor(centres, dtype=torch.long, device=device).reshape(-1, 3)
        regression_t = torch.tensor(regression, dtype=torch.float32, device=device).reshape(-1, 4)
        return heat, centre_t, regression_t

    def loss(
        self,
        output: torch.Tensor,
        masks: torch.Tensor | None,
        boxes: Sequence[Sequence[Box]] | None,
    ) -> torch.Tensor:
        """Focal loss on the centre heatmap plus L1 on offsets and log sizes.

        ``boxes[b]`` lists the ``(x, y, w, h)`` boxes of image ``b`` in input pixels (an
        empty list for an image without findings); ``masks`` is ignored.
        """
        output = _check_dense(output, 5, 2, "box_localizer loss")
        if boxes is None or len(boxes) != output.shape[0]:
            got = "None" if boxes is None else f"{len(boxes)} lists"
            raise ValueError(
                f"box_localizer loss needs one list of (x, y, w, h) boxes per image "
                f"({output.shape[0]}), got {got}"
            )
        heat_t, centres, regression_t = self.encode(boxes, output.shape[2:], device=output.device)
        heat_t = heat_t.to(output.dtype)
        logit = output[:, :1]
        log_p, log_not_p = F.logsigmoid(logit), F.logsigmoid(-logit)
        p = log_p.exp()
        is_centre = torch.zeros_like(heat_t, dtype=torch.bool)
        if len(centres):
            is_centre[centres[:, 0], 0, centres[:, 1], centres[:, 2]] = True
        n_pos = max(int(is_centre.sum()), 1)
        alpha, beta = 2.0, 4.0
        pos = -(log_p * (1 - p) ** alpha)[is_centre].sum()
        neg = -(log_not_p * p**alpha * (1 - heat_t) ** beta)[~is_centre].sum()
        loss = (pos + neg) / n_pos
        if len(centres):
            pred = output[centres[:, 0], 1:, centres[:, 1], centres[:, 2]]
            target = regression_t.to(output.dtype)
            loss = (
                loss
                + self.offset_weight
                * F.l1_loss(pred[:, :2], target[:, :2], reduction="sum")
                / n_pos
            )
            loss = (
                loss
                + self.size_weight * F.l1_loss(pred[:, 2:], target[:, 2:], reduction="sum") / n_pos
            )
        return loss

    # -- decoding --------------------------------------------------------------------------

    def _decode(self, output: torch.Tensor, threshold: float, top_k: int) -> list[torch.Tensor]:
        """Per image a ``(K, 5)`` tensor ``(x, y, w, h, score)`` of heatmap peaks."""
        output = output.detach()
        heat = torch.sigmoid(output[:, :1])
        # A peak is a cell that equals the maximum of its 3 x 3 neighbourhood.
        peaks = heat * (heat == F.max_pool2d(heat, 3, stride=1, padding=1))
        b, _, gh, gw = heat.shape
        k = min(top_k, gh * gw)
        scores, flat = peaks.reshape(b, -1).topk(k, dim=1)
        s = float(self.stride)
        result = []
        for n in range(b):
            keep = scores[n] >= threshold
            idx, sc = flat[n][keep], scores[n][keep]
            i, j = idx // gw, idx % gw
            reg = output[n, 1:, i, j]  # (4, K)
            bw, bh = reg[2].exp() * s, reg[3].exp() * s
            cx, cy = (j + reg[0]) * s, (i + reg[1]) * s
            result.append(torch.stack([cx - bw / 2, cy - bh / 2, bw, bh, sc], dim=1))
        return result

    def predict_boxes(
        self,
        output: torch.Tensor,
        *,
        score_threshold: float | None = None,
        top_k: int | None = None,
        nms_iou: float | None = None,
    ) -> list[list[ScoredBox]]:
        """Decode boxes: local maxima of the centre heatmap (3 x 3 max-pool), the ``top_k``
        best, those scoring at least ``score_threshold``, then NMS at ``nms_iou``.

        Returns, per image, a list of ``(x, y, w, h, score)`` in input pixels, best first.
        Arguments left as None take the model's defaults.
        """
        output = _check_dense(output, 5, 2, "box_localizer predict_boxes")
        threshold = self.score_threshold if score_threshold is None else score_threshold
        top_k = self.top_k if top_k is None else top_k
        iou = self.nms_iou if nms_iou is None else nms_iou
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        result = []
        for boxes in self._decode(output, float(threshold), top_k):
            kept = nms(boxes[:, :4], boxes[:, 4], float(iou))
            result.append([tuple(float(v) for v in row) for row in boxes[kept].tolist()])
        return result

    def localization_map(self, output: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """Per-pixel maximum score of the decoded boxes covering the pixel, ``(B, 1, H, W)``.

        ``spatial`` is the size of the input image. If the output grid does not match it
        (``ceil(H / 4)``), the boxes are scaled as if the image had been resized.
        """
        output = _check_dense(output, 5, 2, "box_localizer localization_map")
        h, w = _check_spatial(spatial, 2, "box_localizer localization_map")
        gh, gw = output.shape[2:]
        s = self.stride
        sy = 1.0 if math.ceil(h / s) == gh else h / (gh * s)
        sx = 1.0 if math.ceil(w / s) == gw else w / (gw * s)
        dtype = output.dtype if output.is_floating_point() else torch.float32
        rows = torch.arange(h, device=output.device, dtype=dtype) + 0.5
        cols = torch.arange(w, device=output.device, dtype=dtype) + 0.5
        maps = torch.zeros(output.shape[0], 1, h, w, device=output.device, dtype=dtype)
        for n, boxes in enumerate(self._decode(output, float(self.map_threshold), self.top_k)):
            if boxes.shape[0] == 0:
                continue
            boxes = boxes.to(dtype)
            x0, y0 = boxes[:, 0:1] * sx, boxes[:, 1:2] * sy
            x1, y1 = x0 + boxes[:, 2:3] * sx, y0 + boxes[:, 3:4] * sy
            in_x = (cols >= x0) & (cols < x1)  # (K, W): pixel centre inside the box
            in_y = (rows >= y0) & (rows < y1)  # (K, H)
            cover = (in_y[:, :, None] & in_x[:, None, :]).to(dtype) * boxes[:, 4, None, None]
            maps[n, 0] = cover.amax(dim=0)
        return maps


def _box(box: object, where: str) -> Box:
    try:
        x, y, w, h = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be (x, y, width, height), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"{where} must be finite with positive width and height, got {box!r}")
    return x, y, w, h
