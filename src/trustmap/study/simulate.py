"""Simulated readers with a known method effect, reader noise and order effects.

For planning (how likely is a study of this size to detect a given effect?) and for
testing the analysis on data whose truth is known. A simulated rating is

    round(effect[method] + bias[reader] + difficulty[case]
          + noise * (sqrt(rho) * u[reader, case, method] + sqrt(1 - rho) * v[..., criterion])
          + drift * (position - 1/2) + first_slot * [slot == 0]),

clipped to the scale, with ``bias ~ N(0, reader_bias)``, ``difficulty ~ N(0, case_sd)``,
``u, v ~ N(0, 1)``: ``rho`` makes a panel's ratings on different criteria correlate (a
general factor, as Katzmann et al. 2021 found), ``drift`` is a change over the sequence
(fatigue) and ``first_slot`` a bonus for the panel shown first (primacy). The simulated
answers follow the study's own blinded layout (its readers, variants, orders).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from trustmap.study.design import Scale, parse_scale, rating_layout, reader_variants

__all__ = ["SimulationSpec", "design_frame", "parse_effects", "power", "simulate_ratings"]


@dataclass(frozen=True)
class SimulationSpec:
    """The truth behind simulated readers (see the module docstring), in scale units."""

    method_effects: Mapping[str, float] = field(default_factory=dict)
    reader_noise: float = 1.0
    reader_bias: float = 0.5
    case_sd: float = 0.5
    criterion_corr: float = 0.7
    drift: float = 0.0
    first_slot: float = 0.0

    def validate(self) -> None:
        for name in ("reader_noise", "reader_bias", "case_sd"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.criterion_corr <= 1:
            raise ValueError(f"criterion_corr must lie in [0, 1], got {self.criterion_corr}")
        for name, value in (("drift", self.drift), ("first_slot", self.first_slot)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        for m, e in self.method_effects.items():
            if not math.isfinite(e):
                raise ValueError(f"the effect of {m!r} must be finite, got {e}")

    def effects_for(self, methods: Sequence[str]) -> dict[str, float]:
        """Every method's effect: the given ones, the rest 0; with none given, a linear
        spread from +1.5 (first method) to -1.5 (last)."""
        unknown = sorted(set(self.method_effects) - set(methods))
        if unknown:
            raise ValueError(
                f"an effect is given for {unknown[0]!r}, which is not among the study's "
                f"methods ({', '.join(methods)})"
            )
        if not self.method_effects:
            spread = np.linspace(1.5, -1.5, len(methods)) if len(methods) > 1 else [0.0]
            return {m: float(e) for m, e in zip(methods, spread)}
        return {m: float(self.method_effects.get(m, 0.0)) for m in methods}


def parse_effects(text: str | None) -> dict[str, float]:
    """``"grad_cam=1.5,lrp=-0.5"`` -> ``{"grad_cam": 1.5, "lrp": -0.5}``."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--effect entries look like method=number, got {part.strip()!r}")
    return out


def design_frame(
    methods: Sequence[str],
    n_cases: int,
    n_readers: int,
    criteria: Sequence[str],
    *,
    seed: int = 0,
    n_classes: int = 2,
) -> pd.DataFrame:
    """A study's rating layout without a study file (for planning): one row per panel
    with ``reader, variant, seq, n_questions, case, label, label_name, criterion,
    method, slot``, laid out exactly as ``create_study`` would."""
    plan = rating_layout(n_cases, len(methods), n_readers, criteria, seed)
    variants = reader_variants(n_readers)
    n_questions = n_cases * len(criteria)
    rows = [
        {
            "reader": q.reader,
            "variant": variants[q.reader],
            "seq": q.seq,
            "n_questions": n_questions,
            "case": q.case,
            "label": q.case % n_classes,
            "label_name": str(q.case % n_classes),
            "criterion": q.criterion,
            "method": methods[m],
            "slot": slot,
        }
        for q in plan
        for slot, m in enumerate(q.slots)
    ]
    return pd.DataFrame(rows)


