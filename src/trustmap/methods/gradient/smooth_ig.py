"""Smooth integrated gradients: SmoothGrad around integrated gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.gradient.smoothgrad import SmoothGrad


@register(
    "smooth_ig",
    family="gradient",
    summary="integrated gradients averaged over Gaussian-noised copies of x",
    paper="Smilkov et al. 2017 with Sundararajan et al. 2017 (SIG in Arun et al. 2021)",
)
class SmoothIG(Explainer):
    """Smooth IG (SIG of Arun et al. 2021): ``1/n sum_i IG(x + eps_i)`` with SmoothGrad's noise.

    Takes the parameters of both :class:`SmoothGrad` (``n_samples``, ``noise_level``,
    ``variant``, ``seed``) and of integrated gradients (``n_steps``, ``baseline``,
    ``rule``, ``batch_size``, ``blur_sigma``), and SmoothGrad's ``shift`` against the
    lattice of strided convolutions. Cost: ``n_samples * n_steps`` gradient passes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_samples: int = 25,
        noise_level: float = 0.15,
        variant: str = "mean",
        seed: int | None = None,
        n_steps: int = 25,
        baseline: str | float | torch.Tensor = "zeros",
        rule: str = "trapezoid",
        batch_size: int | None = None,
        blur_sigma: float | None = None,
        shift: int = 0,
    ) -> None:
        self.model = model
        self.n_samples = n_samples
        self.noise_level = noise_level
        self.variant = variant
        self.seed = seed
        self.n_steps = n_steps
        self.baseline = baseline
        self.rule = rule
        self.batch_size = batch_size
        self.blur_sigma = blur_sigma
        self.shift = shift

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        # The noise seed also seeds a "uniform" IG baseline, so one seed reproduces all.
        wrapper = SmoothGrad(
            self.model,
            base="integrated_gradients",
            n_samples=self.n_samples,
            noise_level=self.noise_level,
            variant=self.variant,
            seed=self.seed,
            n_steps=self.n_steps,
            baseline=self.baseline,
            rule=self.rule,
            batch_size=self.batch_size,
            blur_sigma=self.blur_sigma,
            shift=self.shift,
        )
        if self.seed is not None:
            wrapper.base_params["seed"] = self.seed
        return wrapper.attribute(x, target)
