"""RISE (Petsiuk, Das and Saenko 2018): randomized input sampling for explanation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.seeding import generator, resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import positive_int
from trustmap.methods.perturbation._common import perturbation_baseline, score_perturbations
from trustmap.methods.perturbation._mask_optim import (
    blend,
    number,
    per_dim,
    resize,
    rows_per_pass,
)

# The paper's masks are drawn on a 7 x 7 grid for 224 x 224 images.
DEFAULT_GRID = 7


def default_cells(spatial: Sequence[int]) -> tuple[int, ...]:
    """Cell size per dimension when ``cell`` is None: the image split into 7 cells."""
    return tuple(max(1, math.ceil(s / DEFAULT_GRID)) for s in spatial)


def draw_masks(
    n: int, cells: Sequence[int], spatial: Sequence[int], p: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of ``n`` RISE masks, drawn on the CPU from ``gen``.

    Returns ``(grids, shifts)``: binary grids ``(n, 1, *nodes)`` with ``P(1) = p`` and
    ``nodes = ceil(size / cell) + 1`` per dimension, and integer shifts ``(n, ndim)`` in
    ``[0, cell)``. Drawing on the CPU makes the masks the same on every device and for
    every ``batch_size``; both tensors are small (one entry per cell).
    """
    nodes = tuple(math.ceil(s / c) + 1 for s, c in zip(spatial, cells))
    grids = (torch.rand((n, 1, *nodes), generator=gen, dtype=torch.float64) < p).to(torch.float64)
    shifts = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in cells], dim=1)
    return grids, shifts


def render_masks(
    grids: torch.Tensor,
    shifts: torch.Tensor,
    cells: Sequence[int],
    spatial: Sequence[int],
    like: torch.Tensor,
) -> torch.Tensor:
    """Smooth masks ``(k, 1, *spatial)`` from binary grids: each grid ``(1, *nodes)`` is
    upsampled (bi/trilinear) to ``nodes * cell`` voxels, one cell per node, and cropped
    to the image at its shift. Dtype and device follow ``like``."""
    grids = grids.to(like.device, like.dtype)
    up = tuple(g * c for g, c in zip(grids.shape[2:], cells))
    big = resize(grids, up)
    out = torch.empty((grids.shape[0], 1, *spatial), dtype=like.dtype, device=like.device)
    for i, shift in enumerate(shifts.tolist()):
        window = tuple(slice(s, s + n) for s, n in zip(shift, spatial))
        out[i] = big[(i, slice(None), *window)]
    return out


@register(
    "rise",
    family="perturbation",
    summary="score-weighted average of random smooth binary masks (one map per sample)",
    paper="Petsiuk, Das, Saenko 2018, RISE: randomized input sampling for explanation of "
    "black-box models",
    output="single",
)
class RISE(Explainer):
    """RISE: ``S(v) = 1 / (n p) * sum_i f(x * M_i + b * (1 - M_i)) * M_i(v)``.

    ``f`` is the target score (the logit for a classifier; pass a callable target such as
    ``lambda out: out.softmax(1)[:, c]`` to weight by probabilities, as in the paper), ``b``
    the baseline, and ``M_i`` random smooth masks: a binary grid with one node per
    ``cell`` voxels (``ceil(size / cell) + 1`` nodes per dimension, each node 1 with
    probability ``p``), upsampled bilinearly (2D) or trilinearly (3D) to
    ``(ceil(size / cell) + 1) * cell`` voxels and cropped to the image at a random shift
    in ``[0, cell)`` per dimension. Since ``E[M(v)] = p``, dividing by ``n p`` makes
    ``S`` the expected score given that voxel ``v`` is kept (Petsiuk et al. 2018, eq. 6).
    Borys et al. 2023, section 2.1.

    All samples of a batch share the same masks, so a sample's map does not depend on the
    rest of the batch. Returns ``(B, 1, *spatial)``.

    Parameters
    ----------
    n_samples:
        Number of masks ``n`` (4000 in the paper for ResNet-50).
    cell:
        Cell size in voxels, an int or one per spatial dimension; ``None`` splits each
        dimension into 7 cells (the paper's 7 x 7 grid).
    p:
        Probability that a grid node keeps its cell, in ``(0, 1]`` (0.5 in the paper).
    baseline:
        Value of removed voxels: a number, ``"zeros"``, ``"mean"``, ``"blur"``,
        ``"noise"`` or a tensor broadcastable to ``x`` (the paper uses zeros).
    batch_size:
        Perturbed rows per forward pass (default: about 4 M voxels' worth, at most 64).
    seed:
        Seeds the masks (and the ``"noise"`` baseline); ``None`` draws one and reports it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_samples: int = 4000,
        cell: int | Sequence[int] | None = None,
        p: float = 0.5,
        baseline: str | float | torch.Tensor = "zeros",
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.n_samples = n_samples
        self.cell = cell
        self.p = p
        self.baseline = baseline
        self.batch_size = batch_size
        self.seed = seed

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        n = positive_int("n_samples", self.n_samples)
        p = number("p", self.p, low=0.0, high=1.0, low_open=True)
        b, _, *spatial = x.shape
        cells = default_cells(spatial) if self.cell is None else per_dim("cell", self.cell, spatial)
        rows = rows_per_pass(self.batch_size, x)
        seed = resolve_seed(self.seed)
        base = perturbation_baseline(x, self.baseline, generator=generator(seed, x.device))
        output, resolved = self.output_and_target(x, target)

        grids, shifts = draw_masks(n, cells, spatial, p, generator(seed))
        saliency = torch.zeros((b, math.prod(spatial)), dtype=x.dtype, device=x.device)
        per_pass = max(1, rows // b)
        for start in range(0, n, per_pass):
            stop = min(n, start + per_pass)
            masks = render_masks(grids[start:stop], shifts[start:stop], cells, spatial, x)
            k = stop - start

            def make_batch(sl: slice, masks: torch.Tensor = masks) -> tuple:
                r = torch.arange(sl.start, sl.stop, device=x.device)
                mask_of, sample_of = r // b, r % b
                return blend(x[sample_of], base[sample_of], masks[mask_of]), sample_of

            scores = score_perturbations(self.forward, make_batch, k * b, resolved, rows)
            scores = scores.to(x.dtype).reshape(k, b)
            saliency += scores.T @ masks.reshape(k, -1)
        saliency = (saliency / (n * p)).reshape(b, 1, *spatial)
        return saliency, output, resolved, {"seed": seed, "cell": list(cells)}
