"""LayerCAM (Jiang et al. 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.cam._layer import check_flag, finish, gradient_cam


def layer_cam_map(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum_k ReLU(G_k) * A_k`` per position, ``(B, 1, *s)``."""
    return (grad.clamp(min=0) * act).sum(1, keepdim=True)


@register(
    "layer_cam",
    family="cam",
    summary="positive gradients times activations per position, ReLU(sum_k ReLU(G_k) A_k)",
    paper="Jiang et al. 2021, LayerCAM: exploring hierarchical class activation maps for "
    "localization",
    output="single",
)
class LayerCAM(Explainer):
    """LayerCAM: ``M = ReLU(sum_k ReLU(dS/dA_k) * A_k)``, a weight per channel *and*
    position (eq. 5-6), so that shallow layers give usable maps.

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see :class:`GradCAM`).
    relu:
        Rectify the map; False returns the (signed) channel sum.

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
        cam, lp = gradient_cam(self, x, target, self.layer, layer_cam_map)
        return finish(cam, x, relu), lp.output, lp.target, lp.extra
