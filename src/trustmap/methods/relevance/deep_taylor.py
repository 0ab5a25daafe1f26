"""Deep Taylor decomposition: z+ in every layer, z^B at the input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.relevance._composites import deep_taylor_composite
from trustmap.methods.relevance._lrp_engine import lrp_attribution
from trustmap.methods.relevance._rules import TINY


@register(
    "deep_taylor",
    family="relevance",
    summary="deep Taylor decomposition: z+ rule in every layer, z^B box rule at the input",
    paper="Montavon et al. 2017, Explaining nonlinear classification decisions with deep "
    "Taylor decomposition",
)
class DeepTaylor(Explainer):
    """Deep Taylor decomposition (Montavon et al. 2017).

    Each neuron's relevance is expanded at a root point in the positive orthant, which
    gives the z+ rule ``R_j = sum_k (a_j w_jk)^+ / sum_j (a_j w_jk)^+ R_k`` in hidden
    layers, and, for pixels bounded by ``low <= x <= high``, the z^B rule
    ``R_i = sum_k (x_i w_ik - l_i w_ik^+ - h_i w_ik^-) / z^B_k R_k`` at the input. Canonized
    like :class:`~trustmap.methods.relevance.lrp.LRP` (BatchNorm merged, residual sums
    split proportionally). Relevance is conserved exactly where the z+ denominators are
    positive; it is meant for positive scores (a negative target score gives a negative
    map).

    Parameters
    ----------
    low, high:
        Bounds of the input domain: numbers or tensors broadcastable to ``x``; ``None``
        takes each sample's minimum and maximum.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        low: float | torch.Tensor | None = None,
        high: float | torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.low = low
        self.high = high

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        composite = deep_taylor_composite(self.low, self.high)
        relevance, output, resolved = lrp_attribution(self, x, target, composite, epsilon=TINY)
        return relevance, output, resolved, {"composite": composite.describe()}
