"""Models with trainable attention (Huff et al. 2021, section 3.4), 2D and 3D.

* :class:`AttentionCNN` (``create("attention_cnn")``): the attention-gated classifier of
  Jetley et al. 2018, "Learn to pay attention" (ICLR), on the blocks of ``small_cnn``.
* :class:`AttentionLocalizer` (``create("attention_unet")``): MONAI's ``AttentionUnet``
  (Oktay et al. 2018, the Attention U-Net that Schlemper et al. 2019 use on abdominal CT)
  as a lesion localizer with the loss and map of
  :class:`~trustmap.models.localizers.SegmentationLocalizer`.

Their attention maps are what the ``attention`` explainer returns
(:func:`attention_sources` finds them in any model).
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from trustmap.errors import InputError
from trustmap.models.localizers import SegmentationLocalizer

__all__ = [
    "COMPATIBILITIES",
    "AttentionCNN",
    "AttentionGate",
    "AttentionLocalizer",
    "attention_sources",
]

COMPATIBILITIES = ("pc", "dp", "additive")


class AttentionGate(nn.Module):
    """One attention estimator of Jetley et al. 2018 over the local features of one layer.

    With local features ``l_s`` (``C`` channels at each of the ``N`` positions ``s``) and
    the global feature vector ``g`` of the network's last layer, projected to ``C``
    channels by a learned linear map (``g' = W g``), the compatibility scores are

    * ``"pc"`` (parametrised, Jetley's preferred form): ``c_s = <u, l_s + g'>``;
    * ``"dp"`` (dot product): ``c_s = <l_s, g'>``;
    * ``"additive"``: ``c_s = <u, ReLU(l_s + g')>`` (the gating of Schlemper et al. 2019).

    The attention map is ``a_s = exp(c_s) / sum_i exp(c_i)`` (a softmax over positions)
    and the gate's output the attended descriptor ``g_a = sum_s a_s l_s``.

    In ``"pc"`` the term ``<u, g'>`` is the same at every position and cancels in the
    softmax: the map is a learned linear detector ``softmax(<u, l_s>)`` of the local
    features. ``"dp"`` and ``"additive"`` let the global vector select the positions.
    Jetley et al. project ``l`` to ``g``'s width instead; projecting ``g`` keeps ``g_a`` an
    average of the network's own local features.

    ``forward(local, g)`` returns ``(g_a, a)``: ``(B, C)`` and the map ``(B, 1, *s)``.
    """

    def __init__(self, local_channels: int, global_dim: int, *, compatibility: str = "pc") -> None:
        super().__init__()
        if compatibility not in COMPATIBILITIES:
            raise InputError(
                f"attention compatibility must be one of {COMPATIBILITIES}, got {compatibility!r}"
            )
        self.compatibility = compatibility
        self.project = nn.Linear(global_dim, local_channels, bias=False)
        if compatibility == "dp":
            self.register_parameter("u", None)
        else:
            self.u = nn.Parameter(torch.randn(local_channels) / math.sqrt(local_channels))

    def forward(self, local: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, *spatial = local.shape
        flat = local.flatten(2)  # (B, C, N)
        gp = self.project(g)[:, :, None]  # (B, C, 1)
        if self.compatibility == "pc":
            scores = torch.einsum("c,bcn->bn", self.u, flat + gp)
        elif self.compatibility == "dp":
            scores = (flat * gp).sum(1)
        else:
            scores = torch.einsum("c,bcn->bn", self.u, torch.relu(flat + gp))
        attention = torch.softmax(scores, dim=1)
        attended = torch.einsum("bn,bcn->bc", attention, flat)
        return attended, attention.reshape(b, 1, *spatial)


class AttentionCNN(nn.Module):
    """Attention-gated classifier (Jetley et al. 2018), 2D or 3D.

    The backbone is ``small_cnn``'s: four blocks ``Conv(3) -> BatchNorm -> ReLU`` with
    ``w, 2w, 4w, 8w`` kernels, strides 1, 2, 2, 2 (``features.block1 .. block4``). The
    global vector is ``g = ReLU(W GAP(block4))`` (``global_fc``). One
    :class:`AttentionGate` per block in ``attention_blocks`` (``gates.block2``,
    ``gates.block3`` by default: maps at 1/2 and 1/4 of the input size) attends over that
    block's output; the attended descriptors are concatenated and a linear layer (``fc``)
    gives the logits. The class score therefore depends on the local features only
    through the attention-weighted sums, which is what makes the maps an explanation
    built into the model.

    Parameters
    ----------
    spatial_dims, in_channels, num_classes
        As for :class:`~trustmap.models.SmallCNN`.
    width
        Kernels of the first block.
    attention_blocks
        Blocks (1-3) whose output is attended.
    compatibility
        ``"pc"``, ``"dp"`` or ``"additive"`` (see :class:`AttentionGate`).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        width: int = 32,
        attention_blocks: Sequence[int] = (2, 3),
        compatibility: str = "pc",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise InputError(f"attention_cnn: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise InputError(f"attention_cnn: width must be a positive integer, got {width!r}")
        blocks_at = tuple(attention_blocks)
        distinct = len(set(blocks_at)) == len(blocks_at)
        if not blocks_at or not distinct or any(b not in (1, 2, 3) for b in blocks_at):
            raise InputError(
                "attention_cnn: attention_blocks must be distinct blocks among 1, 2, 3, got "
                f"{attention_blocks!r}"
            )
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        pool = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[spatial_dims]
        # A ModuleDict rather than a Sequential: forward reads the blocks' outputs, and the
        # randomization test's stage discovery opens dicts into their blocks.
        self.features = nn.ModuleDict()
        c_in = in_channels
        widths = []
        for i, (mult, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
            c_out = width * mult
            self.features[f"block{i}"] = nn.Sequential(
                OrderedDict(
                    conv=conv(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
                    bn=norm(c_out),
                    relu=nn.ReLU(),
                )
            )
            widths.append(c_out)
            c_in = c_out
        self.pool = pool(1)
        self.flatten = nn.Flatten(1)
        self.global_fc = nn.Linear(c_in, c_in)
        self.global_relu = nn.ReLU()
        self.attention_blocks = tuple(sorted(blocks_at))
        self.gates = nn.ModuleDict(
            {
                f"block{b}": AttentionGate(widths[b - 1], c_in, compatibility=compatibility)
                for b in self.attention_blocks
            }
        )
        self.fc = nn.Linear(sum(widths[b - 1] for b in self.attention_blocks), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]

    def forward_with_attention(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the attention maps ``{"gates.blockK": (B, 1, *s)}`` of one pass."""
        local: dict[str, torch.Tensor] = {}
        h = x
        for name, block in self.features.items():
            h = block(h)
            local[name] = h
        g = self.global_relu(self.global_fc(self.flatten(self.pool(h))))
        attended, maps = [], {}
        for name, gate in self.gates.items():
            g_a, a = gate(local[name], g)
            attended.append(g_a)
            maps[f"gates.{name}"] = a
        return self.fc(torch.cat(attended, dim=1)), maps


class AttentionLocalizer(SegmentationLocalizer):
    """MONAI's ``AttentionUnet`` predicting one lesion logit per pixel (voxel), 2D or 3D.

    The attention gates (``AttentionBlock``) multiply each skip connection by a map
    ``psi = sigmoid(BN(conv(ReLU(W_g g + W_x x))))`` in ``[0, 1]``, computed from the
    coarser decoder features ``g``; ``attention`` reads ``psi``. Input padding, loss and
    ``localization_map`` are those of
    :class:`~trustmap.models.localizers.SegmentationLocalizer`.

    Parameters
    ----------
    spatial_dims, in_channels
        Image rank (2 or 3) and channels.
    channels, strides, kernel_size, up_kernel_size, dropout
        Passed to :class:`monai.networks.nets.AttentionUnet`.
    pos_weight, dice_weight
        As for :class:`~trustmap.models.localizers.SegmentationLocalizer`.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        *,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        kernel_size: int = 3,
        up_kernel_size: int = 3,
        dropout: float = 0.0,
        pos_weight: float | None = None,
        dice_weight: float = 1.0,
    ) -> None:
        # The parent checks the arguments and builds a U-Net, which is then replaced.
        super().__init__(
            spatial_dims,
            in_channels,
            channels=channels,
            strides=strides,
            num_res_units=0,
            kernel_size=kernel_size,
            dropout=dropout,
            pos_weight=pos_weight,
            dice_weight=dice_weight,
        )
        from monai.networks.nets import AttentionUnet

        self.unet = AttentionUnet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            dropout=dropout,
        )


def attention_sources(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that produce attention maps, by qualified name.

    :class:`AttentionGate` (its second output is the map) and MONAI's ``AttentionBlock``
    (the map is the output of its ``psi`` branch). Empty when the model has none.
    """
    # A model can only hold MONAI's AttentionBlock if that module was imported; looking it
    # up instead of importing it keeps MONAI's slow import off this path.
    monai_attention = sys.modules.get("monai.networks.nets.attentionunet")
    kinds: tuple[type, ...] = (AttentionGate,)
    if monai_attention is not None:
        kinds = (AttentionGate, monai_attention.AttentionBlock)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}
