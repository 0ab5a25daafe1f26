"""Shared pieces of the mask-based perturbation methods.

RISE, HiPe, meaningful perturbation and extremal perturbation all describe a perturbation
by a mask ``m`` in [0, 1] over the spatial axes and evaluate
``x * m + baseline * (1 - m)``. This module holds what they share: per-dimension sizes,
the default chunk size, mask resizing and blending, the total-variation term, seeded
jitter, and the projected gradient loop of the two mask-optimisation methods (gradients
are taken with respect to the mask only, never accumulated on the model's parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from trustmap.core.validation import positive_int

# Rows per forward pass when ``batch_size`` is None: as many rows as hold about 4 M voxels
# (128 rows of 128 x 128 ... 16 rows of 64^3), at most 64.
_VOXEL_BUDGET = 1 << 22
_MAX_ROWS = 64


def per_dim(
    name: str, value: object, spatial: Sequence[int], *, allow_larger: bool = False
) -> tuple[int, ...]:
    """``value`` (a positive int, or one per spatial dimension) as a tuple of ints.

    Raises ValueError if a size is not a positive integer or (unless ``allow_larger``)
    exceeds the image.
    """
    ndim = len(spatial)
    if isinstance(value, (bool, str)) or not isinstance(value, (int, Sequence)):
        raise TypeError(
            f"{name} must be a positive int or a sequence of {ndim} ints, got {value!r}"
        )
    if isinstance(value, int):
        sizes = (value,) * ndim
    else:
        sizes = tuple(value)
        if len(sizes) != ndim or any(isinstance(v, bool) or not isinstance(v, int) for v in sizes):
            raise ValueError(
                f"{name} must be a positive int or {ndim} ints (one per spatial dimension), "
                f"got {value!r}"
            )
    if any(v < 1 for v in sizes):
        raise ValueError(f"{name} must be positive, got {value!r}")
    too_big = [(v, s) for v, s in zip(sizes, spatial) if v > s]
    if too_big and not allow_larger:
        raise ValueError(
            f"{name} {sizes} is larger than the image {tuple(spatial)}; use at most the "
            "image size in every dimension"
        )
    return sizes


def number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or v > high
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def rows_per_pass(batch_size: object, x: torch.Tensor) -> int:
    """Rows per forward pass: ``batch_size``, or a default from the voxels per row."""
    if batch_size is not None:
        return positive_int("batch_size", batch_size)
    per_row = max(1, math.prod(x.shape[1:]))
    return max(1, min(_MAX_ROWS, _VOXEL_BUDGET // per_row))


def resize(m: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(R, 1, *grid)`` to ``(R, 1, *size)``, bilinear (2D) or trilinear (3D)."""
    if tuple(m.shape[2:]) == tuple(size):
        return m
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(m, size=tuple(size), mode=mode, align_corners=False)


def blend(x: torch.Tensor, baseline: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x * m + baseline * (1 - m)``: ``m = 1`` keeps the voxel, ``m = 0`` perturbs it."""
    return baseline + m * (x - baseline)


def total_variation(m: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum_axes mean |d m / d axis|^beta`` per row of ``(R, 1, *grid)``, shape ``(R,)``.

    Means instead of sums keep the weight independent of the mask resolution.
    """
    r = m.shape[0]
    total = m.new_zeros(r)
    for axis in range(2, m.ndim):
        if m.shape[axis] < 2:
            continue
        d = torch.diff(m, dim=axis).abs()
        total = total + (d**beta if beta != 1 else d).reshape(r, -1).mean(1)
    return total


def jitter_shifts(gen: torch.Generator, jitter: int, ndim: int) -> tuple[int, ...]:
    """One random shift in ``[-jitter, jitter]`` per spatial axis (drawn on the CPU)."""
    if jitter == 0:
        return (0,) * ndim
    return tuple(int(v) for v in torch.randint(-jitter, jitter + 1, (ndim,), generator=gen))


def roll(x: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """Roll the spatial axes of ``(R, C, *spatial)`` by ``shifts`` (no copy when all 0)."""
    if not any(shifts):
        return x
    return torch.roll(x, shifts=shifts, dims=tuple(range(2, x.ndim)))


def projected_adam(
    start: torch.Tensor,
    loss: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    n_iter: int,
    lr: float,
) -> torch.Tensor:
    """Minimise ``loss(p, t)`` over ``p`` in ``[0, 1]`` by Adam, clipping after each step.

    ``loss`` returns a scalar, the sum of independent per-row losses: Adam's update is
    elementwise, so every row is optimised exactly as if it were alone. Gradients are
    taken with :func:`torch.autograd.grad` with respect to ``p`` only, so nothing is
    accumulated in the model's ``.grad`` attributes.
    """
    p = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    for t in range(n_iter):
        (grad,) = torch.autograd.grad(loss(p, t), p)
        p.grad = grad
        opt.step()
        p.grad = None
        with torch.no_grad():
            p.clamp_(0.0, 1.0)
    return p.detach()
