"""Shared passes: input gradients in chunks, forward passes in chunks, upsampling."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from trustmap.core.targets import Target


def chunks(n: int, size: int | None) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size`` (all at once if None)."""
    step = n if size is None else max(1, int(size))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def input_gradient(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    target: Target,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the target score with respect to ``inputs`` (one forward, one backward).

    ``rows`` maps each row of ``inputs`` to its original sample. Returns
    ``(gradient, output)``; the output is detached.
    """
    xg = inputs.detach().requires_grad_(True)
    output = forward(xg)
    score = target.scores(output, rows)
    (grad,) = torch.autograd.grad(score.sum(), xg)
    return grad, output.detach()


def batched_input_gradient(
    forward: Callable[[torch.Tensor], torch.Tensor],
    make_inputs: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
    n_rows: int,
    target: Target,
    batch_size: int | None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(row_slice, gradient)`` for ``n_rows`` inputs built lazily per chunk.

    ``make_inputs(sl)`` returns ``(inputs, rows)`` for the rows in ``sl``, so a chunk is
    only materialised when it is evaluated (a 3D volume times 25 steps does not fit).
    """
    for sl in chunks(n_rows, batch_size):
        inputs, rows = make_inputs(sl)
        grad, _ = input_gradient(forward, inputs, target, rows)
        yield sl, grad


def upsample_to(cam: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Resize ``(B, 1, *s)`` to ``spatial`` bilinearly (2D) or trilinearly (3D)."""
    if tuple(cam.shape[2:]) == tuple(spatial):
        return cam
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    return F.interpolate(cam, size=tuple(spatial), mode=mode, align_corners=False)
