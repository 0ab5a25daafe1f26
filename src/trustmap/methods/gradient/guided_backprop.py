"""Guided backpropagation (Springenberg et al. 2015)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.gradient._relu_rules import modified_relu_gradient


@register(
    "guided_backprop",
    family="gradient",
    summary="gradient passed only where both the forward input and the gradient are positive",
    paper="Springenberg et al. 2015, Striving for simplicity: the all convolutional net",
)
class GuidedBackprop(Explainer):
    """Guided backprop: at every ReLU ``R_in = max(R_out, 0) * 1[a > 0]`` where ``a`` is
    the forward activation (Huff et al. 2021, section 3.2.2).

    ReLUs are intercepted wherever they are called (see :class:`DeconvNet`); other hidden
    activations raise a ValueError naming them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        return modified_relu_gradient(self, x, target, "guided")
