"""PatternAttribution (Kindermans et al. 2018)."""

from __future__ import annotations

from trustmap.core.registry import register
from trustmap.methods.relevance._patterns import PatternExplainer


@register(
    "pattern_attribution",
    family="relevance",
    summary="relevance propagated back with the weights times the learned signal patterns",
    paper="Kindermans et al. 2018, Learning how to explain neural networks: PatternNet "
    "and PatternAttribution",
)
class PatternAttribution(PatternExplainer):
    """PatternAttribution: the target score propagated back with ``w * a`` in place of
    each layer's weights ``w`` (``a`` the signal pattern, ``a+`` for active ReLU
    neurons): a deep Taylor decomposition whose root points lie along the signal
    direction, ``R_in = (w * a)^T R_out`` layer by layer.

    For one linear layer ``y = w^T x`` the map is ``y (w * a)``. Call ``fit(data)`` with a
    sample of inputs before explaining (returns the explainer); see
    :class:`~trustmap.methods.relevance._patterns.PatternExplainer` for the ``data``
    fallback and the parameters.
    """

    attribution = True
