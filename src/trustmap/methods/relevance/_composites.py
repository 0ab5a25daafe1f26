"""Composites: which LRP rule each layer gets.

A composite maps the three kinds of layer that carry a rule (convolutions, dense layers,
average pooling) to rules, optionally with a special rule for the layer(s) that take the
model input, and with overrides by module name or module type (Kohlbrenner et al. 2020,
"Towards best practice in explaining neural network decisions with LRP").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from trustmap.methods.relevance import _rules as rules
from trustmap.methods.relevance._rules import Rule

KINDS = ("conv", "linear", "pool")

COMPOSITES = (
    "epsilon",
    "epsilon_plus",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "zplus",
    "flat",
)


@dataclass(frozen=True)
class Composite:
    """Rules by layer kind, for the input layer, and by module name or type.

    Lookup order: module name, exact module type, module type by ``isinstance``, the
    input-layer rule (for a layer whose input is the model input), the rule of the kind.
    """

    name: str
    conv: Rule
    linear: Rule
    pool: Rule
    first: Rule | None = None
    by_name: tuple[tuple[str, Rule], ...] = ()
    by_type: tuple[tuple[type, Rule], ...] = ()

    def rule_for(self, name: str, module: nn.Module | None, kind: str, takes_input: bool) -> Rule:
        for key, rule in self.by_name:
            if key == name:
                return rule
        if module is not None:
            for key, rule in self.by_type:
                if type(module) is key:
                    return rule
            for key, rule in self.by_type:
                if isinstance(module, key):
                    return rule
        if takes_input and self.first is not None:
            return self.first
        return {"conv": self.conv, "linear": self.linear, "pool": self.pool}[kind]

    def describe(self) -> str:
        if not self.by_name and not self.by_type:
            return self.name
        parts = [f"{k!r}: {r!r}" for k, r in self.by_name]
        parts += [f"{k.__name__}: {r!r}" for k, r in self.by_type]
        return f"{self.name}({', '.join(parts)})"


def build_composite(
    spec: str | Mapping,
    *,
    epsilon: float,
    gamma: float = 0.25,
    low: object = None,
    high: object = None,
) -> Composite:
    """The composite named ``spec``, or a custom one from a mapping.

    ========================  ==========================================================
    ``epsilon``               epsilon everywhere
    ``epsilon_plus``          z+ in convolutions, epsilon in dense layers
    ``epsilon_gamma_box``     z^B at the input, gamma in convolutions, epsilon in dense
    ``epsilon_alpha2_beta1``  alpha2-beta1 in convolutions, epsilon in dense layers
    ``zplus``                 z+ everywhere
    ``flat``                  flat at the input, then as ``epsilon_plus``
    ========================  ==========================================================

    Average pooling gets epsilon (z+ in ``zplus``). A mapping ``{module name or module
    type: rule}`` builds a custom composite; rules may be given as :class:`Rule` objects or
    by name (``"zplus"``); layers it does not name get epsilon.
    """
    eps = rules.epsilon(epsilon)
    if isinstance(spec, Mapping):
        return _custom(spec, eps)
    if not isinstance(spec, str):
        raise TypeError(
            f"composite must be a name {COMPOSITES} or a mapping from module names/types to "
            f"rules, got {type(spec).__name__}"
        )
    if spec == "epsilon":
        return Composite(spec, eps, eps, eps)
    if spec == "epsilon_plus":
        return Composite(spec, rules.zplus(), eps, eps)
    if spec == "epsilon_gamma_box":
        box = rules.zbox(low, high)
        return Composite(spec, rules.gamma(gamma), eps, eps, first=box)
    if spec == "epsilon_alpha2_beta1":
        return Composite(spec, rules.alpha_beta(2.0, 1.0), eps, eps)
    if spec == "zplus":
        zp = rules.zplus()
        return Composite(spec, zp, zp, zp)
    if spec == "flat":
        return Composite(spec, rules.zplus(), eps, eps, first=rules.flat())
    raise ValueError(f"unknown composite {spec!r}; expected one of {COMPOSITES} or a mapping")


def deep_taylor_composite(low: object = None, high: object = None) -> Composite:
    """Deep Taylor decomposition (Montavon et al. 2017): z+ everywhere, z^B at the input."""
    zp = rules.zplus()
    return Composite("deep_taylor", zp, zp, zp, first=rules.zbox(low, high))


def _custom(spec: Mapping, eps: Rule) -> Composite:
    by_name: list[tuple[str, Rule]] = []
    by_type: list[tuple[type, Rule]] = []
    for key, value in spec.items():
        rule = _as_rule(key, value)
        if isinstance(key, str):
            by_name.append((key, rule))
        elif isinstance(key, type) and issubclass(key, nn.Module):
            by_type.append((key, rule))
        else:
            raise TypeError(
                f"custom composite keys must be module names (str) or nn.Module subclasses, "
                f"got {key!r}"
            )
    return Composite("custom", eps, eps, eps, by_name=tuple(by_name), by_type=tuple(by_type))


def _as_rule(key: object, value: object) -> Rule:
    if isinstance(value, Rule):
        return value
    if isinstance(value, str) and value in rules.RULES:
        return rules.RULES[value]()
    raise TypeError(
        f"the rule for {key!r} must be a Rule (trustmap.methods.relevance.rules) or one of "
        f"{sorted(rules.RULES)}, got {value!r}"
    )
