"""Integrated gradients (Sundararajan et al. 2017)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import chunks, input_gradient
from trustmap.core.registry import register
from trustmap.core.seeding import generator, resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import choice, positive_int

BASELINES = ("zeros", "min", "max", "blur", "uniform")
RULES = ("trapezoid", "gauss_legendre")
_RULE_ALIASES = {"riemann_trapezoid": "trapezoid", "gausslegendre": "gauss_legendre"}


def path_rule(n_steps: int, rule: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``alpha_k`` in [0, 1] and weights ``w_k`` with ``sum_k w_k f(alpha_k) ~ int_0^1 f``.

    ``trapezoid``: ``n_steps`` equally spaced nodes including both ends, trapezoid weights.
    ``gauss_legendre``: Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1].
    """
    if rule == "trapezoid":
        if n_steps < 2:
            raise ValueError("the trapezoid rule needs n_steps >= 2")
        alphas = torch.linspace(0.0, 1.0, n_steps, dtype=torch.float64)
        weights = torch.full((n_steps,), 1.0 / (n_steps - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (n_steps - 1)
    else:
        nodes, w = np.polynomial.legendre.leggauss(n_steps)
        alphas = torch.from_numpy((nodes + 1.0) / 2.0)
        weights = torch.from_numpy(w / 2.0)
    return alphas.to(dtype), weights.to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the spatial axes of ``(B, C, *spatial)`` (reflect pad)."""
    if sigma <= 0:
        return x.clone()
    b, c, *spatial = x.shape
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    conv = {2: F.conv2d, 3: F.conv3d}[len(spatial)]
    out = x.reshape(b * c, 1, *spatial)
    for axis in range(len(spatial)):
        shape = [1] * len(spatial)
        shape[axis] = kernel.numel()
        pad = [0, 0] * len(spatial)
        # F.pad lists padding from the last axis backwards.
        pos = 2 * (len(spatial) - 1 - axis)
        r = min(radius, spatial[axis] - 1)
        pad[pos] = pad[pos + 1] = r
        k = kernel[radius - r : radius + r + 1] if r < radius else kernel
        k = k / k.sum()
        shape[axis] = k.numel()
        out = conv(F.pad(out, pad, mode="reflect") if r > 0 else out, k.view(1, 1, *shape))
    return out.reshape(b, c, *spatial)


def make_baseline(
    x: torch.Tensor,
    baseline: str | float | torch.Tensor,
    *,
    seed: int | None,
    blur_sigma: float | None,
) -> torch.Tensor:
    """The reference input ``x'`` for each sample, same shape as ``x``.

    ``zeros``; ``min``/``max``: the sample's minimum or maximum everywhere; ``blur``: a
    Gaussian-blurred copy (sigma ``blur_sigma`` voxels, default a tenth of the smallest
    spatial size); ``uniform``: uniform noise between the sample's min and max (seeded);
    a number: that constant; a tensor broadcastable to ``x``.
    """
    b = x.shape[0]
    flat = x.reshape(b, -1)
    view = (b,) + (1,) * (x.ndim - 1)
    if isinstance(baseline, torch.Tensor):
        if not baseline.is_floating_point():
            baseline = baseline.to(x.dtype)
        try:
            out = torch.broadcast_to(baseline.to(x.device, x.dtype), x.shape)
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} cannot be broadcast to x's shape "
                f"{tuple(x.shape)}"
            ) from None
        if not bool(torch.isfinite(out).all()):
            raise ValueError("baseline contains NaN or Inf")
        return out.clone()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise ValueError(f"baseline must be finite, got {baseline}")
        return torch.full_like(x, float(baseline))
    choice("baseline", baseline, BASELINES)
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "min":
        return flat.amin(1).view(view).expand_as(x).clone()
    if baseline == "max":
        return flat.amax(1).view(view).expand_as(x).clone()
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else 0.1 * min(x.shape[2:])
        return gaussian_blur(x, float(sigma))
    gen = generator(resolve_seed(seed), x.device)
    lo, hi = flat.amin(1).view(view), flat.amax(1).view(view)
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return lo + u * (hi - lo)


def integrate_path(
    explainer: Explainer,
    x: torch.Tensor,
    baseline: torch.Tensor,
    target: Target,
    *,
    n_steps: int,
    rule: str,
    batch_size: int | None,
) -> torch.Tensor:
    """``(x - x') * sum_k w_k dS/dx (x' + alpha_k (x - x'))`` for a resolved target.

    The ``n_steps * B`` path points are evaluated in chunks of ``batch_size`` rows
    (default ``B``: one step of the whole batch per pass), built lazily so a 3D volume
    never holds all steps in memory.
    """
    b = x.shape[0]
    alphas, weights = path_rule(n_steps, rule, x.dtype)
    alphas, weights = alphas.to(x.device), weights.to(x.device)
    delta = x - baseline
    total = torch.zeros_like(x)
    n_rows = n_steps * b
    row_step = torch.arange(n_rows, device=x.device) // b
    row_sample = torch.arange(n_rows, device=x.device) % b
    for sl in chunks(n_rows, batch_size or b):
        steps, samples = row_step[sl], row_sample[sl]
        shape = (-1,) + (1,) * (x.ndim - 1)
        points = baseline[samples] + alphas[steps].view(shape) * delta[samples]
        grad, _ = input_gradient(explainer.forward, points, target, samples)
        total.index_add_(0, samples, grad * weights[steps].view(shape))
    return delta * total


@register(
    "integrated_gradients",
    family="gradient",
    summary="path integral of gradients from a baseline to x, times (x - baseline)",
    paper="Sundararajan, Taly, Yan 2017, Axiomatic attribution for deep networks",
)
class IntegratedGradients(Explainer):
    """Integrated gradients: ``IG(x) = (x - x') * int_0^1 dS(x' + a (x - x'))/dx da``
    (Huff et al. 2021, section 3.1.3). Completeness: ``sum IG = S(x) - S(x')`` up to the
    quadrature error, which shrinks as ``n_steps`` grows.

    Parameters
    ----------
    n_steps:
        Quadrature nodes (25, as in Arun et al. 2021).
    baseline:
        ``"zeros"``, ``"min"``, ``"max"``, ``"blur"``, ``"uniform"``, a number, or a
        tensor broadcastable to ``x``.
    rule:
        ``"trapezoid"`` (Riemann trapezoid; nodes include both ends) or
        ``"gauss_legendre"``.
    batch_size:
        Path points per forward/backward pass; ``None`` = the input batch size.
    seed:
        For the ``"uniform"`` baseline.
    blur_sigma:
        Gaussian sigma in voxels for the ``"blur"`` baseline.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_steps: int = 25,
        baseline: str | float | torch.Tensor = "zeros",
        rule: str = "trapezoid",
        batch_size: int | None = None,
        seed: int | None = None,
        blur_sigma: float | None = None,
    ) -> None:
        self.model = model
        self.n_steps = n_steps
        self.baseline = baseline
        self.rule = rule
        self.batch_size = batch_size
        self.seed = seed
        self.blur_sigma = blur_sigma

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        n_steps = positive_int("n_steps", self.n_steps)
        rule = choice("rule", _RULE_ALIASES.get(self.rule, self.rule), RULES)
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        extra: dict[str, Any] = {}
        seed = self.seed
        if isinstance(self.baseline, str) and self.baseline == "uniform":
            seed = resolve_seed(self.seed)
            extra["seed"] = seed
        baseline = make_baseline(x, self.baseline, seed=seed, blur_sigma=self.blur_sigma)
        output, resolved = self.output_and_target(x, target)
        attr = integrate_path(
            self, x, baseline, resolved, n_steps=n_steps, rule=rule, batch_size=self.batch_size
        )
        return attr, output, resolved, extra