def simulate_ratings(
    frame: pd.DataFrame,
    spec: SimulationSpec,
    *,
    scale: Scale | str | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Integer ratings for every row of ``frame`` (needs ``reader, case, method,
    criterion, slot, seq, n_questions``), drawn from ``spec``."""
    spec.validate()
    sc = parse_scale(scale)
    methods = sorted(frame["method"].unique())
    effects = spec.effects_for(methods)
    rng = np.random.default_rng(seed)
    readers = np.sort(frame["reader"].unique())
    cases = np.sort(frame["case"].unique())
    crits = list(dict.fromkeys(frame["criterion"]))
    r = np.searchsorted(readers, frame["reader"].to_numpy())
    c = np.searchsorted(cases, frame["case"].to_numpy())
    m = pd.Index(methods).get_indexer(frame["method"])
    k = pd.Index(crits).get_indexer(frame["criterion"])
    bias = rng.normal(0, spec.reader_bias, len(readers))
    difficulty = rng.normal(0, spec.case_sd, len(cases))
    shared = rng.normal(0, 1, (len(readers), len(cases), len(methods)))
    unique = rng.normal(0, 1, (len(readers), len(cases), len(methods), len(crits)))
    rho = spec.criterion_corr
    noise = spec.reader_noise * (
        math.sqrt(rho) * shared[r, c, m] + math.sqrt(1 - rho) * unique[r, c, m, k]
    )
    position = frame["seq"].to_numpy() / np.maximum(frame["n_questions"].to_numpy() - 1, 1)
    latent = (
        np.asarray([effects[x] for x in methods])[m]
        + bias[r]
        + difficulty[c]
        + noise
        + spec.drift * (position - 0.5)
        + spec.first_slot * (frame["slot"].to_numpy() == 0)
    )
    return np.clip(np.round(latent), sc.low, sc.high).astype(int)


def power(
    frame: pd.DataFrame,
    spec: SimulationSpec,
    *,
    n_sim: int,
    scale: Scale | str | None = None,
    seed: int = 0,
    alpha: float = 0.05,
    order: bool = True,
) -> dict[str, Any]:
    """Monte-Carlo power of the study's layout under ``spec``.

    Per criterion and method, the fraction of ``n_sim`` simulated studies in which the
    paper's t-test (z-adjusted scores, best planted method against the method, ``t(N -
    2)``) is significant at ``alpha``; how often the z-adjusted means put the methods in
    the planted order (``ranking``) and the planted best first (``best``); and how often
    the order-effect check reports an effect (its power when one is planted, its false
    alarm rate when none is; ``order=False`` skips that part, the slowest).
    """
    from trustmap.study.analysis import _paired, order_effects, z_adjust
    from trustmap.trust.stats import _quiet

    if isinstance(n_sim, bool) or not isinstance(n_sim, int) or n_sim < 1:
        raise ValueError(f"the number of simulated studies must be >= 1, got {n_sim!r}")
    methods = sorted(frame["method"].unique())
    effects = spec.effects_for(methods)
    planted = sorted(methods, key=lambda x: -effects[x])
    best = planted[0]
    distinct = len(set(effects.values())) == len(methods)
    crits = list(dict.fromkeys(frame["criterion"]))
    hits = {c: dict.fromkeys(methods, 0) for c in crits}
    ranking = top = order_found = 0
    base = frame.assign(
        position=frame["seq"] / np.maximum(frame["n_questions"] - 1, 1),
    )
    for i in range(n_sim):
        df = base.assign(value=simulate_ratings(frame, spec, scale=scale, seed=seed + i))
        df = df.assign(z=z_adjust(df))
        ok_rank = ok_top = True
        for crit in crits:
            means = df[df["criterion"] == crit].groupby(["reader", "method"])["z"].mean().unstack()
            overall = means.mean()
            got = list(overall.sort_values(ascending=False, kind="stable").index)
            ok_rank &= got == planted
            ok_top &= got[0] == best
            for method in methods:
                if method == best:
                    continue
                with _quiet():  # equal per-reader means in tiny studies make scipy warn
                    test = _paired(means[best].to_numpy(), means[method].to_numpy())
                if test["p"] is not None and test["p"] < alpha and (test["t"] or 0) > 0:
                    hits[crit][method] += 1
        ranking += ok_rank
        top += ok_top
        if order:
            order_found += order_effects(df.drop(columns="z"), alpha=alpha)["found"]
    return {
        "n_sim": n_sim,
        "alpha": alpha,
        "effects": effects,
        "best": best,
        "power": {c: {m: hits[c][m] / n_sim for m in methods if m != best} for c in crits},
        "ranking": ranking / n_sim if distinct else None,
        "best_first": top / n_sim,
        "order_effect_reported": order_found / n_sim if order else None,
        "spec": {
            "reader_noise": spec.reader_noise,
            "reader_bias": spec.reader_bias,
            "case_sd": spec.case_sd,
            "criterion_corr": spec.criterion_corr,
            "drift": spec.drift,
            "first_slot": spec.first_slot,
        },
    }
