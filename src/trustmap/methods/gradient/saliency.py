"""Simonyan's image-specific class saliency: |dS_c/dx|, maximum over channels."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.gradient._single import gradient_at_input


@register(
    "saliency",
    family="gradient",
    summary="|dS_c/dx|, maximum over channels",
    paper="Simonyan, Vedaldi, Zisserman 2014, Deep inside convolutional networks",
)
class Saliency(Explainer):
    """Saliency map ``M = max_c |dS/dx_c|`` (Simonyan et al. 2014, section 3.1).

    The map is one value per voxel. To keep the input-space shape contract
    ``(B, C, *spatial)`` the same map is repeated in every channel; take ``[:, :1]`` for
    the single map. For one-channel images (CT, MR, radiographs) this is just ``|dS/dx|``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        grad, output, resolved = gradient_at_input(self, x, target)
        sal = grad.abs().amax(dim=1, keepdim=True).expand_as(grad).contiguous()
        return sal, output, resolved, {}
