"""LRP rules as small objects built from callables.

Every rule is written in the *modified gradient* form of Montavon et al. (2019, "Layer-wise
relevance propagation: an overview"): for a layer ``z = W a + b`` and the relevance ``R`` of
its outputs,

    R_in = sum_groups c_g * sum_terms  a_t * (W_t^T (R / stab(z'_g))),
    z'_g = sum_terms (W_t a_t + b_t),

where each *term* replaces the input ``a`` by ``a_t`` (``a``, its positive or negative part,
a bound ``low``/``high`` of the input domain, or ones) and the parameters by ``W_t = m(W)``
(``b_t = m(b)`` where the term keeps the bias). ``stab(z) = z + eps * sign(z)`` with
``sign(0) = 1``. A term contributes relevance to the layer's input ``a`` when ``a_t`` is
derived from ``a``; the bound and ones terms contribute relevance of their own, which only
exists at the model input (these are the input-layer rules z^B, flat and w^2).

The rules (Bach et al. 2015; Montavon et al. 2017, 2019):

========================  ==================================================================
``epsilon(eps)``          ``R_j = sum_k a_j w_jk / (z_k + eps sign z_k) R_k``
``zplus()``               ``R_j = sum_k (a_j w_jk)^+ / sum_j (a_j w_jk)^+ R_k`` (bias ignored)
``gamma(g)``              ``R_j = sum_k (z_jk + g z_jk^+) / sum_j (z_jk + g z_jk^+) R_k``
``alpha_beta(a, b)``      ``R_j = sum_k (a z_jk^+ / sum z^+ - b z_jk^- / sum z^-) R_k``
``flat()``                ``R_j = sum_k 1 / n_k R_k`` (input layer)
``wsquare()``             ``R_j = sum_k w_jk^2 / sum_j w_jk^2 R_k`` (input layer)
``zbox(low, high)``       ``R_j = sum_k (a_j w_jk - l_j w_jk^+ - h_j w_jk^-) / z^B_k R_k``
========================  ==================================================================

with ``z_jk = a_j w_jk`` the contribution of input ``j`` to output ``k``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Inputs a term can use. The first three are derived from the layer's input; the others
# are constants of the input domain whose relevance is added at the model input.
INPUT_DERIVED = ("identity", "positive", "negative")
CONSTANT_INPUTS = ("low", "high", "ones")

ParamModifier = Callable[[torch.Tensor], torch.Tensor]

# A stabiliser small enough not to change any non-degenerate ratio, large enough that a
# zero denominator gives 0 (its numerator is then 0 too) instead of NaN.
TINY = 1e-9


@dataclass(frozen=True)
class Term:
    """One summand ``m(W) a_t (+ m(b))`` of a rule's modified forward pass.

    Parameters
    ----------
    input:
        ``"identity"``, ``"positive"`` (``a.clamp(min=0)``), ``"negative"``
        (``a.clamp(max=0)``), ``"low"``, ``"high"`` (the bounds of the input domain) or
        ``"ones"``.
    weight:
        Modifier applied to the weight (and to the bias if ``bias``); ``None`` leaves the
        parameters unchanged.
    bias:
        Whether the term includes the (modified) bias.
    """

    input: str = "identity"
    weight: ParamModifier | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        if self.input not in INPUT_DERIVED + CONSTANT_INPUTS:
            raise ValueError(
                f"term input must be one of {INPUT_DERIVED + CONSTANT_INPUTS}, got {self.input!r}"
            )

    @property
    def is_plain(self) -> bool:
        """The unmodified layer: its modified output is the layer's own output."""
        return self.input == "identity" and self.weight is None and self.bias


@dataclass(frozen=True)
class Group:
    """Terms that share one denominator ``z'_g``, weighted by ``coefficient``.

    ``sign`` is +1 (or -1) when every contribution of the group is non-negative (or
    non-positive) by construction, so the stabiliser need not look at the sign; 0 if
    unknown.
    """

    coefficient: float
    terms: tuple[Term, ...]
    sign: int = 0


@dataclass(frozen=True)
class Rule:
    """An LRP rule: groups of terms and the stabiliser of their denominators.

    Build rules with :func:`epsilon`, :func:`zplus`, :func:`gamma`, :func:`alpha_beta`,
    :func:`flat`, :func:`wsquare` and :func:`zbox`, or directly from :class:`Group` and
    :class:`Term` objects for a rule of your own.

    ``low`` and ``high`` (z^B only) are the bounds of the input domain: floats, tensors
    broadcastable to the input, or ``None`` for each sample's minimum and maximum.
    """

    name: str
    groups: tuple[Group, ...]
    stabilizer: float = TINY
    low: float | torch.Tensor | None = None
    high: float | torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.groups or any(not g.terms for g in self.groups):
            raise ValueError(f"rule {self.name!r} needs at least one group with terms")
        if not isinstance(self.stabilizer, (int, float)) or self.stabilizer < 0:
            raise ValueError(f"rule {self.name!r}: stabilizer must be >= 0, got {self.stabilizer}")

    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(t for g in self.groups for t in g.terms)

    @property
    def input_layer_only(self) -> bool:
        """True for rules with constant inputs (z^B, flat, w^2): only defined where the
        layer's input is the model's input."""
        return any(t.input in CONSTANT_INPUTS for t in self.terms)

    @property
    def is_plain(self) -> bool:
        """One group of one unmodified term: the epsilon rule."""
        return (
            len(self.groups) == 1
            and len(self.groups[0].terms) == 1
            and self.groups[0].terms[0].is_plain
        )

    def __repr__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------------------
