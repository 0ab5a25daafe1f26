"""Plain gradient of the target score with respect to the input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.gradient._single import gradient_at_input


@register(
    "gradient",
    family="gradient",
    summary="signed gradient dS_c/dx of the target score",
    paper="Simonyan et al. 2014, Deep inside convolutional networks (GRAD in Arun et al. 2021)",
)
class Gradient(Explainer):
    """Gradient explanation: ``A = dS_c(x)/dx``, signed, one map per input channel."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        grad, output, resolved = gradient_at_input(self, x, target)
        return grad, output, resolved, {}
