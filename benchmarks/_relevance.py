"""Limits and peers of the LRP methods (``lrp``, ``deep_taylor``).

* **Limit**: one input-gradient pass of the batch (one forward, one backward), target
  1.3x: LRP's z+ and gamma rules need one extra forward convolution per layer (the
  modified weights' output, for the denominators), which no implementation avoids.
* **Peer**: captum's ``LRP`` on a private copy of the model (it writes rules onto the
  modules and reloads the state dict), with the rules of trustmap's default composite
  where captum has them: ``Alpha1_Beta0_Rule`` (z+) in the convolutions and
  ``EpsilonRule(epsilon)`` in the dense layers, captum's epsilon default elsewhere.
  captum has default rules for 2D layers only; the 3D layers and ``nn.Flatten`` (MONAI's
  head) get the same rules set explicitly. captum has no z^B rule, so Deep Taylor's peer is
  captum with z+ in every convolution and dense layer (cost-equivalent, not the same map).

``limit_plan(name, s)`` returns a :class:`_limits.LimitPlan` or None; ``PEERS`` maps the
method names to their :class:`_peers.Peer` lists, in the format of ``_peers.PEERS``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from _limits import LimitPlan, Pass, Setting, input_gradient_pass
from _peers import Peer, Runner

METHODS = ("lrp", "deep_taylor")
LIMIT_FACTOR = 1.3


def limit_plan(name: str, s: Setting) -> LimitPlan | None:
    """One input-gradient pass for the LRP methods, None for any other method."""
    if name not in METHODS:
        return None
    b = s.x.shape[0]
    p = Pass(f"input-gradient pass (B={b})", 1, input_gradient_pass(s))
    return LimitPlan("1 input-gradient pass (forward + backward)", (p,), LIMIT_FACTOR)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_OTHER = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Flatten,
)


def _captum_lrp(zplus_dense: bool) -> Any:
    def build(s: Setting, params: dict[str, Any]) -> Runner:
        from captum.attr import LRP
        from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule

        eps = float(params.get("epsilon", 1e-6))
        model = copy.deepcopy(s.model)

        def run() -> object:
            # captum deletes the rules after every call; setting them is part of its cost.
            for module in model.modules():
                if isinstance(module, _CONV):
                    module.rule = Alpha1_Beta0_Rule()
                elif isinstance(module, nn.Linear):
                    module.rule = Alpha1_Beta0_Rule() if zplus_dense else EpsilonRule(eps)
                elif isinstance(module, _OTHER):
                    module.rule = EpsilonRule()
            return LRP(model).attribute(s.x, target=s.target)

        return run

    return build


PEERS: dict[str, list[Peer]] = {
    "lrp": [Peer("captum", "LRP, z+ convolutions, epsilon dense", _captum_lrp(False))],
    "deep_taylor": [Peer("captum", "LRP, z+ everywhere (no z^B rule)", _captum_lrp(True))],
}
