"""Score-CAM (Wang et al. 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import chunks, upsample_to
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import check_output
from trustmap.methods.cam._layer import (
    check_batch_size,
    check_flag,
    finish,
    layer_pass,
    spatial_dims,
    weighted_sum,
)


def minmax_masks(maps: torch.Tensor) -> torch.Tensor:
    """Scale each ``(1, *s)`` map to [0, 1]; a constant map becomes all zeros."""
    dims = spatial_dims(maps)
    low = maps.amin(dim=dims, keepdim=True)
    span = maps.amax(dim=dims, keepdim=True) - low
    ok = span > 0
    return torch.where(ok, (maps - low) / torch.where(ok, span, torch.ones_like(span)), 0)


def score_cam_weights(
    explainer: Explainer,
    x: torch.Tensor,
    act: torch.Tensor,
    target: Target,
    batch_size: int,
) -> torch.Tensor:
    """``w_k = p(x * H_k) - p(0)``, ``(B, K)``, with ``H_k`` the min-max scaled,
    upsampled channel ``k`` and ``p`` the target's probability."""
    b, k = act.shape[:2]
    spatial = tuple(x.shape[2:])
    probs = torch.empty(b * k, dtype=act.dtype, device=x.device)
    with torch.no_grad():
        baseline = target.probabilities(explainer.forward(torch.zeros_like(x)))
        # Row r of the masked batch is sample r // k masked by its channel r % k; masks
        # are built per chunk so that K upsampled volumes never exist at once.
        for sl in chunks(b * k, batch_size):
            rows = torch.arange(sl.start, sl.stop, device=x.device)
            sample, channel = rows // k, rows % k
            masks = minmax_masks(upsample_to(act[sample, channel].unsqueeze(1), spatial))
            output = check_output(explainer.model(x[sample] * masks), len(rows))
            probs[sl] = target.probabilities(output, sample).to(probs.dtype)
    return probs.reshape(b, k) - baseline.to(probs.dtype).unsqueeze(1)


@register(
    "score_cam",
    family="cam",
    summary="channels weighted by the target probability of the input masked by each "
    "channel, gradient-free",
    paper="Wang et al. 2020, Score-CAM: score-weighted visual explanations for "
    "convolutional neural networks",
    output="single",
)
class ScoreCAM(Explainer):
    """Score-CAM: ``M = ReLU(sum_k w_k A_k)``, ``w_k = p_c(x * H_k) - p_c(x_b)`` with
    ``H_k`` channel ``k`` upsampled and min-max scaled to [0, 1] and ``x_b = 0`` (eq. 2-5).

    ``p_c`` is the softmax probability of the class for multi-class models, the sigmoid
    of the signed logit for single-logit models, the raw score for region and callable
    targets. A constant channel gives an all-zero mask.

    Cost: ``K + 1`` forward passes per image (``K`` channels of the layer, e.g. 1024 for
    DenseNet121's last block) plus one on ``x``; no gradient.

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see
        :class:`~trustmap.methods.cam.grad_cam.GradCAM`).
    relu:
        Rectify the map; False returns the signed map.
    batch_size:
        Masked inputs per forward pass (None: 32).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: str | None = None,
        relu: bool = True,
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.layer = layer
        self.relu = relu
        self.batch_size = batch_size

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        relu = check_flag("relu", self.relu)
        batch_size = check_batch_size(self.batch_size, 32)
        lp = layer_pass(self, x, target, self.layer, gradient=False)
        weights = score_cam_weights(self, x, lp.activation, lp.target, batch_size)
        cam = weighted_sum(weights, lp.activation)
        return finish(cam, x, relu), lp.output, lp.target, lp.extra
