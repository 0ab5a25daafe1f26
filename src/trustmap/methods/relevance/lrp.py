"""Layer-wise relevance propagation (LRP) with rules, composites and canonizers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.relevance._composites import build_composite
from trustmap.methods.relevance._lrp_engine import UnsupportedLayerError, lrp_attribution
from trustmap.methods.relevance._rules import (
    Group,
    Rule,
    Term,
    alpha_beta,
    epsilon,
    flat,
    gamma,
    wsquare,
    zbox,
    zplus,
)

# The rules, for custom composites: ``composite={nn.Conv2d: zplus(), "features.conv0":
# zbox(0.0, 1.0)}``.
__all__ = [
    "LRP",
    "Group",
    "Rule",
    "Term",
    "UnsupportedLayerError",
    "alpha_beta",
    "epsilon",
    "flat",
    "gamma",
    "wsquare",
    "zbox",
    "zplus",
]


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


@register(
    "lrp",
    family="relevance",
    summary="layer-wise relevance propagation: the score decomposed layer by layer by rules",
    paper="Bach et al. 2015, On pixel-wise explanations by layer-wise relevance propagation; "
    "Montavon et al. 2019, Layer-wise relevance propagation: an overview",
)
class LRP(Explainer):
    """Layer-wise relevance propagation (Bach et al. 2015).

    The target score is redistributed from the output to the input, layer by layer:
    ``R_j = sum_k a_j rho(w_jk) / (eps + sum_j a_j rho(w_jk)) R_k``, where the rule of each
    layer (its ``rho`` and stabiliser) is chosen by a *composite* (Kohlbrenner et al. 2020).
    Relevance is signed: positive for evidence for the target, negative against it. It is
    (approximately) conserved: the map sums to the score minus what biases and stabilisers
    absorb.

    BatchNorm is merged into the neighbouring convolution or dense layer, residual
    additions split relevance in proportion to their summands and concatenations return
    each part its share (canonization; see :mod:`._canonizers`), so MONAI's DenseNet and
    ResNet work in 2D and 3D. The map costs one forward and one backward pass. A layer
    through which relevance cannot be propagated (GELU, attention, LayerNorm, LSTM, ...)
    raises an error naming it.

    Parameters
    ----------
    model:
        A classifier or segmentation network (``nn.Module``, not TorchScript).
    composite:
        ``"epsilon_plus"`` (default: z+ in convolutions, epsilon in dense layers),
        ``"epsilon"``, ``"epsilon_gamma_box"`` (z^B at the input, gamma in convolutions),
        ``"epsilon_alpha2_beta1"``, ``"zplus"``, ``"flat"`` (flat at the input, then as
        ``epsilon_plus``), or a mapping ``{module name or module type: rule}`` with rules
        from this module (:func:`epsilon`, :func:`zplus`, :func:`gamma`,
        :func:`alpha_beta`, :func:`flat`, :func:`wsquare`, :func:`zbox`) or their names;
        layers it does not name get epsilon.
    epsilon:
        Stabiliser of every epsilon rule.
    gamma:
        Amplification of positive contributions in ``epsilon_gamma_box``.
    low, high:
        Bounds of the input domain for the z^B rule: numbers or tensors broadcastable to
        ``x``; ``None`` takes each sample's minimum and maximum.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        composite: str | Mapping = "epsilon_plus",
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        low: float | torch.Tensor | None = None,
        high: float | torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.composite = composite
        self.epsilon = epsilon
        self.gamma = gamma
        self.low = low
        self.high = high

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        eps = _check_number("epsilon", self.epsilon)
        amplification = _check_number("gamma", self.gamma)
        composite = build_composite(
            self.composite, epsilon=eps, gamma=amplification, low=self.low, high=self.high
        )
        relevance, output, resolved = lrp_attribution(self, x, target, composite, epsilon=eps)
        return relevance, output, resolved, {"composite": composite.describe()}
