"""GradientSHAP, or expected gradients (Lundberg and Lee 2017; Erion et al. 2021)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import chunks, input_gradient
from trustmap.core.registry import register
from trustmap.core.seeding import generator, resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import positive_int
from trustmap.methods.relevance.deep_shap import make_background


@register(
    "gradient_shap",
    family="relevance",
    summary="expected gradients: gradient at a random point between a background sample "
    "and x, times (x - background), averaged",
    paper="Lundberg, Lee 2017, A unified approach to interpreting model predictions; "
    "Erion et al. 2021, Improving performance of deep learning models with axiomatic "
    "attribution priors and expected gradients",
)
class GradientShap(Explainer):
    """GradientSHAP: ``A = E_{r, a, e}[(x + e - r) * dS/dx(r + a (x + e - r))]``, with ``r`` a
    background sample, ``a ~ U(0, 1)`` and ``e ~ N(0, stdev^2)``, estimated from
    ``n_samples`` draws per sample.

    Additivity in expectation: ``E[sum A] = S(x) - E_r[S(r)]`` when ``stdev = 0`` (the
    expectation over ``a`` is integrated gradients from ``r``). The background samples are
    drawn balanced (each sample's draws cycle through a random permutation of the
    background), so for a linear model and ``n_samples`` a multiple of ``N`` the identity
    holds exactly for each estimate.

    Cost: ``n_samples`` input-gradient passes of the batch, in chunks of ``batch_size``
    rows.

    Parameters
    ----------
    background:
        Reference samples ``(N, C, *spatial)``, ideally from the training data, or an int
        ``n`` of uniform-noise samples drawn as in ``deep_shap``.
    n_samples:
        Draws per sample.
    stdev:
        Standard deviation of the Gaussian noise added to ``x`` at each draw, in the
        input's units (0: none).
    batch_size:
        Rows per forward/backward pass; ``None`` = the input batch size.
    seed:
        For the draws (and a drawn background); drawn from the OS and reported if None.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        background: int | torch.Tensor = 10,
        n_samples: int = 25,
        stdev: float = 0.0,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.background = background
        self.n_samples = n_samples
        self.stdev = stdev
        self.batch_size = batch_size
        self.seed = seed

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        n_samples = positive_int("n_samples", self.n_samples)
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        stdev = self.stdev
        if isinstance(stdev, bool) or not isinstance(stdev, (int, float)):
            raise TypeError(f"stdev must be a number, got {type(stdev).__name__}")
        if not math.isfinite(stdev) or stdev < 0:
            raise ValueError(f"stdev must be finite and >= 0, got {stdev}")
        seed = resolve_seed(self.seed)
        # The background draws its own stream so that a given background tensor and
        # seed give the same draws whether the background was drawn or passed in.
        background, _ = make_background(x, self.background, seed)
        output, resolved = self.output_and_target(x, target)

        b = x.shape[0]
        n_bg = background.shape[0]
        gen = generator(seed + 1, x.device)
        rounds = -(-n_samples // n_bg)
        perms = [torch.randperm(n_bg, generator=gen, device=x.device) for _ in range(b * rounds)]
        # which[s, i]: background sample of draw s for input sample i.
        which = torch.stack(perms).view(b, rounds * n_bg)[:, :n_samples].t().reshape(-1)
        alphas = torch.rand(n_samples * b, generator=gen, device=x.device, dtype=x.dtype)
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=x.device))

        total = torch.zeros_like(x)
        n_rows = n_samples * b
        row_sample = torch.arange(n_rows, device=x.device) % b
        shape = (-1,) + (1,) * (x.ndim - 1)
        for sl in chunks(n_rows, self.batch_size or b):
            samples = row_sample[sl]
            ref = background[which[sl]]
            end = x[samples]
            if stdev > 0:
                # One generator per row, so that batch_size does not change the noise.
                noise = [
                    torch.randn(
                        x.shape[1:],
                        generator=generator(noise_seed + r, x.device),
                        device=x.device,
                        dtype=x.dtype,
                    )
                    for r in range(sl.start, sl.stop)
                ]
                end = end + stdev * torch.stack(noise)
            delta = end - ref
            points = ref + alphas[sl].view(shape) * delta
            grad, _ = input_gradient(self.forward, points, resolved, samples)
            total.index_add_(0, samples, grad * delta)
        return total / n_samples, output, resolved, {"seed": seed}
