"""HiResCAM (Draelos and Carin 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.cam._layer import check_flag, finish, gradient_cam


def hires_cam_map(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum_k G_k * A_k`` per position, signed, ``(B, 1, *s)``."""
    return (grad * act).sum(1, keepdim=True)


@register(
    "hires_cam",
    family="cam",
    summary="gradient times activation per position, ReLU(sum_k G_k A_k)",
    paper="Draelos and Carin 2020, Use HiResCAM instead of Grad-CAM for faithful "
    "explanations of convolutional neural networks",
    output="single",
)
class HiResCAM(Explainer):
    """HiResCAM: ``M = ReLU(sum_k dS/dA_k * A_k)``, elementwise instead of Grad-CAM's
    spatially averaged gradient.

    For a head of global average pooling and a linear layer the gradient is constant over
    positions and HiResCAM equals Grad-CAM; with any other head they differ, and
    HiResCAM's (unrectified) map sums to the first-order contribution of the layer.

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see :class:`GradCAM`).
    relu:
        Rectify the map; False returns the signed map.

    One forward and one backward pass.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None, relu: bool = True) -> None:
        self.model = model
        self.layer = layer
        self.relu = relu

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        relu = check_flag("relu", self.relu)
        cam, lp = gradient_cam(self, x, target, self.layer, hires_cam_map)
        return finish(cam, x, relu), lp.output, lp.target, lp.extra
