"""Respond-CAM (Zhao et al. 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.cam._layer import finish, gradient_cam
from trustmap.methods.cam.xgrad_cam import xgrad_cam_map


@register(
    "respond_cam",
    family="cam",
    summary="signed sum_k w_k A_k with w_k = sum_s(A_k G_k) / sum_s(A_k); made for 3D",
    paper="Zhao et al. 2018, Respond-CAM: analyzing deep models for 3D imaging data by "
    "visualizations",
    output="single",
)
class RespondCAM(Explainer):
    """Respond-CAM: ``M = sum_k w_k A_k``, ``w_k = sum_s(A_k dS/dA_k) / sum_s A_k``.

    The weights are those of XGrad-CAM (proposed independently two years later); the map
    is *not* rectified, as in the paper. At the layer's resolution the map then sums to
    ``sum_{k,s} A_ks dS/dA_ks``, the first-order Taylor contribution of the layer, which
    for a head of global average pooling and a bias-free linear layer is exactly the
    score (the paper's sum-to-score property). Integer upsampling factors preserve the
    mean, so the upsampled map's sum is that value times the upsampling volume.

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see :class:`GradCAM`).

    One forward and one backward pass.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None) -> None:
        self.model = model
        self.layer = layer

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        cam, lp = gradient_cam(self, x, target, self.layer, xgrad_cam_map)
        return finish(cam, x, relu=False), lp.output, lp.target, lp.extra
