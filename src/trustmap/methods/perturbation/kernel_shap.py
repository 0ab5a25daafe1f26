"""KernelSHAP (Lundberg and Lee 2017): Shapley values of segments by weighted regression."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.seeding import resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.perturbation._coalitions import (
    constrained_wls,
    positive_samples,
    seed_generator,
    segment_extra,
    segment_map,
    setup_game,
)

# Enumerating every coalition is possible only for few players; beyond this the exact
# branch would never be asked for (2**30 forward passes).
MAX_EXACT_PLAYERS = 30
# Draws per requested coalition before sampling gives up on finding new ones.
MAX_DRAWS_PER_SAMPLE = 50


def shapley_kernel(m: int, k: int) -> float:
    """Shapley kernel weight of one coalition of ``k`` of ``m`` players:
    ``(M - 1) / (C(M, k) k (M - k))`` (Lundberg and Lee 2017, theorem 2)."""
    return (m - 1) / (math.comb(m, k) * k * (m - k))


def _bits(codes: np.ndarray, m: int) -> np.ndarray:
    return ((codes[:, None] >> np.arange(m, dtype=np.int64)) & 1).astype(bool)


def kernel_shap_design(
    m: int, budget: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Coalitions (``(n, M)`` bool, neither empty nor full) and their regression weights.

    * ``budget >= 2^M - 2``: every coalition, each with its Shapley kernel weight; the
      constrained regression then returns the exact Shapley values.
    * Otherwise the kernel's mass is split over coalition sizes, ``(M - 1) / (k (M - k))``
      for size ``k``. Sizes are taken in complementary pairs ``(k, M - k)`` from the
      outside in; a pair whose share of the remaining budget covers all its coalitions is
      enumerated (exact weights). The remaining sizes are sampled: a size from their
      mass, a uniform subset of that size, and its complement (paired sampling). Repeats
      are evaluated once and weighted by how often they were drawn, the sampled weights
      summing to the sampled sizes' mass (the `shap` package's scheme).

    Returns ``(coalitions, weights, exact)``.
    """
    if m < 2:
        return np.zeros((0, m), dtype=bool), np.zeros(0), True
    if m <= MAX_EXACT_PLAYERS and budget >= 2**m - 2:
        codes = np.arange(1, 2**m - 1, dtype=np.int64)
        z = _bits(codes, m)
        sizes = z.sum(1)
        per_size = [0.0] + [shapley_kernel(m, k) for k in range(1, m)] + [0.0]
        weights = np.array(per_size)[sizes]
        return z, weights, True

    mass = np.array([0.0] + [(m - 1) / (k * (m - k)) for k in range(1, m)])
    mass /= mass.sum()
    rows: list[np.ndarray] = []
    weights: list[float] = []
    left_budget, left_mass = budget, 1.0
    first_sampled = 1
    for k in range(1, m // 2 + 1):
        paired = k != m - k
        n_sub = math.comb(m, k) * (2 if paired else 1)
        share = mass[k] + (mass[m - k] if paired else 0.0)
        if n_sub > left_budget or left_budget * share / left_mass < n_sub - 1e-9:
            break
        for combo in itertools.combinations(range(m), k):
            z = np.zeros(m, dtype=bool)
            z[list(combo)] = True
            rows.append(z)
            weights.append(mass[k] / math.comb(m, k))
            if paired:
                rows.append(~z)
                weights.append(mass[m - k] / math.comb(m, m - k))
        left_budget -= n_sub
        left_mass -= share
        first_sampled = k + 1

    if left_budget > 0 and first_sampled <= m // 2:
        pair_sizes = np.arange(first_sampled, m // 2 + 1)
        pair_mass = np.array([mass[k] + (mass[m - k] if k != m - k else 0.0) for k in pair_sizes])
        counts: dict[bytes, int] = {}
        drawn: dict[bytes, np.ndarray] = {}
        max_draws = MAX_DRAWS_PER_SAMPLE * left_budget + 100
        draws = 0
        probs = torch.as_tensor(pair_mass / pair_mass.sum())
        while len(drawn) < left_budget and draws < max_draws:
            chunk = max(16, left_budget - len(drawn))
            size_idx = torch.multinomial(probs, chunk, replacement=True, generator=generator)
            order = torch.rand((chunk, m), generator=generator).argsort(1).numpy()
            for j in range(chunk):
                draws += 1
                k = int(pair_sizes[int(size_idx[j])])
                z = np.zeros(m, dtype=bool)
                z[order[j, :k]] = True
                # Paired sampling: the complement (size M - k) goes with every draw, for
                # k = M / 2 too, so that pairwise interactions cancel in the regression.
                for member in (z, ~z):
                    key = np.packbits(member).tobytes()
                    if key in drawn:
                        counts[key] += 1
                    elif len(drawn) < left_budget:
                        drawn[key] = member
                        counts[key] = 1
                if len(drawn) >= left_budget:
                    break
        total = sum(counts.values())
        for key, member in drawn.items():
            rows.append(member)
            weights.append(left_mass * counts[key] / total)
    z = np.stack(rows) if rows else np.zeros((0, m), dtype=bool)
    return z, np.asarray(weights, dtype=np.float64), False


@register(
    "kernel_shap",
    family="perturbation",
    summary="Shapley values of superpixels/supervoxels by efficiency-constrained, "
    "Shapley-kernel-weighted regression over paired coalitions",
    paper="Lundberg and Lee 2017, A unified approach to interpreting model predictions",
    output="single",
)
class KernelShap(Explainer):
    """KernelSHAP: ``phi = argmin sum_z pi(z) (v(z) - v(0) - z.phi)^2`` subject to
    ``sum(phi) = v(1) - v(0)``, ``pi(z) = (M - 1) / (C(M, |z|) |z| (M - |z|))``.

    ``v(z)`` is the target score with only the segments in ``z`` kept, the others at their
    "off" value; ``v(1)`` is the score on ``x``, ``v(0)`` with every segment off (Lundberg
    and Lee 2017, section 4.1; Borys et al. 2023 section 2.1). The efficiency constraint holds
    exactly, so the segment values always add up to the output change. With
    ``n_samples >= 2^M - 2`` every coalition is enumerated and ``phi`` is the exact
    Shapley value; otherwise coalitions are chosen by :func:`kernel_shap_design` (small
    and large sizes enumerated when the budget allows, the rest sampled in complementary
    pairs, repeats evaluated once). The map spreads ``phi`` over each segment's voxels,
    ``(B, 1, *spatial)``.

    Extra params: ``segment_weights`` (per sample, ``phi`` for segments ``0..K_b - 1``),
    ``base_value`` (``v(0)`` per sample), ``exact`` (per sample), ``n_segments``,
    ``n_evaluations`` (model rows evaluated, ``x`` and the all-off input included),
    ``seed``.

    Parameters
    ----------
    n_samples:
        Coalitions evaluated per sample besides the empty and the full one; None:
        ``2 M + 2048`` (the `shap` package's default), capped at ``2^M - 2``.
    segments, segmentation, n_segments, segmentation_params:
        The segments, as in :class:`~trustmap.methods.perturbation.lime.Lime`.
    baseline:
        The "off" value: a number (default 0), ``"zeros"``, ``"mean"``, ``"blur"``,
        ``"noise"``, ``"segment_mean"`` or a tensor.
    batch_size:
        Perturbed inputs per forward pass; None: about 2**20 voxels' worth, at most 64.
    seed:
        Seeds the sampled coalitions (and noise); drawn and reported when None.
    blur_sigma:
        Gaussian sigma in voxels for ``baseline="blur"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_samples: int | None = None,
        segments: torch.Tensor | np.ndarray | None = None,
        segmentation: str = "slic",
        n_segments: int = 50,
        segmentation_params: dict[str, float] | None = None,
        baseline: float | str | torch.Tensor = 0.0,
        batch_size: int | None = None,
        seed: int | None = None,
        blur_sigma: float | None = None,
    ) -> None:
        self.model = model
        self.n_samples = n_samples
        self.segments = segments
        self.segmentation = segmentation
        self.n_segments = n_segments
        self.segmentation_params = segmentation_params
        self.baseline = baseline
        self.batch_size = batch_size
        self.seed = seed
        self.blur_sigma = blur_sigma

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        n = None if self.n_samples is None else positive_samples(self.n_samples)
        seed = resolve_seed(self.seed)
        gen = seed_generator(seed)
        game = setup_game(self, x, target, generator=gen)
        plans = []
        for m in game.seg.counts:
            budget = 2 * m + 2048 if n is None else n
            plans.append(kernel_shap_design(m, budget, gen))
        # Row 0 of every design is the empty coalition v(0).
        designs = [
            torch.from_numpy(np.concatenate([np.zeros((1, z.shape[1]), dtype=bool), z]))
            for z, _, _ in plans
        ]
        scores = game.values(designs)
        phis, bases = [], []
        for i, ((z, w, _), s) in enumerate(zip(plans, scores)):
            v = s.detach().cpu().double().numpy()
            v0, v1 = float(v[0]), float(game.v_full[i])
            m = z.shape[1]
            if m == 1:
                phi = np.array([v1 - v0])
            else:
                phi = constrained_wls(z.astype(np.float64), v[1:] - v0, w, v1 - v0)
            phis.append(phi)
            bases.append(v0)
        extra = segment_extra(game, phis, seed)
        extra.update(base_value=bases, exact=[bool(p[2]) for p in plans])
        return segment_map(game, phis), game.output, game.target, extra
