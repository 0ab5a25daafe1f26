"""Grad-CAM++ (Chattopadhay et al. 2018)."""

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


def grad_cam_pp_map(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k A_k`` with ``w_k = sum_s alpha_k ReLU(G_k)``, signed, ``(B, 1, *s)``."""
    dims = spatial_dims(act)
    act_sum = act.sum(dim=dims, keepdim=True)
    # alpha = G^2 / (2 G^2 + sum_s(A) G^3) = 1 / (2 + sum_s(A) G) wherever G != 0. The
    # reduced form does not underflow for small gradients (G^3 vanishes in float32
    # long before G does); alpha is 0 where G == 0 or the denominator is zero.
    den = 2 + act_sum * grad
    valid = (grad != 0) & (den != 0)
    alpha = torch.where(valid, 1 / torch.where(valid, den, torch.ones_like(den)), 0)
    weights = (alpha * grad.clamp(min=0)).sum(dim=dims)
    return weighted_sum(weights, act)


@register(
    "grad_cam_pp",
    family="cam",
    summary="Grad-CAM with positive gradients weighted per position by second-order terms",
    paper="Chattopadhay et al. 2018, Grad-CAM++: generalized gradient-based visual "
    "explanations for deep convolutional networks",
    output="single",
)
class GradCAMPlusPlus(Explainer):
    """Grad-CAM++: ``M = ReLU(sum_k w_k A_k)``, ``w_k = sum_s alpha_ks ReLU(G_ks)``,
    ``alpha = G^2 / (2 G^2 + sum_s(A_k) G^3)`` (eq. 19 with the exponential score's
    higher derivatives written as powers of the first, as is standard).

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see :class:`GradCAM`).
    relu:
        Rectify the map; False returns the signed map.

    ``alpha`` is set to 0 where the gradient is zero (0/0 in the formula) or the
    denominator vanishes. One forward and one backward pass.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None, relu: bool = True) -> None:
        self.model = model
        self.layer = layer
        self.relu = relu

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        relu = check_flag("relu", self.relu)
        cam, lp = gradient_cam(self, x, target, self.layer, grad_cam_pp_map)
        return finish(cam, x, relu), lp.output, lp.target, lp.extra
