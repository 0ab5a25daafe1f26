"""XGrad-CAM (Fu et al. 2020)."""

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
    safe_divide,
    spatial_dims,
    weighted_sum,
)


def xgrad_cam_weights(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``w_k = sum_s(A_k G_k) / sum_s(A_k)``, ``(B, K)``; shared with Respond-CAM."""
    dims = spatial_dims(act)
    return safe_divide((act * grad).sum(dim=dims), act.sum(dim=dims))


def xgrad_cam_map(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k A_k`` with the XGrad-CAM weights, signed, ``(B, 1, *s)``."""
    return weighted_sum(xgrad_cam_weights(act, grad), act)


@register(
    "xgrad_cam",
    family="cam",
    summary="channels weighted by activation-weighted gradients, ReLU(sum_k w_k A_k)",
    paper="Fu et al. 2020, Axiom-based Grad-CAM: towards accurate visualization and "
    "explanation of CNNs",
    output="single",
)
class XGradCAM(Explainer):
    """XGrad-CAM: ``M = ReLU(sum_k w_k A_k)``, ``w_k = sum_s(A_k dS/dA_k) / sum_s A_k``
    (eq. 14), the weights that best satisfy the sensitivity and conservation axioms.

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see :class:`GradCAM`).
    relu:
        Rectify the map; False returns the signed map.

    A channel whose activations sum to zero gets ``w_k = 0`` (an epsilon of the dtype
    guards the division). One forward and one backward pass.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None, relu: bool = True) -> None:
        self.model = model
        self.layer = layer
        self.relu = relu

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        relu = check_flag("relu", self.relu)
        cam, lp = gradient_cam(self, x, target, self.layer, xgrad_cam_map)
        return finish(cam, x, relu), lp.output, lp.target, lp.extra
