"""HiPe, hierarchical perturbation (Cooper, Arandjelovic and Harrison 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import chunks
from trustmap.core.registry import register
from trustmap.core.seeding import generator, resolve_seed
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import choice
from trustmap.methods.perturbation._common import perturbation_baseline, score_perturbations
from trustmap.methods.perturbation._mask_optim import per_dim, rows_per_pass

THRESHOLDS = ("mid_range", "mean")


def default_start_cells(spatial: Sequence[int]) -> tuple[int, ...]:
    """HiPe's first grid: ``2 * max(floor(log4 s), 1)`` cells along a dimension of size s."""
    return tuple(min(s, 2 * max(math.floor(math.log(s) / math.log(4)), 1)) for s in spatial)


def level_cells(
    spatial: Sequence[int], start_cells: Sequence[int], min_window: Sequence[int]
) -> list[tuple[int, ...]]:
    """Cell size per dimension at each level, coarse to fine.

    The first level splits each dimension into ``start_cells`` cells and every level
    halves the cells; a dimension stops refining once its window (two cells) fits in
    ``min_window`` or its cell is one voxel, and the hierarchy ends when every dimension
    has stopped.
    """
    counts = list(start_cells)
    levels = []
    while True:
        cells = tuple(max(1, math.ceil(s / n)) for s, n in zip(spatial, counts))
        levels.append(cells)
        done = [c == 1 or 2 * c <= w for c, w in zip(cells, min_window)]
        if all(done):
            return levels
        counts = [n if d else 2 * n for n, d in zip(counts, done)]


