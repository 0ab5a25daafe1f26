"""Extremal perturbation (Fong, Patrick and Vedaldi 2019): the best mask of a given area."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.seeding import generator, resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import non_negative_int, positive_int
from trustmap.methods.perturbation._common import perturbation_baseline
from trustmap.methods.perturbation._mask_optim import (
    blend,
    jitter_shifts,
    number,
    projected_adam,
    resize,
    roll,
)

# TorchRay multiplies the area weight by 1.0035 at each of its 800 steps; the same total
# growth is spread over however many steps are asked for.
AREA_GROWTH = 1.0035**800
# TorchRay's area weight applies to 224 x 224 masks; it is rescaled by the number of voxels
# so that the ranking loss pulls each voxel as hard at any resolution.
REFERENCE_VOXELS = 224 * 224
# Temperature of the smooth max: smax_T(z) = sum z e^(z/T) / sum e^(z/T), T = 1/20.
COLDNESS = 20.0
# Parameter nodes along the shortest side by default: 32 in 2D (TorchRay's step 7 on
# 224 x 224), 16 in 3D, where the smooth max visits (2r + 1)^3 neighbours per node.
DEFAULT_NODES = {2: 32, 3: 16}


def kernel_offsets(step: int, sigma: float, ndim: int) -> list[tuple[tuple[int, ...], float]]:
    """Node offsets ``d`` within ``r = 1 + ceil(sigma / step)`` nodes (a ball) and their
    weights ``k(|d| step / sigma)``, ``k(z) = exp(-2 max(z - 1/2, 0)^2)`` (TorchRay's
    kernel: flat out to ``sigma / 2``, then Gaussian)."""
    r = 1 + math.ceil(sigma / step)
    out = []
    for offset in itertools.product(range(-r, r + 1), repeat=ndim):
        dist = math.sqrt(sum(o * o for o in offset))
        if dist <= r:
            z = dist * step / sigma
            out.append((offset, math.exp(-2.0 * max(z - 0.5, 0.0) ** 2)))
    return out


class _SmoothMax(torch.autograd.Function):
    """``m(u) = sum_d z_d(u) e^(c z_d(u)) / sum_d e^(c z_d(u))``, ``z_d(u) = k_d p(u + d)``.

    One autograd node: the neighbours of every node are gathered at once (``(R, K, N)``
    for ``K`` offsets and ``N`` nodes), and the backward pass recomputes them instead of
    keeping them, using ``dm/dz_d = e^(c z_d) (1 + c (z_d - m)) / sum e^(c z)``.
    """

    @staticmethod
    def forward(
        ctx: Any, params: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, r: int
    ) -> torch.Tensor:
        padded = F.pad(params, [r, r] * (params.ndim - 2))
        z, e = _neighbours(padded.flatten(1), index, weights)
        den = e.sum(1)
        m = (z * e).sum(1) / den
        ctx.save_for_backward(padded, index, weights, m, den)
        ctx.r = r
        return m.view(params.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        padded, index, weights, m, den = ctx.saved_tensors
        flat = padded.flatten(1)
        z, e = _neighbours(flat, index, weights)
        g = (grad.flatten(1) / den).unsqueeze(1)
        grad_z = g * e * (1 + COLDNESS * (z - m.unsqueeze(1)))
        grad_flat = torch.zeros_like(flat)
        grad_flat.index_add_(1, index.flatten(), (weights * grad_z).flatten(1))
        r = ctx.r
        core = (slice(None), slice(None), *(slice(r, n - r) for n in padded.shape[2:]))
        return grad_flat.view(padded.shape)[core], None, None, None


def _neighbours(
    flat: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = k_d p(u + d)`` as ``(R, K, N)`` from the flattened padded grid, and
    ``e^(c z)``."""
    z = weights * flat[:, index]
    return z, torch.exp(COLDNESS * z)


def _neighbour_index(
    offsets: list[tuple[tuple[int, ...], float]], nodes: Sequence[int], r: int
) -> torch.Tensor:
    """``(K, N)``: the flat index in the padded grid of node ``u + d`` for each offset
    ``d`` and node ``u``."""
    padded = [n + 2 * r for n in nodes]
    strides = [math.prod(padded[i + 1 :]) for i in range(len(padded))]
    grids = torch.meshgrid(*(torch.arange(n) for n in nodes), indexing="ij")
    base = sum((g + r) * st for g, st in zip(grids, strides)).flatten()
    shift = torch.tensor([sum(o * st for o, st in zip(off, strides)) for off, _ in offsets])
    return shift.unsqueeze(1) + base.unsqueeze(0)


