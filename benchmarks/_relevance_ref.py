"""Limits and peers of the reference-based relevance methods: DeepLIFT, DeepSHAP,
GradientSHAP, PatternNet and PatternAttribution.

Hooked into the benchmark by

* ``_limits.limit_plan``: ``plan = relevance_limit_plan(name, params, s)`` before its own
  rules (imported inside the function: this module imports ``_limits``);
* ``_peers.PEERS.update(RELEVANCE_PEERS)``;
* ``methods.BENCH_PARAMS.update(RELEVANCE_BENCH_PARAMS)``;
* ``prepare(name, explainer, s)`` on the explainer before it is timed, which fits the
  pattern methods on the setting's input (otherwise each call fits on its own input,
  and the fit is timed with the explanation).

Limits (target 1.3x):

* ``deeplift``, ``pattern_net``, ``pattern_attribution``: one input-gradient pass of the
  batch. DeepLIFT also needs a forward pass of its reference (one row for a baseline
  shared by all samples), which the limit does not include.
* ``deep_shap``: one input-gradient pass per background sample.
* ``gradient_shap``: one input-gradient pass per draw (``n_samples``).

Peers: captum ``DeepLift`` (same baseline), ``DeepLiftShap`` and ``GradientShap`` (the
same background tensor, drawn as trustmap draws it, the same ``n_samples``, no noise).
"""

from __future__ import annotations

from typing import Any

import torch

from _limits import LimitPlan, Pass, Setting, input_gradient_pass
from _peers import Peer, Runner

RELEVANCE_FACTOR = 1.3

RELEVANCE_BENCH_PARAMS: dict[str, dict[str, Any]] = {
    "deep_shap": {"background": 10, "seed": 0},
    "gradient_shap": {"background": 10, "n_samples": 25, "seed": 0},
}


def _background_size(params: dict[str, Any]) -> int:
    background = params.get("background", 10)
    if isinstance(background, torch.Tensor):
        return 1 if background.ndim == 0 else int(background.shape[0])
    return int(background)


def relevance_limit_plan(name: str, params: dict[str, Any], s: Setting) -> LimitPlan | None:
    """The bare passes of ``name`` with its effective ``params``, or None for other
    methods."""
    b = s.x.shape[0]
    key = f"input-gradient pass (B={b})"
    if name in ("deeplift", "pattern_net", "pattern_attribution"):
        n, what = 1, "forward + backward"
    elif name == "deep_shap":
        n, what = _background_size(params), "one per background sample"
    elif name == "gradient_shap":
        n, what = int(params.get("n_samples", 25)), "one per draw"
    else:
        return None
    plural = "pass" if n == 1 else "passes"
    return LimitPlan(
        f"{n} input-gradient {plural} ({what})",
        (Pass(key, n, input_gradient_pass(s)),),
        RELEVANCE_FACTOR,
    )


def prepare(name: str, explainer: Any, s: Setting) -> None:
    """Fit the pattern methods once on the setting's input before timing them."""
    if name in ("pattern_net", "pattern_attribution"):
        explainer.fit(s.x)


def _background(s: Setting, params: dict[str, Any]) -> torch.Tensor:
    from trustmap.methods.relevance.deep_shap import make_background

    background, _ = make_background(s.x, params.get("background", 10), params.get("seed", 0))
    return background


def _captum_deeplift(s: Setting, params: dict[str, Any]) -> Runner:
    from captum.attr import DeepLift

    from trustmap.methods.gradient.integrated_gradients import make_baseline

    baseline = make_baseline(
        s.x, params.get("baseline", "zeros"), seed=params.get("seed"), blur_sigma=None
    )
    method = DeepLift(s.model)
    return lambda: method.attribute(s.x, baselines=baseline, target=s.target)


def _captum_deep_shap(s: Setting, params: dict[str, Any]) -> Runner:
    from captum.attr import DeepLiftShap

    background = _background(s, params)
    method = DeepLiftShap(s.model)
    return lambda: method.attribute(s.x, baselines=background, target=s.target)


def _captum_gradient_shap(s: Setting, params: dict[str, Any]) -> Runner:
    from captum.attr import GradientShap

    background = _background(s, params)
    method = GradientShap(s.model)
    n = int(params.get("n_samples", 25))

    def run() -> object:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return method.attribute(s.x, baselines=background, target=s.target, n_samples=n)

    return run


RELEVANCE_PEERS: dict[str, list[Peer]] = {
    "deeplift": [Peer("captum", "DeepLift", _captum_deeplift)],
    "deep_shap": [Peer("captum", "DeepLiftShap", _captum_deep_shap)],
    "gradient_shap": [Peer("captum", "GradientShap", _captum_gradient_shap)],
}
