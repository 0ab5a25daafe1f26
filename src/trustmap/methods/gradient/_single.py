"""One forward and one backward pass on x: shared by the plain gradient methods."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trustmap.core.base import Explainer
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import check_output


def gradient_at_input(
    explainer: Explainer,
    x: torch.Tensor,
    target: TargetSpec | Target,
    *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Target]:
    """``(d score / d x, output, resolved target)`` from a single pass.

    The target is resolved on the same forward pass that is differentiated, so a plain
    gradient costs exactly one forward and one backward pass. ``forward`` replaces the
    model's forward pass (e.g. a TorchScript graph with modified ReLUs).
    """
    xg = x.detach().requires_grad_(True)
    output = explainer.forward(xg) if forward is None else check_output(forward(xg), x.shape[0])
    resolved = resolve_target(target, output)
    (grad,) = torch.autograd.grad(resolved.scores(output).sum(), xg)
    return grad, output.detach(), resolved
