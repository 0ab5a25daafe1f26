"""Meaningful perturbation (Fong and Vedaldi 2017): the smallest, smoothest deletion mask."""

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
from trustmap.core.validation import non_negative_int, positive_int
from trustmap.methods.perturbation._common import perturbation_baseline
from trustmap.methods.perturbation._mask_optim import (
    blend,
    jitter_shifts,
    number,
    per_dim,
    projected_adam,
    resize,
    roll,
    total_variation,
)

# The paper learns a 28 x 28 mask for 224 x 224 images: one mask value per 8 voxels.
DEFAULT_MASK_STRIDE = 8


def default_mask_size(spatial: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(1, math.ceil(s / DEFAULT_MASK_STRIDE)) for s in spatial)


@register(
    "meaningful_perturbation",
    family="perturbation",
    summary="optimised smooth deletion mask (blur or constant) with L1 and TV terms; map 1 - m",
    paper="Fong, Vedaldi 2017, Interpretable explanations of black boxes by meaningful "
    "perturbation",
    output="single",
)
class MeaningfulPerturbation(Explainer):
    """Meaningful perturbation, the deletion game:
    ``m* = argmin_m l1 * mean|1 - m| + tv * TV_beta(m) + p_c(x * m + b * (1 - m))``, map
    ``1 - m*``.

    ``m`` in [0, 1] is a low-resolution mask upsampled bilinearly (2D) or trilinearly
    (3D) to the image; ``b`` is a blurred copy of ``x`` (or a constant); ``p_c`` the target's
    probability (softmax for multi-class, sigmoid for a single logit, the raw score for
    region and callable targets); ``TV_beta(m) = sum_axes mean |d m|^beta`` over the
    low-resolution mask. The mask starts at 1 (nothing deleted) and is optimised by Adam,
    projected onto [0, 1] after every step (Fong and Vedaldi 2017, eq. 4; Borys et al. 2023,
    section 2.1). The L1 and TV terms are means over the mask, so their weights do not
    depend on the image size.

    Gradients are taken with respect to the mask only (``torch.autograd.grad``): nothing
    is written to the model's ``.grad``. All samples of a batch are optimised together,
    each exactly as if alone. Returns ``(B, 1, *spatial)``; larger is more salient.

    Parameters
    ----------
    n_iter:
        Adam steps (300 in the paper).
    lr:
        Adam learning rate (0.1 in the paper).
    l1_coeff, tv_coeff, tv_beta:
        Weights of the deletion-area and smoothness terms, and the TV exponent (3).
    mask_size:
        Low-resolution mask shape, an int or one per spatial dimension; ``None`` = one
        value per 8 voxels (28 x 28 for 224 x 224, as in the paper).
    baseline:
        What deleted voxels become: ``"blur"`` (Gaussian, sigma ``blur_sigma``, default a
        tenth of the smallest spatial size), a number, ``"zeros"``, ``"mean"``,
        ``"noise"`` or a tensor broadcastable to ``x``.
    jitter:
        Random shift of the perturbed image by up to this many voxels per step (the paper
        jitters by up to 4 to avoid adversarial masks); 0 turns it off.
    seed:
        For the jitter and the ``"noise"`` baseline; ``None`` draws one and reports it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_iter: int = 300,
        lr: float = 0.1,
        l1_coeff: float = 0.01,
        tv_coeff: float = 0.2,
        tv_beta: float = 3.0,
        mask_size: int | Sequence[int] | None = None,
        baseline: str | float | torch.Tensor = "blur",
        blur_sigma: float | None = None,
        jitter: int = 0,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.n_iter = n_iter
        self.lr = lr
        self.l1_coeff = l1_coeff
        self.tv_coeff = tv_coeff
        self.tv_beta = tv_beta
        self.mask_size = mask_size
        self.baseline = baseline
        self.blur_sigma = blur_sigma
        self.jitter = jitter
        self.seed = seed

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        n_iter = positive_int("n_iter", self.n_iter)
        lr = number("lr", self.lr, low=0.0, low_open=True)
        l1 = number("l1_coeff", self.l1_coeff, low=0.0)
        tv = number("tv_coeff", self.tv_coeff, low=0.0)
        beta = number("tv_beta", self.tv_beta, low=1.0)
        jitter = non_negative_int("jitter", self.jitter)
        if self.blur_sigma is not None:
            number("blur_sigma", self.blur_sigma, low=0.0)
        b, _, *spatial = x.shape
        size = (
            default_mask_size(spatial)
            if self.mask_size is None
            else per_dim("mask_size", self.mask_size, spatial)
        )
        seed = resolve_seed(self.seed)
        base = perturbation_baseline(
            x, self.baseline, generator=generator(seed, x.device), blur_sigma=self.blur_sigma
        )
        output, resolved = self.output_and_target(x, target)
        rows = torch.arange(b, device=x.device)
        jitter_gen = generator(seed)

        def loss(m: torch.Tensor, _t: int) -> torch.Tensor:
            perturbed = blend(x, base, resize(m, spatial))
            perturbed = roll(perturbed, jitter_shifts(jitter_gen, jitter, len(spatial)))
            prob = resolved.probabilities(self.forward(perturbed), rows)
            area = (1 - m).abs().reshape(b, -1).mean(1)
            return (l1 * area + tv * total_variation(m, beta) + prob).sum()

        start = torch.ones((b, 1, *size), dtype=x.dtype, device=x.device)
        mask = projected_adam(start, loss, n_iter=n_iter, lr=lr)
        with torch.no_grad():
            full = resize(mask, spatial)
            final = resolved.probabilities(self.forward(blend(x, base, full)), rows)
        extra = {
            "seed": seed,
            "mask_size": list(size),
            "final_probability": final.tolist(),
            "deleted_fraction": (1 - full).reshape(b, -1).mean(1).tolist(),
        }
        return (1 - full).detach(), output, resolved, extra
