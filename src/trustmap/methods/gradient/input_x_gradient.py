"""Input times gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.gradient._single import gradient_at_input


@register(
    "input_x_gradient",
    family="gradient",
    summary="x * dS_c/dx, signed",
    paper="Shrikumar et al. 2016, Not just a black box (Table 1 of Singh et al. 2020)",
)
class InputXGradient(Explainer):
    """Gradient times input: ``A = x * dS_c/dx``, elementwise and signed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        grad, output, resolved = gradient_at_input(self, x, target)
        return x * grad, output, resolved, {}