def window_bounds(size: int, cell: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[lo, hi)`` of the windows along one dimension: two cells wide, one cell apart,
    the first starting one cell before the image (so edges get the same coverage)."""
    k = torch.arange(math.ceil(size / cell) + 1, device=device)
    return ((k - 1) * cell).clamp(min=0), ((k + 1) * cell).clamp(max=size)


def window_masks(
    bounds: Sequence[tuple[torch.Tensor, torch.Tensor]],
    index: torch.Tensor,
    spatial: Sequence[int],
) -> torch.Tensor:
    """Boolean masks ``(k, 1, *spatial)`` of the windows with multi-indices ``index``
    ``(k, ndim)``."""
    k = index.shape[0]
    mask = torch.ones((k, *([1] * len(spatial))), dtype=torch.bool, device=index.device)
    for axis, ((lo, hi), size) in enumerate(zip(bounds, spatial)):
        pos = torch.arange(size, device=index.device)
        inside = (pos >= lo[index[:, axis]].unsqueeze(1)) & (pos < hi[index[:, axis]].unsqueeze(1))
        shape = [k] + [1] * len(spatial)
        shape[1 + axis] = size
        mask = mask & inside.view(shape)
    return mask.unsqueeze(1)


def window_maxima(saliency: torch.Tensor, cells: Sequence[int]) -> torch.Tensor:
    """Max of ``saliency`` ``(B, 1, *spatial)`` over every window, ``(B, *windows)``."""
    spatial = saliency.shape[2:]
    pad = []
    for size, c in reversed(list(zip(spatial, cells))):
        total = (math.ceil(size / c) + 2) * c
        pad += [c, total - size - c]
    padded = F.pad(saliency, pad, value=-math.inf)
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[len(spatial)]
    kernel = tuple(2 * c for c in cells)
    out = pool(padded, kernel_size=kernel, stride=tuple(cells))
    counts = tuple(math.ceil(s / c) + 1 for s, c in zip(spatial, cells))
    return out[(slice(None), 0, *(slice(0, n) for n in counts))]


def covered(selected: torch.Tensor, cells: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """``(B, 1, *spatial)``: the voxels inside at least one selected window. Cell ``j``
    lies in windows ``j`` and ``j + 1``, hence the max over pairs of neighbouring windows."""
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[len(spatial)]
    cell_hit = pool(selected.unsqueeze(1).float(), kernel_size=2, stride=1)
    for axis, c in enumerate(cells):
        cell_hit = cell_hit.repeat_interleave(c, dim=2 + axis)
    return cell_hit[(slice(None), slice(None), *(slice(0, n) for n in spatial))] > 0


def occlude_windows(
    forward: Any,
    x: torch.Tensor,
    baseline: torch.Tensor,
    clean: torch.Tensor,
    target: Target,
    cells: Sequence[int],
    selected: torch.Tensor,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score drops ``relu(f(x) - f(x with window w set to the baseline))`` for the
    windows in ``selected`` (``(B, *windows)`` booleans), evaluated in chunks of ``rows``.

    Returns ``(saliency, counts)``: each drop added over its window, ``(B, 1, *spatial)``,
    and the number of windows evaluated per sample.
    """
    b, _, *spatial = x.shape
    bounds = [window_bounds(s, c, x.device) for s, c in zip(spatial, cells)]
    found = selected.nonzero()
    sample_of, index = found[:, 0], found[:, 1:]

    def make_batch(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        s = sample_of[sl]
        mask = window_masks(bounds, index[sl], spatial)
        return torch.where(mask, baseline[s], x[s]), s

    scores = score_perturbations(forward, make_batch, found.shape[0], target, rows)
    drops = (clean[sample_of] - scores.to(x.dtype)).clamp(min=0)
    saliency = torch.zeros((b, 1, *spatial), dtype=x.dtype, device=x.device)
    for sl in chunks(found.shape[0], rows):
        mask = window_masks(bounds, index[sl], spatial).to(x.dtype)
        view = (-1,) + (1,) * (x.ndim - 1)
        saliency.index_add_(0, sample_of[sl], mask * drops[sl].view(view))
    counts = torch.bincount(sample_of, minlength=b)
    return saliency, counts


@register(
    "hipe",
    family="perturbation",
    summary="hierarchical occlusion: coarse windows first, refined only where salient",
    paper="Cooper, Arandjelovic, Harrison 2022, Believe the HiPe: hierarchical perturbation "
    "for fast, robust, and model-agnostic saliency mapping",
    output="single",
)
class HiPe(Explainer):
    """Hierarchical perturbation: ``S = sum_levels sum_w relu(f(x) - f(x_w)) 1_w``, where
    ``x_w`` is ``x`` with window ``w`` set to the baseline.

    Level 0 occludes every window of a coarse grid; each later level halves the cells and
    occludes only the windows whose current saliency reaches the threshold: the
    mid-range ``(min + max) / 2`` or the mean of the map accumulated so far, per sample
    (Cooper et al. 2022; Borys et al. 2023, section 2.1). Windows are two cells wide and one cell
    apart, with hard edges, as in HiPe; the finest level's windows fit in ``min_window``.
    Regions that do not change the output are never refined, so a focused model needs far
    fewer evaluations than occlusion at the finest resolution.

    ``Explanation.params`` reports ``n_evaluations`` (per sample, including the clean
    pass), ``windows_per_level`` (per sample), ``occlusion_evaluations``: what occlusion
    with the finest windows and stride over the whole image would cost, and
    ``finest_region``, ``(B, 1, *spatial)`` booleans: the voxels HiPe examined at the
    finest level.
    All samples' windows of a level are scored in one batched pass. Returns
    ``(B, 1, *spatial)``.

    Parameters
    ----------
    start_cells:
        Cells per dimension at the first level, an int or one per dimension; ``None`` =
        HiPe's ``2 * max(floor(log4 size), 1)`` (6 for 64 to 255 voxels).
    min_window:
        Largest window of the finest level, an int or one per dimension; ``None`` = a
        sixteenth of the smallest spatial size, at least 2. A bound at least the image
        size along a dimension means no refinement along it.
    threshold:
        ``"mid_range"`` (HiPe's default) or ``"mean"``.
    baseline:
        What an occluded window becomes: ``"zeros"`` (HiPe's fade), ``"mean"``,
        ``"blur"``, ``"noise"``, a number or a tensor broadcastable to ``x``. HiPe's
        per-window mean is not offered.
    batch_size:
        Perturbed rows per forward pass (default: about 4 M voxels' worth, at most 64).
    seed:
        For the ``"noise"`` baseline only; ``None`` draws one and reports it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        start_cells: int | Sequence[int] | None = None,
        min_window: int | Sequence[int] | None = None,
        threshold: str = "mid_range",
        baseline: str | float | torch.Tensor = "zeros",
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.start_cells = start_cells
        self.min_window = min_window
        self.threshold = threshold
        self.baseline = baseline
        self.batch_size = batch_size
        self.seed = seed

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        b, _, *spatial = x.shape
        if self.min_window is None:
            window = tuple(min(s, max(2, math.ceil(min(spatial) / 16))) for s in spatial)
        else:
            window = per_dim("min_window", self.min_window, spatial, allow_larger=True)
        if self.start_cells is None:
            start = default_start_cells(spatial)
        else:
            start = per_dim("start_cells", self.start_cells, spatial)
        choice("threshold", self.threshold, THRESHOLDS)
        rows = rows_per_pass(self.batch_size, x)
        extra: dict[str, Any] = {}
        noise_gen = None
        if isinstance(self.baseline, str) and self.baseline == "noise":
            seed = resolve_seed(self.seed)
            noise_gen = generator(seed, x.device)
            extra["seed"] = seed
        base = perturbation_baseline(x, self.baseline, generator=noise_gen)
        with torch.no_grad():
            output = self.forward(x)
        resolved = resolve_target(target, output)
        clean = resolved.scores(output).detach().to(x.dtype)

        saliency = torch.zeros((b, 1, *spatial), dtype=x.dtype, device=x.device)
        per_level = []
        levels = level_cells(spatial, start, window)
        for depth, cells in enumerate(levels):
            counts = tuple(math.ceil(s / c) + 1 for s, c in zip(spatial, cells))
            if depth == 0:
                selected = torch.ones((b, *counts), dtype=torch.bool, device=x.device)
            else:
                selected = window_maxima(saliency, cells) >= _thresholds(
                    saliency, self.threshold
                ).view((b,) + (1,) * len(spatial))
            added, n_eval = occlude_windows(
                self.forward, x, base, clean, resolved, cells, selected, rows
            )
            saliency += added
            per_level.append(n_eval.tolist())
        finest = levels[-1]
        extra.update(
            {
                "finest_region": covered(selected, finest, spatial),
                "min_window": list(window),
                "levels": [list(c) for c in levels],
                "windows_per_level": [list(v) for v in zip(*per_level)],
                "n_evaluations": [1 + sum(v) for v in zip(*per_level)],
                "occlusion_evaluations": math.prod(
                    math.ceil(s / c) + 1 for s, c in zip(spatial, finest)
                ),
            }
        )
        return saliency, output, resolved, extra


def _thresholds(saliency: torch.Tensor, rule: str) -> torch.Tensor:
    flat = saliency.reshape(saliency.shape[0], -1)
    if rule == "mean":
        return flat.mean(1)
    lo, hi = flat.amin(1), flat.amax(1)
    return lo + (hi - lo) / 2
