"""DeepLIFT (Shrikumar, Greenside, Kundaje 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.seeding import resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import choice
from trustmap.methods.gradient.integrated_gradients import make_baseline
from trustmap.methods.relevance._deeplift_rules import (
    MAXPOOL_RULES,
    RULES,
    rescale_gradients,
    reveal_cancel_gradients,
)


def shared_reference(baseline: torch.Tensor) -> torch.Tensor:
    """One row when every sample has the same baseline (the reference pass is then run
    once), else the baseline itself."""
    first = baseline[:1]
    return first if bool((baseline == first).all()) else baseline


@register(
    "deeplift",
    family="relevance",
    summary="differences from a baseline propagated by the rescale or reveal-cancel rule",
    paper="Shrikumar, Greenside, Kundaje 2017, Learning important features through "
    "propagating activation differences",
)
class DeepLift(Explainer):
    """DeepLIFT: ``A = (x - x') * m``, where the multipliers ``m`` replace each
    nonlinearity's derivative by ``(f(z) - f(z')) / (z - z')`` in the chain rule.

    Summation-to-delta: ``sum A = S(x) - S(x')`` for the target score ``S``, exactly
    (up to rounding) for the rescale and reveal-cancel rules, through residual additions,
    concatenation, BatchNorm in eval mode and average pooling; through max pooling too
    with ``maxpool="rescale"``. (Singh et al. 2020 lists the rescale rule among the methods
    without completeness: with respect to IG's path integral it is an approximation, but
    with respect to its own reference its sum is exact.)

    Every ReLU form is handled (``nn.ReLU`` modules, reused or in place, ``F.relu``,
    ``torch.relu``); other elementwise activations (sigmoid, tanh, ELU, softplus, GELU,
    ...) get the same rule. Ops with no rule (softmax, LayerNorm, GroupNorm, products of
    activations) raise a ValueError naming the layer; see
    :mod:`trustmap.methods.relevance._deeplift_rules` for the rules.

    Parameters
    ----------
    baseline:
        The reference ``x'``: ``"zeros"``, ``"min"``, ``"max"``, ``"blur"``,
        ``"uniform"``, a number, or a tensor broadcastable to ``x`` (as
        ``integrated_gradients``).
    rule:
        ``"rescale"`` (section 3.5.2; one forward and one backward pass on ``x`` plus a
        forward pass without gradients on the baseline, one row when it is shared: about
        1.5 times an input-gradient pass on DenseNet121) or ``"reveal_cancel"`` (section
        3.5.3; positive and negative contributions to each neuron treated separately;
        ``x`` and the baseline run as one batch and every layer computes two extra
        convolutions: five to seven times an input-gradient pass).
    maxpool:
        ``"rescale"`` (the change of the max goes to the argmax of the larger window,
        keeping summation-to-delta) or ``"gradient"`` (gradient through the argmax of
        ``x``, as in the authors' implementation).
    seed:
        For the ``"uniform"`` baseline.
    blur_sigma:
        Gaussian sigma in voxels for the ``"blur"`` baseline.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        baseline: str | float | torch.Tensor = "zeros",
        rule: str = "rescale",
        maxpool: str = "rescale",
        seed: int | None = None,
        blur_sigma: float | None = None,
    ) -> None:
        self.model = model
        self.baseline = baseline
        self.rule = rule
        self.maxpool = maxpool
        self.seed = seed
        self.blur_sigma = blur_sigma

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        rule = choice("rule", self.rule, RULES)
        maxpool = choice("maxpool", self.maxpool, MAXPOOL_RULES)
        extra: dict[str, Any] = {}
        seed = self.seed
        if isinstance(self.baseline, str) and self.baseline == "uniform":
            seed = resolve_seed(self.seed)
            extra["seed"] = seed
        baseline = make_baseline(x, self.baseline, seed=seed, blur_sigma=self.blur_sigma)
        if rule == "rescale":
            reference = shared_reference(baseline)
            grad, output, resolved = rescale_gradients(
                self.model, self.name, x, reference, target, maxpool
            )
        else:
            grad, output, resolved = reveal_cancel_gradients(
                self.model, self.name, x, baseline, target, maxpool
            )
        return (x - baseline) * grad, output, resolved, extra
