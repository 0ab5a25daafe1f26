"""Eigen-CAM (Muhammad and Yeasin 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.cam._layer import finish, layer_pass


def eigen_cam_map(act: torch.Tensor) -> torch.Tensor:
    """Projection of each position's channel vector on the first right singular vector of
    the ``(N, K)`` activation matrix, signed so that it sums to a positive value,
    ``(B, 1, *s)``."""
    b, k, *s = act.shape
    mat = act.reshape(b, k, -1).transpose(1, 2)  # (B, N, K)
    _, _, vh = torch.linalg.svd(mat, full_matrices=False)
    proj = (mat @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)  # (B, N)
    # A singular vector is defined up to sign; the paper's map is the positive one.
    sign = torch.where(proj.sum(1, keepdim=True) < 0, -1.0, 1.0).to(proj.dtype)
    return (proj * sign).reshape(b, 1, *s)


@register(
    "eigen_cam",
    family="cam",
    summary="class-agnostic: activations projected on their first principal component",
    paper="Muhammad and Yeasin 2020, Eigen-CAM: class activation map using principal components",
    output="single",
)
class EigenCAM(Explainer):
    """Eigen-CAM: ``M = ReLU(O v_1)`` where ``O`` is the layer's output reshaped to
    ``(N, K)`` and ``v_1`` its first right singular vector (no centring, as in the paper).

    The map does not depend on the target: it shows what the layer responds to most, for
    any class. The target is still resolved and reported. One forward pass (no gradient)
    and one SVD per sample.

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see
        :class:`~trustmap.methods.cam.grad_cam.GradCAM`).
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None) -> None:
        self.model = model
        self.layer = layer

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        lp = layer_pass(self, x, target, self.layer, gradient=False)
        cam = eigen_cam_map(lp.activation)
        return finish(cam, x, relu=True), lp.output, lp.target, lp.extra