def neighbourhood(
    step: int, sigma: float, nodes: Sequence[int], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(index (K, N), weights (K, 1), r)`` of the smooth max on a grid of ``nodes``."""
    offsets = kernel_offsets(step, sigma, len(nodes))
    r = max(max(abs(o) for o in offset) for offset, _ in offsets)
    index = _neighbour_index(offsets, nodes, r).to(like.device)
    weights = torch.tensor([w for _, w in offsets], dtype=like.dtype, device=like.device)
    return index, weights.unsqueeze(1), r


def smooth_max_mask(
    params: torch.Tensor,
    step: int,
    sigma: float,
    spatial: Sequence[int],
    neighbours: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """The smooth mask ``(R, 1, *spatial)`` of parameters ``(R, 1, *nodes)`` in [0, 1].

    At each node ``u``: ``m(u) = smax_v k(|u - v| step / sigma) p(v)`` over the nodes
    ``v`` within ``r = 1 + ceil(sigma / step)`` nodes (zero outside the image), with the
    smooth max of temperature 1/20 (Fong et al. 2019, section 3.2; see
    :func:`kernel_offsets`). The node values are then interpolated (bi/trilinear) to one
    node per ``step`` voxels and cropped to the image. TorchRay evaluates the kernel at
    every pixel and over a square of offsets; on the node grid, over a ball, a 3D volume
    stays cheap. ``neighbours`` is :func:`neighbourhood`'s result, to reuse across steps.
    """
    nodes = tuple(params.shape[2:])
    if neighbours is None:
        neighbours = neighbourhood(step, sigma, nodes, params)
    m = _SmoothMax.apply(params, *neighbours)
    up = resize(m, tuple(n * step for n in nodes))
    return up[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def area_reference(n: int, area: float, like: torch.Tensor) -> torch.Tensor:
    """The sorted (ascending) binary vector of length ``n`` with ``round(area * n)`` ones."""
    ref = torch.zeros(n, dtype=like.dtype, device=like.device)
    ones = round(area * n)
    if ones:
        ref[n - ones :] = 1
    return ref


@register(
    "extremal_perturbation",
    family="perturbation",
    summary="smooth-max masks of fixed area that best preserve the score; sum over areas",
    paper="Fong, Patrick, Vedaldi 2019, Understanding deep networks via extremal "
    "perturbations and smooth masks",
    output="single",
)
class ExtremalPerturbation(Explainer):
    """Extremal perturbation, the preservation game: for each area ``a``
    ``m_a = argmax_m f(x * m + b * (1 - m)) - lambda * mean((sort(m) - r_a)^2)``,
    map ``sum_a m_a``.

    ``f`` is the target score (the logit for a classifier, as TorchRay's default reward),
    ``b`` a blurred copy of ``x`` (or a constant), ``r_a`` the sorted template with a
    fraction ``a`` of ones: the ranking loss pins the mask's area to ``a`` without fixing
    where it lies (Fong et al. 2019, eq. 6; Borys et al. 2023, section 2.1). Masks come from a
    parameter field through the smooth-max operator (see :func:`smooth_max_mask`), so
    they are smooth blobs of scale ``sigma``. The parameters start at 1 and are optimised
    by Adam, projected onto [0, 1]; ``lambda`` starts at ``area_weight * N / 224^2`` for
    ``N`` voxels (TorchRay's weight is for 224 x 224 masks; the factor keeps the pull on
    each voxel the same at any resolution) and grows geometrically to 16.4 times that
    over the steps (TorchRay: x1.0035 per step over 800 steps). The achieved area (the
    fraction above 0.5) comes within about 20% of ``a`` on CNNs; it cannot go below the
    footprint of one smooth blob (about ``pi (1.1 sigma)^2`` voxels in 2D).

    Several areas are optimised together (one row per sample and area). The map is the
    sum of the masks over the areas, in ``[0, len(areas)]``: a voxel kept by the smallest
    mask scores highest. The individual masks ``(B, A, *spatial)`` are in
    ``Explanation.params["masks"]`` and the fraction of each above 0.5 in
    ``params["achieved_areas"]``.

    Differences from TorchRay: the perturbation blends with one blurred copy instead of a
    per-voxel blur pyramid, jitter is a random shift instead of a horizontal flip (a flip
    swaps left and right in a medical image), and Adam replaces SGD with momentum so that
    the step does not depend on the image size.

    Parameters
    ----------
    areas:
        One area fraction in (0, 1) or several (TorchRay's default 0.1).
    n_iter:
        Optimisation steps (800 in TorchRay).
    lr:
        Adam learning rate.
    area_weight:
        Initial ``lambda`` at 224 x 224 (300 in TorchRay), rescaled as above.
    step:
        Voxels between parameter nodes; ``None``: 32 nodes along the shortest side in 2D
        (7 for 224 x 224, TorchRay's default), 16 in 3D.
    sigma:
        Kernel scale in voxels; ``None`` = ``3 * step`` (TorchRay: 21 for step 7).
    baseline, blur_sigma:
        What removed voxels become (default ``"blur"``; see ``perturbation_baseline``).
    jitter:
        Random shift of the perturbed image by up to this many voxels per step; 0 = off.
    seed:
        For the jitter and the ``"noise"`` baseline; ``None`` draws one and reports it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        areas: float | Sequence[float] = 0.1,
        n_iter: int = 800,
        lr: float = 0.05,
        area_weight: float = 300.0,
        step: int | None = None,
        sigma: float | None = None,
        baseline: str | float | torch.Tensor = "blur",
        blur_sigma: float | None = None,
        jitter: int = 0,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.areas = areas
        self.n_iter = n_iter
        self.lr = lr
        self.area_weight = area_weight
        self.step = step
        self.sigma = sigma
        self.baseline = baseline
        self.blur_sigma = blur_sigma
        self.jitter = jitter
        self.seed = seed

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        areas = _areas(self.areas)
        n_iter = positive_int("n_iter", self.n_iter)
        lr = number("lr", self.lr, low=0.0, low_open=True)
        weight0 = number("area_weight", self.area_weight, low=0.0)
        jitter = non_negative_int("jitter", self.jitter)
        if self.blur_sigma is not None:
            number("blur_sigma", self.blur_sigma, low=0.0)
        b, _, *spatial = x.shape
        step = _step(self.step, spatial)
        sigma = (
            3.0 * step
            if self.sigma is None
            else number("sigma", self.sigma, low=0.0, low_open=True)
        )
        seed = resolve_seed(self.seed)
        base = perturbation_baseline(
            x, self.baseline, generator=generator(seed, x.device), blur_sigma=self.blur_sigma
        )
        output, resolved = self.output_and_target(x, target)

        n_areas = len(areas)
        # Row i is sample i % B at area i // B.
        sample_of = torch.arange(b * n_areas, device=x.device) % b
        xs, bs = x[sample_of], base[sample_of]
        voxels = math.prod(spatial)
        refs = torch.stack([area_reference(voxels, a, x) for a in areas])
        refs = refs.repeat_interleave(b, dim=0)
        nodes = tuple(math.ceil(s / step) for s in spatial)
        jitter_gen = generator(seed)
        hood = neighbourhood(step, sigma, nodes, x)
        growth = AREA_GROWTH ** (1.0 / max(1, n_iter - 1))
        weight0 = weight0 * voxels / REFERENCE_VOXELS

        def loss(p: torch.Tensor, t: int) -> torch.Tensor:
            m = smooth_max_mask(p, step, sigma, spatial, hood)
            perturbed = roll(blend(xs, bs, m), jitter_shifts(jitter_gen, jitter, len(spatial)))
            reward = resolved.scores(self.forward(perturbed), sample_of)
            ranked = m.reshape(m.shape[0], -1).sort(dim=1).values
            area_loss = ((ranked - refs) ** 2).mean(1)
            return (weight0 * growth**t * area_loss - reward).sum()

        start = torch.ones((b * n_areas, 1, *nodes), dtype=x.dtype, device=x.device)
        params = projected_adam(start, loss, n_iter=n_iter, lr=lr)
        with torch.no_grad():
            masks = smooth_max_mask(params, step, sigma, spatial, hood)
            reward = resolved.scores(self.forward(blend(xs, bs, masks)), sample_of)
        masks = masks.reshape(n_areas, b, *spatial).transpose(0, 1)
        achieved = (masks > 0.5).reshape(b, n_areas, -1).to(x.dtype).mean(2)
        extra = {
            "seed": seed,
            "areas": list(areas),
            "step": step,
            "sigma": sigma,
            "masks": masks.detach(),
            "achieved_areas": achieved.tolist(),
            "final_score": reward.reshape(n_areas, b).T.tolist(),
        }
        return masks.sum(1, keepdim=True).detach(), output, resolved, extra


def _areas(value: object) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else (value,)
    if not items:
        raise ValueError("areas is empty; give at least one area fraction in (0, 1)")
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < float(a) < 1.0:
            raise ValueError(f"areas must be fractions in (0, 1), got {value!r}")
        out.append(float(a))
    return tuple(out)


def _step(value: object, spatial: Sequence[int]) -> int:
    if value is None:
        return max(1, round(min(spatial) / DEFAULT_NODES[len(spatial)]))
    step = positive_int("step", value)
    if step > max(spatial):
        raise ValueError(f"step {step} is larger than the image {tuple(spatial)}")
    return step
