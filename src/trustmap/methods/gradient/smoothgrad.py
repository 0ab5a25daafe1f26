"""SmoothGrad (Smilkov et al. 2017): average any explainer over noisy copies of x."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer, build
from trustmap.core.registry import get_method, register
from trustmap.core.seeding import generator, resolve_seed
from trustmap.core.targets import Target, TargetSpec, take
from trustmap.core.validation import choice, positive_int

VARIANTS = ("mean", "squared", "vargrad")


def smooth(
    explainer: Explainer,
    base: Explainer,
    x: torch.Tensor,
    target: TargetSpec | Target,
    *,
    n_samples: int,
    noise_level: float,
    variant: str,
    seed: int,
    batch_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, Target]:
    """Noisy copies ``x + N(0, sigma^2)``, ``sigma = noise_level * (max(x) - min(x))`` per
    sample, explained by ``base`` with the target resolved once on the clean ``x``.

    ``batch_size`` rows of noisy copies go to the base explainer per call (default: the
    input batch, one noise draw at a time).
    """
    output, resolved = explainer.output_and_target(x, target)
    b = x.shape[0]
    view = (b,) + (1,) * (x.ndim - 1)
    flat = x.reshape(b, -1)
    sigma = noise_level * (flat.amax(1) - flat.amin(1)).view(view)
    gen = generator(seed, x.device)
    per_call = max(1, (batch_size or b) // b)
    total = total_sq = None
    done = 0
    while done < n_samples:
        k = min(per_call, n_samples - done)
        noise = torch.randn((k, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
        noisy = (x.unsqueeze(0) + noise * sigma.unsqueeze(0)).reshape(k * b, *x.shape[1:])
        rows = torch.arange(b, device=x.device).repeat(k)
        maps, _, _, _ = base.attribute(noisy, take(resolved, rows))
        maps = maps.reshape(k, b, *maps.shape[1:])
        s = maps.sum(0)
        total = s if total is None else total + s
        if variant != "mean":
            s2 = (maps * maps).sum(0)
            total_sq = s2 if total_sq is None else total_sq + s2
        done += k
    mean = total / n_samples
    if variant == "mean":
        return mean, output, resolved
    mean_sq = total_sq / n_samples
    if variant == "squared":
        return mean_sq, output, resolved
    return (mean_sq - mean * mean).clamp(min=0), output, resolved


@register(
    "smoothgrad",
    family="gradient",
    summary="any method averaged over Gaussian-noised copies of x (mean, squared, vargrad)",
    paper="Smilkov et al. 2017, SmoothGrad: removing noise by adding noise",
)
class SmoothGrad(Explainer):
    """SmoothGrad: ``M(x) = 1/n sum_i E(x + eps_i)``, ``eps_i ~ N(0, sigma^2)`` with
    ``sigma = noise_level * (max(x) - min(x))``; a wrapper around any registered method
    ``E`` (composition, not inheritance).

    Variants: ``"mean"`` (SmoothGrad), ``"squared"`` (mean of squares, SmoothGrad-Squared,
    Hooker et al. 2019) and ``"vargrad"`` (variance, Adebayo et al. 2018).

    Parameters
    ----------
    base:
        Registered method to smooth (default ``"gradient"``).
    n_samples, noise_level, variant, seed:
        As above; ``seed=None`` draws one and reports it in ``Explanation.params``.
    batch_size:
        Noisy rows per base call; also handed to the base method if it takes one.
    **base_params:
        Parameters of the base method.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        base: str = "gradient",
        n_samples: int = 25,
        noise_level: float = 0.15,
        variant: str = "mean",
        seed: int | None = None,
        batch_size: int | None = None,
        **base_params: Any,
    ) -> None:
        self.model = model
        self.base = base
        self.n_samples = n_samples
        self.noise_level = noise_level
        self.variant = variant
        self.seed = seed
        self.batch_size = batch_size
        self.base_params = base_params

    def output_kind(self) -> str:
        return get_method(self.base).output

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        n_samples = positive_int("n_samples", self.n_samples)
        choice("variant", self.variant, VARIANTS)
        if isinstance(self.noise_level, bool) or not isinstance(self.noise_level, (int, float)):
            raise TypeError(f"noise_level must be a number, got {self.noise_level!r}")
        if not (math.isfinite(self.noise_level) and self.noise_level >= 0):
            raise ValueError(f"noise_level must be a finite number >= 0, got {self.noise_level}")
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        base_cls = get_method(self.base)
        params = dict(self.base_params)
        if self.batch_size is not None and "batch_size" in _init_params(base_cls):
            params.setdefault("batch_size", self.batch_size)
        base = build(base_cls, self.model, params)
        seed = resolve_seed(self.seed)
        attr, output, resolved = smooth(
            self,
            base,
            x,
            target,
            n_samples=n_samples,
            noise_level=float(self.noise_level),
            variant=self.variant,
            seed=seed,
            batch_size=self.batch_size,
        )
        return attr, output, resolved, {"seed": seed}


def _init_params(cls: type[Explainer]) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
