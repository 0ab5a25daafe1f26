"""PatternNet (Kindermans et al. 2018)."""

from __future__ import annotations

from trustmap.core.registry import register
from trustmap.methods.relevance._patterns import PatternExplainer


@register(
    "pattern_net",
    family="relevance",
    summary="signal estimate: the output propagated back with learned signal patterns "
    "in place of the weights",
    paper="Kindermans et al. 2018, Learning how to explain neural networks: PatternNet "
    "and PatternAttribution",
)
class PatternNet(PatternExplainer):
    """PatternNet: the signal of the target neuron in input space, ``s = A^T s_out``
    layer by layer with ``A`` the patterns ``a = cov(x, y) / (w^T cov(x, y))`` (``a+`` for
    active ReLU neurons), ReLUs gating as in the forward pass, starting from the target
    score.

    For a linear model of data ``x = a s + d`` it recovers the signal direction ``a``,
    where the gradient returns the filter ``w`` that also cancels the distractor ``d``.
    Call ``fit(data)`` with a sample of inputs before explaining (returns the
    explainer); see :class:`~trustmap.methods.relevance._patterns.PatternExplainer` for
    the ``data`` fallback and the parameters.
    """

    attribution = False
