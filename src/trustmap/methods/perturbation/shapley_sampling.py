"""Shapley value sampling over segments (Castro, Gomez and Tejada 2009; Strumbelj and
Kononenko 2010), with antithetic permutations."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.seeding import resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import choice
from trustmap.methods.perturbation._coalitions import (
    positive_samples,
    seed_generator,
    segment_extra,
    segment_map,
    setup_game,
)

SAMPLING = ("antithetic", "independent")


def permutations(m: int, n: int, sampling: str, generator: torch.Generator) -> torch.Tensor:
    """``n`` orderings of ``m`` players, ``(n, m)`` long; each one uniformly random.

    ``"antithetic"``: pairs ``(pi, reversed pi)`` (an odd ``n`` ends with an unpaired
    ordering); ``"independent"``: independent uniform permutations.
    """
    out: list[torch.Tensor] = []
    count = 0
    while count < n:
        sigma = torch.randperm(m, generator=generator)
        pair = torch.stack([sigma, sigma.flip(0)]) if sampling == "antithetic" else sigma[None]
        take = min(n - count, pair.shape[0])
        out.append(pair[:take])
        count += take
    return torch.cat(out)


def shapley_from_permutations(perms: torch.Tensor, prefix_values: torch.Tensor) -> torch.Tensor:
    """``phi_j = mean_pi [v(pre_pi(j) + j) - v(pre_pi(j))]``.

    ``prefix_values[i, p]`` is ``v`` of the first ``p`` players of ordering ``i``
    (``(n, m + 1)``, ``p = 0..m``).
    """
    pos = perms.argsort(1)  # pos[i, j]: where player j stands in ordering i
    gain = prefix_values[:, 1:] - prefix_values[:, :-1]  # gain of the player at each position
    return gain.gather(1, pos).mean(0)


@register(
    "shapley_sampling",
    family="perturbation",
    summary="Shapley values of superpixels/supervoxels averaged over antithetic pairs of "
    "random orderings, repeated coalitions evaluated once",
    paper="Castro, Gomez, Tejada 2009, Polynomial calculation of the Shapley value based "
    "on sampling; Strumbelj and Kononenko 2010",
    output="single",
)
class ShapleySampling(Explainer):
    """Shapley sampling: ``phi_s = (1/n) sum_pi [v(P_pi(s) + s) - v(P_pi(s))]`` over ``n``
    orderings ``pi`` of the segments, ``P_pi(s)`` the segments before ``s``.

    ``v(S)`` is the target score with only the segments in ``S`` kept, the others at their
    "off" value (Singh et al. 2020 section 3.1; Castro et al. 2009). Every ordering is uniformly
    random, so the estimate is unbiased, and its marginal gains add up to
    ``v(all) - v(none)`` exactly (efficiency). By default the orderings come in antithetic
    pairs, an ordering and its reverse: segment ``s`` then follows a set ``A`` once and
    its complement once, which cancels every pairwise interaction, so a pair is exact for
    games with at most pairwise interactions and much less variable than two independent
    orderings otherwise. Each distinct coalition is evaluated once (the empty and full ones
    are shared by all orderings), so ``n`` orderings cost at most ``n (M - 1) + 1``
    forward rows per sample besides ``x``; captum's ``ShapleyValueSampling`` needs
    ``n M + 1``. The map spreads ``phi`` over each segment's voxels, ``(B, 1, *spatial)``.

    Extra params: ``segment_weights`` (per sample, ``phi`` for segments ``0..K_b - 1``),
    ``base_value`` (``v(none)`` per sample), ``n_segments``, ``n_evaluations`` (model rows
    evaluated, ``x`` and the all-off input included), ``seed``.

    Parameters
    ----------
    n_samples:
        Orderings per sample (32: 16 antithetic pairs).
    sampling:
        ``"antithetic"`` (random orderings and their reverses) or ``"independent"``.
    segments, segmentation, n_segments, segmentation_params:
        The segments, as in :class:`~trustmap.methods.perturbation.lime.Lime`.
    baseline:
        The "off" value: a number (default 0), ``"zeros"``, ``"mean"``, ``"blur"``,
        ``"noise"``, ``"segment_mean"`` or a tensor.
    batch_size:
        Perturbed inputs per forward pass; None: about 2**20 voxels' worth, at most 64.
    seed:
        Seeds the orderings (and noise); drawn and reported when None.
    blur_sigma:
        Gaussian sigma in voxels for ``baseline="blur"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_samples: int = 32,
        sampling: str = "antithetic",
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
        self.sampling = sampling
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
        n = positive_samples(self.n_samples)
        sampling = choice("sampling", self.sampling, SAMPLING)
        seed = resolve_seed(self.seed)
        gen = seed_generator(seed)
        game = setup_game(self, x, target, generator=gen)
        orders, designs = [], []
        for m in game.seg.counts:
            perms = permutations(m, n, sampling, gen)
            pos = perms.argsort(1)
            # prefix[i, p, j]: player j is among the first p of ordering i (p = 0..m-1;
            # the full coalition p = m is x itself, already scored).
            prefix = pos.unsqueeze(1) < torch.arange(m).view(1, m, 1)
            orders.append(perms)
            designs.append(prefix.reshape(-1, m))
        scores = game.values(designs)
        phis, bases = [], []
        for i, (perms, s) in enumerate(zip(orders, scores)):
            n_i, m = perms.shape
            values = torch.empty((n_i, m + 1), dtype=torch.float64)
            values[:, :m] = s.detach().cpu().double().view(n_i, m)
            values[:, m] = float(game.v_full[i])
            phis.append(shapley_from_permutations(perms, values).numpy())
            bases.append(float(values[0, 0]))
        extra = segment_extra(game, phis, seed)
        extra.update(base_value=bases)
        return segment_map(game, phis), game.output, game.target, extra
