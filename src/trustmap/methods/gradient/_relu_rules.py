"""DeconvNet and guided backprop share one mechanism: a modified ReLU backward pass."""

from __future__ import annotations

from typing import Any

import torch

from trustmap.core.base import Explainer
from trustmap.core.hooks import modified_relu
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.gradient._single import gradient_at_input


def modified_relu_gradient(
    explainer: Explainer, x: torch.Tensor, target: TargetSpec | Target, rule: str
) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
    with modified_relu(explainer.model, rule, explainer.name) as forward:
        grad, output, resolved = gradient_at_input(explainer, x, target, forward=forward)
    return grad, output, resolved, {}
