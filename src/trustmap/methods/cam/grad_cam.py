"""Grad-CAM (Selvaraju et al. 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.cam._layer import (
    check_flag,
    finish,
    gradient_cam,
    spatial_dims,
    weighted_sum,
)


def grad_cam_map(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum_k mean_s(G_k) A_k``, signed, ``(B, 1, *s)``."""
    return weighted_sum(grad.mean(dim=spatial_dims(grad)), act)


@register(
    "grad_cam",
    family="cam",
    summary="channels weighted by their spatially averaged gradient, ReLU(sum_k w_k A_k)",
    paper="Selvaraju et al. 2017, Grad-CAM: visual explanations from deep networks via "
    "gradient-based localization",
    output="single",
)
class GradCAM(Explainer):
    """Grad-CAM: ``M = ReLU(sum_k w_k A_k)`` with ``w_k = mean_s dS/dA_k`` (eq. 1-2).

    Parameters
    ----------
    layer:
        Name of the layer (as in ``model.named_modules()``) whose output ``A`` is
        weighted. None picks the last spatial feature map (the input of the global
        pooling of a classifier).
    relu:
        Rectify the map (the paper's choice); False returns the signed map.

    The map is computed at the layer's resolution and upsampled bilinearly (2D) or
    trilinearly (3D) to ``x``'s size, without per-image normalisation. Costs one forward
    and one backward pass.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None, relu: bool = True) -> None:
        self.model = model
        self.layer = layer
        self.relu = relu

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        relu = check_flag("relu", self.relu)
        cam, lp = gradient_cam(self, x, target, self.layer, grad_cam_map)
        return finish(cam, x, relu), lp.output, lp.target, lp.extra
