"""DeconvNet (Zeiler and Fergus 2014) as a modified backward pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.gradient._relu_rules import modified_relu_gradient


@register(
    "deconvnet",
    family="gradient",
    summary="backward pass with ReLU applied to the gradient instead of the forward mask",
    paper="Zeiler and Fergus 2014, Visualizing and understanding convolutional networks",
)
class DeconvNet(Explainer):
    """DeconvNet: at every ReLU the backward signal is ``R_in = max(R_out, 0)``,
    regardless of the forward activation (Table 1 of Singh et al. 2020).

    Every ReLU is intercepted: ``nn.ReLU`` (also in place, also reused),
    ``F.relu``/``torch.relu``/``Tensor.relu`` inside ``forward``. Hidden activations
    other than ReLU (GELU, SiLU, ELU, LeakyReLU, ...) raise a ValueError naming them;
    sigmoid, tanh and softmax keep their ordinary gradient. TorchScript models are refused.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        return modified_relu_gradient(self, x, target, "deconvnet")
