"""SmoothGrad (Smilkov et al. 2017): average any explainer over noisy copies of x."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.base import Explainer, build
from trustmap.core.registry import get_method, register
from trustmap.core.seeding import generator, resolve_seed
from trustmap.core.targets import Target, TargetSpec, take
from trustmap.core.validation import TrustmapWarning, choice, non_negative_int, positive_int

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
    shift: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, Target]:
    """Noisy copies ``x + N(0, sigma^2)``, ``sigma = noise_level * (max(x) - min(x))`` per
    sample, explained by ``base`` with the target resolved once on the clean ``x``.

    ``batch_size`` rows of noisy copies go to the base explainer per call (default: the
    input batch, one noise draw at a time). ``shift > 1`` also translates each noise
    draw by an offset in ``[0, shift)`` per axis before explaining it and moves the map
    back (the draws cycle through all offsets in a seeded random order), which averages
    out the fixed lattice that strided convolutions print on gradients (see
    :func:`stride_lattice`).
    """
    output, resolved = explainer.output_and_target(x, target)
    b = x.shape[0]
    view = (b,) + (1,) * (x.ndim - 1)
    flat = x.reshape(b, -1)
    sigma = noise_level * (flat.amax(1) - flat.amin(1)).view(view)
    gen = generator(seed, x.device)
    per_call = max(1, (batch_size or b) // b)
    phases = None
    if shift > 1:
        # Every draw gets its own offset, and the draws go through all shift**d offsets
        # in a seeded random order, so n_samples = shift**d cancels the lattice exactly.
        phases = torch.randperm(shift ** (x.ndim - 2), generator=generator(seed))
        per_call = 1
    total = total_sq = None
    done = 0
    while done < n_samples:
        k = min(per_call, n_samples - done)
        noise = torch.randn((k, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
        noisy = (x.unsqueeze(0) + noise * sigma.unsqueeze(0)).reshape(k * b, *x.shape[1:])
        rows = torch.arange(b, device=x.device).repeat(k)
        offsets = _phase(phases, done, shift, x.ndim - 2) if phases is not None else []
        if offsets:
            noisy = translate(noisy, offsets)
        maps, _, _, _ = base.attribute(noisy, take(resolved, rows))
        if offsets:
            maps = translate(maps, [-o for o in offsets])
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


def _phase(phases: torch.Tensor, i: int, shift: int, ndim: int) -> list[int]:
    """The offsets of draw ``i``: ``phases[i]`` written in base ``shift``, one digit per axis."""
    code = int(phases[i % len(phases)])
    return [(code // shift**axis) % shift for axis in range(ndim)]


def translate(t: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Move the content of ``(N, C, *spatial)`` by ``offsets`` voxels per spatial axis
    (positive: to higher indices), filling the uncovered border with the edge values."""
    pad: list[int] = []
    for o in reversed(offsets):  # F.pad lists the last axis first
        pad += [max(o, 0), max(-o, 0)]
    padded = F.pad(t, pad, mode="replicate")
    index = tuple(slice(max(-o, 0), max(-o, 0) + n) for o, n in zip(offsets, t.shape[2:]))
    return padded[(slice(None), slice(None), *index)]


def stride_lattice(model: nn.Module) -> int:
    """The period of the lattice that a model's strided convolutions print on input
    gradients: the product of the strides of the convolutions whose kernel size is not a
    multiple of their stride; 1 when there is none.

    Such a convolution reaches some input positions through more kernel taps than their
    neighbours (a 3 x 3 kernel with stride 2 reaches odd rows twice, even rows once), so
    the gradient carries a fixed pattern of that period whatever the image (Odena,
    Dumoulin and Olah 2016, "Deconvolution and checkerboard artifacts"). SmoothGrad
    averages the image-dependent noise away and leaves this pattern as a regular lattice
    of dots; ``shift=`` the period averages it out.
    """
    period = 1
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            for k, s in zip(module.kernel_size, module.stride):
                if s > 1 and k % s:
                    period *= s
                    break
    return period


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
    shift:
        0 (the default, the paper's SmoothGrad) or the period of the model's stride
        lattice (:func:`stride_lattice`, e.g. 8 for ``small_cnn``): each noise draw is
        also translated by an offset below ``shift`` per axis (cycling through all
        ``shift**d`` offsets in a seeded order), which averages out the regular lattice of
        dots that strided 3 x 3 convolutions print on gradients; ``n_samples`` a multiple
        of ``shift**d`` cancels it exactly away from the border.
        With ``shift=0`` on such a model a warning names the period.
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
        shift: int = 0,
        **base_params: Any,
    ) -> None:
        self.model = model
        self.base = base
        self.shift = shift
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
        shift = non_negative_int("shift", self.shift)
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
            shift=shift,
        )
        if shift == 0 and base_cls.family == "gradient":
            period = stride_lattice(self.model)
            if period > 1:
                warnings.warn(
                    f"the model's strided convolutions print a lattice of period {period} "
                    "on gradients, which SmoothGrad leaves as a regular grid of dots (Odena "
                    f"et al. 2016); pass shift={period} to average it out",
                    TrustmapWarning,
                    stacklevel=2,
                )
        return attr, output, resolved, {"seed": seed}


def _init_params(cls: type[Explainer]) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