# Parameter modifiers
# ----------------------------------------------------------------------------------------
def positive(p: torch.Tensor) -> torch.Tensor:
    return p.clamp(min=0)


def negative(p: torch.Tensor) -> torch.Tensor:
    return p.clamp(max=0)


def negated_positive(p: torch.Tensor) -> torch.Tensor:
    return -p.clamp(min=0)


def negated_negative(p: torch.Tensor) -> torch.Tensor:
    return -p.clamp(max=0)


def square(p: torch.Tensor) -> torch.Tensor:
    return p * p


def ones(p: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(p)


def _amplified(gamma: float, part: ParamModifier) -> ParamModifier:
    def modifier(p: torch.Tensor) -> torch.Tensor:
        return p + gamma * part(p)

    return modifier


# ----------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------
def _check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def epsilon(eps: float = 1e-6) -> Rule:
    """LRP-epsilon: ``R_j = sum_k a_j w_jk / (z_k + eps sign z_k) R_k`` (bias included)."""
    eps = _check_nonnegative("epsilon", eps)
    return Rule(f"epsilon({eps:g})", (Group(1.0, (Term("identity", None, bias=True),)),), eps)


def zplus(stabilizer: float = TINY) -> Rule:
    """z+ (LRP-alpha1-beta0): only positive contributions ``(a_j w_jk)^+``, bias ignored.

    Positive contributions are positive inputs times positive weights and negative inputs
    times negative weights, so the rule is defined for inputs of either sign.
    """
    terms = (Term("positive", positive), Term("negative", negative))
    return Rule("zplus", (Group(1.0, terms, 1),), _check_nonnegative("stabilizer", stabilizer))


def gamma(gamma: float = 0.25, stabilizer: float = TINY) -> Rule:
    """LRP-gamma: contributions ``z_jk + gamma z_jk^+`` (positive ones amplified); the bias
    becomes ``b + gamma b^+``."""
    g = _check_nonnegative("gamma", gamma)
    terms = (
        Term("positive", _amplified(g, positive), bias=True),
        Term("negative", _amplified(g, negative)),
    )
    return Rule(f"gamma({g:g})", (Group(1.0, terms),), _check_nonnegative("stabilizer", stabilizer))


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = TINY) -> Rule:
    """LRP-alpha-beta: ``alpha`` times the share of positive contributions minus ``beta``
    times the share of negative ones; conservative when ``alpha - beta = 1``. Bias ignored."""
    a = _check_nonnegative("alpha", alpha)
    b = _check_nonnegative("beta", beta)
    pos = (Term("positive", positive), Term("negative", negative))
    neg = (Term("positive", negative), Term("negative", positive))
    groups = (Group(a, pos, 1),) if b == 0 else (Group(a, pos, 1), Group(-b, neg, -1))
    return Rule(f"alpha{a:g}_beta{b:g}", groups, _check_nonnegative("stabilizer", stabilizer))


def flat(stabilizer: float = TINY) -> Rule:
    """Flat rule: each output's relevance is spread uniformly over its receptive field."""
    return Rule("flat", (Group(1.0, (Term("ones", ones),), 1),), stabilizer)


def wsquare(stabilizer: float = TINY) -> Rule:
    """w^2 rule: relevance spread in proportion to the squared weights."""
    return Rule("wsquare", (Group(1.0, (Term("ones", square),), 1),), stabilizer)


def zbox(
    low: float | torch.Tensor | None = None,
    high: float | torch.Tensor | None = None,
    stabilizer: float = TINY,
) -> Rule:
    """z^B (box) rule for inputs bounded by ``low <= x <= high``; ``None`` takes each
    sample's minimum/maximum. ``z^B_k = sum_j a_j w_jk - l_j w_jk^+ - h_j w_jk^-``."""
    terms = (
        Term("identity", None),
        Term("low", negated_positive),
        Term("high", negated_negative),
    )
    # low <= x <= high makes every contribution (x - l) w^+ + (x - h) w^- non-negative.
    return Rule("zbox", (Group(1.0, terms, 1),), stabilizer, low=low, high=high)


RULES: dict[str, Callable[..., Rule]] = {
    "epsilon": epsilon,
    "zplus": zplus,
    "gamma": gamma,
    "alpha_beta": alpha_beta,
    "flat": flat,
    "wsquare": wsquare,
    "zbox": zbox,
}


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = 1``."""
    if eps == 0:
        return z
    # |z| + eps carrying the sign of z: one buffer, no sign tensor (-0.0 gives -eps).
    return z.abs().add_(eps).copysign_(z)


def safe_divide(
    num: torch.Tensor, den: torch.Tensor, eps: float, sign: int = 0, scratch: bool = False
) -> torch.Tensor:
    """``num / stab(den)``, and 0 where the stabilised denominator is still 0.

    ``sign``: the known sign of ``den`` (+1, -1) or 0; ``scratch``: ``den`` may be
    overwritten in place.
    """
    if eps > 0:
        # z + eps sign(z) is never 0 for eps > 0.
        if sign:
            shift = eps if sign > 0 else -eps
            if scratch:
                return torch.div(num, den.add_(shift), out=den)
            return num / (den + shift)
        return num / stabilize(den, eps)
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, 1, den))
