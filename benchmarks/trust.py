"""Time paper 004's trust protocol: trustmap against the same protocol assembled from captum,
PAIR ``saliency``, scikit-image and scikit-learn, and against the bare passes it needs.

In one run, on the same prepared models and images, with the same methods and parameters:

1. **Prepare** once (:func:`trustmap.trust.prepare`): the dataset and the five models are
   made (trained the first time, loaded from ``--workdir`` after). Training is not part of
   the comparison; its time is reported apart.
2. **trustmap**: :func:`trustmap.trust.evaluate` with an EMPTY cache (``cfg.out`` is a
   fresh directory every run; ``evaluate`` only uses it for its cache) followed by
   ``write_outputs`` (figures, report, results.json, per_image.csv). XRAI's in-process
   segment memo is cleared first. The run is broken down into exclusive buckets by thin
   timing wrappers around the protocol's own functions (explainer per method,
   post-processing, utility metrics, SSIM, randomized copies, localizer maps,
   faithfulness, statistics, figures, report, cache and hashing, orchestration); the
   timings dict ``evaluate`` fills is kept as well.
3. **Peer** (``_trust_peer.py``): the same protocol from captum / PAIR XRAI / numpy
   post-processing / deep-copied randomized models / a scikit-image SSIM loop / scikit-
   learn AUPRC and AUROC loops / plain-PyTorch faithfulness loops; statistics, figures and
   the report are trustmap's own code on both sides, so they cost the same.
4. **Bare passes**: the forward+backward passes the explainers need for every model state
   (trained A1, every cascading and independent stage, A2, B) and the forward passes of
   the localizers, the predictions and the faithfulness curves, each distinct pass timed
   on the same model with the same batch shape (``_limits.py``) and multiplied by its
   count. Randomized copies share A1's architecture and shapes, so their passes are timed
   on A1.

Targets (issue 4, section 5): ``peer_total / trustmap_total >= 1.3`` and
``trustmap_total / bare_passes_total <= 1.2``.

Usage::

    python benchmarks/trust.py                       # default preset, 2 threads
    python benchmarks/trust.py --preset quick --threads 1 --n-images 6
    python benchmarks/trust.py --workdir /tmp/trust-models --repeats 2

Writes ``benchmarks/results/trust.json`` (``trust_<preset>.json`` for another preset, or
``--out``) atomically. Run it on idle cores: the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

import _trust_peer as peer
from _limits import Setting, forward_pass, input_gradient_pass, layer_gradient_pass
from _machine import cpu_name as _cpu
from _machine import load_average as _load
from _machine import version as _version
from _trust_peer import Buckets
from trustmap.core.atomic import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_PEER = 1.3  # peer_total / trustmap_total at least this
TARGET_BARE = 1.2  # trustmap_total / bare_passes_total at most this
BUSY_LOAD = 0.5
TARGET = peer.TARGET

# Order of the components in the table and the JSON.
COMPONENTS = (
    "postprocess",
    "utility metrics",
    "ssim",
    "randomized copies",
    "stage definition",
    "localizer maps",
    "faithfulness",
    "statistics",
    "figures",
    "report",
    "outputs (json, csv)",
    "cache and hashing",
    "orchestration",
)
NOTES = [
    "training and loading the five models (prepare) is not part of the comparison; its time "
    "is reported under 'prepare'",
    "statistics, figures and the report run trustmap's own code on both sides",
    "faithfulness (deletion, insertion, sensitivity-n, IG completeness gap) is included on "
    "both sides: trustmap's metrics vs plain PyTorch loops with the same definitions and "
    "batch sizes (no library ships them); its forward passes are in the bare passes",
    "the peer segments each image once for XRAI (PAIR's Felzenszwalb segments passed to "
    "GetMask), as trustmap memoizes them; 'total_without_segment_reuse' gives the peer's "
    "time if it segmented on every call",
    "SmoothGrad / Smooth IG: captum takes one noise sigma per batch, trustmap one per image; "
    "the noise draws differ, so their maps agree only in distribution",
    "XRAI: PAIR's integrated gradients weight every node 1/n, trustmap's use the trapezoid "
    "rule, so the XRAI maps differ by that quadrature difference",
    "the first independent stage equals the first cascading stage (same modules, same "
    "seed): trustmap's cache finds its maps, the peer reuses them, the bare passes skip it",
    "bare passes of randomized copies are timed on A1 (same architecture and shapes); each "
    "distinct pass is timed in steady state (loops of back-to-back calls, median of "
    "--limit-repeats loops)",
    "captum's riemann_trapezoid weights sum to (n - 1) / n, so its integrated gradients are "
    "trustmap's times (n - 1) / n: the maps agree after min-max, the completeness gap not",
]


# ------------------------------------------------------------------------------------
# trustmap, instrumented
# ------------------------------------------------------------------------------------
@contextlib.contextmanager
def instrumented(b: Buckets) -> Iterator[None]:
    """Charge the protocol's own functions to buckets while the block runs.

    Every wrapper is a ``perf_counter`` pair around the original call, restored on exit
    (also on error); nothing else about the protocol changes.
    """
    from trustmap.metrics import similarity
    from trustmap.trust import protocol, randomization
    from trustmap.trust.cache import Store

    current: dict[str, str] = {"method": "?"}

    class TimedMaps(protocol._Maps):
        def __call__(self, model: Any, method: str, **kwargs: Any) -> Any:
            current["method"] = method
            with b("cache and hashing"):
                return super().__call__(model, method, **kwargs)

    arrays = Store.arrays

    def timed_arrays(self: Any, kind: str, key: str, compute: Callable[[], Any]) -> Any:
        if kind == "maps":
            compute = b.wrap(f"explainer {current['method']}", compute)
        return arrays(self, kind, key, compute)

    patches: list[tuple[Any, str, Any]] = [
        (protocol, "_Maps", TimedMaps),
        (Store, "arrays", timed_arrays),
        (protocol, "postprocess", b.wrap("postprocess", protocol.postprocess)),
        (protocol, "auprc_batch", b.wrap("utility metrics", protocol.auprc_batch)),
        (protocol, "auroc_batch", b.wrap("utility metrics", protocol.auroc_batch)),
        (protocol, "ssim_batch", b.wrap("ssim", protocol.ssim_batch)),
        (similarity, "ssim_batch", b.wrap("ssim", similarity.ssim_batch)),
        (protocol, "weights_hash", b.wrap("cache and hashing", protocol.weights_hash)),
        (protocol, "_localizer_maps", b.wrap("localizer maps", protocol._localizer_maps)),
        (protocol, "_faithfulness", b.wrap("faithfulness", protocol._faithfulness)),
        (protocol, "_statistics", b.wrap("statistics", protocol._statistics)),
        (
            randomization,
            "randomized_models",
            b.wrap_iter("randomized copies", randomization.randomized_models),
        ),
        (randomization, "model_stages", b.wrap("stage definition", randomization.model_stages)),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, new in patches:
            stack.enter_context(mock.patch.object(owner, name, new))
        yield


def run_trustmap(cfg: Any, prepared: Any, out: Path) -> dict[str, Any]:
    """One timed trustmap run into the empty directory ``out``."""
    from trustmap.methods.gradient import xrai
    from trustmap.trust import evaluate
    from trustmap.trust.protocol import write_outputs

    xrai._SEGMENT_CACHE.clear()  # segments memoized by an earlier run in this process
    run_cfg = dataclasses.replace(cfg, out=str(out))
    b = Buckets()
    timings: dict[str, float] = {}
    gc.collect()
    with instrumented(b):
        started = time.perf_counter()
        with b("orchestration"):
            results, per_image, examples = evaluate(run_cfg, prepared, timings=timings)
        with b("outputs (json, csv)"):
            _, files = write_outputs(
                run_cfg, results, per_image, examples, timings=timings, started=started
            )
        total = time.perf_counter() - started
    buckets = dict(b.seconds)
    peer.split_output_time(buckets, files)
    buckets["orchestration"] += total - b.total()
    written = json.loads(Path(files["results"]).read_text(encoding="utf-8"))
    return {
        "total": total,
        "components": buckets,
        "timings": written["timings"],
        "cache": written.get("cache"),
        "per_image": per_image,
        "summary": written["summary"],
    }


def run_peer(cfg: Any, prepared: Any, out: Path) -> dict[str, Any]:
    """One timed run of the peer protocol into ``out``."""
    gc.collect()
    result = peer.run_peer(dataclasses.replace(cfg, out=str(out)), prepared)
    extra = None
    if result.xrai_segment_seconds_per_image is not None:
        n_calls = _n_states(cfg, prepared) - 1  # every state after the first segmented again
        extra = result.xrai_segment_seconds_per_image * len(prepared.ids) * n_calls
    return {
        "total": result.total,
        "components": result.buckets,
        "per_image": result.per_image,
        "summary": result.results["summary"],
        "xrai_segment_seconds_per_image": result.xrai_segment_seconds_per_image,
        "total_without_segment_reuse": result.total + extra if extra is not None else None,
    }


# ------------------------------------------------------------------------------------
# Bare passes
# ------------------------------------------------------------------------------------
def _stage_names(cfg: Any, prepared: Any) -> list[str]:
    from trustmap.trust.randomization import model_stages

    stages = cfg.randomization.get("stages")
    return [s.name for s in model_stages(prepared.models["A1"], stages)]


def _independent(cfg: Any) -> bool:
    return bool(cfg.randomization.get("independent", True))


def model_states(cfg: Any, prepared: Any) -> list[tuple[str, str]]:
    """``(state, role whose passes it costs)``: A1, each stage, A2, B.

    The first independent stage is left out: it re-initialises the same modules with the
    same seed as the first cascading stage, so its maps are the same (trustmap finds them in
    its cache, the peer reuses them)."""
    names = _stage_names(cfg, prepared)
    states = [("A1", "A1")]
    states += [(f"cascading {n}", "A1") for n in names]
    if _independent(cfg):
        states += [(f"independent {n}", "A1") for n in names[1:]]
    return [*states, ("A2", "A2"), ("B", "B")]


def _n_states(cfg: Any, prepared: Any) -> int:
    return len(model_states(cfg, prepared))


def _rows(images: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of images (repeated when ``n`` exceeds the images; the cost of a pass
    does not depend on what the pixels are)."""
    reps = math.ceil(n / images.shape[0])
    return images.repeat(reps, *([1] * (images.ndim - 1)))[:n].contiguous()


class BarePlan:
    """Counts of distinct bare passes, per component, and the callables that run them."""

    def __init__(self, prepared: Any, layers: dict[str, str]) -> None:
        self.prepared = prepared
        self.layers = layers
        self.runs: dict[str, Callable[[], object]] = {}
        self.counts: dict[str, dict[str, int]] = {}  # component -> pass key -> count

    def _setting(self, role: str, rows: int) -> Setting:
        model = self.prepared.models[role]
        return Setting(role, model, _rows(self.prepared.images, rows), TARGET)

    def add(
        self, component: str, kind: str, role: str, rows: int, count: int, layer: str | None = None
    ) -> None:
        if count <= 0:
            return
        if kind == "grad":
            key = f"{role}: input-gradient pass, {rows} rows"
            make = lambda: input_gradient_pass(self._setting(role, rows))  # noqa: E731
        elif kind == "layer":
            layer = layer or self.layers[role]
            key = f"{role}: layer-gradient pass to {layer}, {rows} rows"
            module = dict(self.prepared.models[role].named_modules())[layer]
            make = lambda: layer_gradient_pass(self._setting(role, rows), module)  # noqa: E731
        else:
            key = f"{role}: forward, {rows} rows"
            make = lambda: forward_pass(self._setting(role, rows))  # noqa: E731
        if key not in self.runs:
            self.runs[key] = make()
        per = self.counts.setdefault(component, {})
        per[key] = per.get(key, 0) + count


def bare_plan(cfg: Any, prepared: Any) -> BarePlan:
    """Every pass the protocol cannot avoid, with trustmap's batch shapes."""
    n_images = len(prepared.ids)
    bs = cfg.batch_size
    batches = [min(bs, n_images - s) for s in range(0, n_images, bs)]
    plan = BarePlan(prepared, peer.layer_names(prepared))
    for method in cfg.methods:
        p = peer.method_params(cfg, method)
        component = f"explainer {method}"
        for _state, role in model_states(cfg, prepared):
            for r in batches:
                if method in ("gradient", "guided_backprop"):
                    plan.add(component, "grad", role, r, 1)
                elif method == "smoothgrad":
                    plan.add(component, "grad", role, r, int(p["n_samples"]))
                elif method == "integrated_gradients":
                    plan.add(component, "grad", role, r, int(p["n_steps"]))
                elif method == "smooth_ig":
                    plan.add(component, "grad", role, r, int(p["n_samples"]) * int(p["n_steps"]))
                elif method == "xrai":
                    n_base = len(p["baselines"]) if isinstance(p["baselines"], list | tuple) else 1
                    plan.add(component, "grad", role, r, n_base * int(p["n_steps"]))
                elif method == "grad_cam":
                    plan.add(component, "layer", role, r, 1, p.get("layer"))
                elif method == "guided_grad_cam":
                    plan.add(component, "layer", role, r, 1, p.get("layer"))
                    plan.add(component, "grad", role, r, 1)
                else:
                    raise ValueError(f"no bare-pass rule for method {method!r}")
    for r in batches:
        plan.add("localizer maps", "forward", "L1", r, 1)
        plan.add("localizer maps", "forward", "L2", r, 1)
        plan.add("faithfulness", "forward", "A1", r, 1)  # predictions (explainability failures)
    fcfg = {"enabled": True, "n_images": 16, "steps": 20, "n_values": [16, 64, 256]}
    fcfg.update(cfg.faithfulness)
    fcfg.setdefault("n_subsets", 32)
    if fcfg["enabled"]:
        n_f = min(int(fcfg["n_images"]), n_images)
        n_pixels = int(np.prod(prepared.images.shape[2:]))
        n_values = [v for v in fcfg["n_values"] if v < n_pixels]
        curve = int(fcfg["steps"]) + 1
        per_method: dict[int, int] = {}  # rows per pass -> passes per image and method
        for s in range(0, curve, 32):  # deletion and insertion, 32 images per pass
            rows = min(32, curve - s)
            per_method[rows] = per_method.get(rows, 0) + 2
        n_subsets = int(fcfg["n_subsets"])
        for _ in n_values:  # sensitivity-n, 64 subsets per pass
            for s in range(0, n_subsets, 64):
                rows = min(64, n_subsets - s)
                per_method[rows] = per_method.get(rows, 0) + 1
        for rows, count in per_method.items():
            plan.add("faithfulness", "forward", "A1", rows, count * n_f * len(cfg.methods))
        if n_values:
            plan.add("faithfulness", "forward", "A1", 1, n_f)  # f(x), once per image
        if "integrated_gradients" in cfg.methods and (
            peer._ig_baseline(peer.method_params(cfg, "integrated_gradients")) == 0.0
        ):
            plan.add("faithfulness", "forward", "A1", 2, n_f)  # f(x) and f(0): completeness
    return plan


def time_pass(run: Callable[[], object], repeats: int, loop_seconds: float = 0.1) -> float:
    """Seconds per call in steady state: after a warm-up call, the median over ``repeats``
    loops of back-to-back calls lasting about ``loop_seconds`` each. Explainers run their
    passes back to back, so a single call after a cold start would overstate the limit."""
    run()  # warm-up
    start = time.perf_counter()
    run()
    n = max(1, math.ceil(loop_seconds / max(time.perf_counter() - start, 1e-6)))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            run()
        per_call.append((time.perf_counter() - start) / n)
    return float(np.median(per_call))


def time_bare(plan: BarePlan, repeats: int) -> dict[str, Any]:
    """Time each distinct pass (:func:`time_pass`) and multiply by its count."""
    each = {key: time_pass(run, repeats) for key, run in plan.runs.items()}
    components = {
        c: float(sum(n * each[k] for k, n in counts.items())) for c, counts in plan.counts.items()
    }
    passes: dict[str, dict[str, Any]] = {}
    for counts in plan.counts.values():
        for key, n in counts.items():
            entry = passes.setdefault(key, {"count": 0, "seconds_each": each[key]})
            entry["count"] += n
    return {"total": float(sum(components.values())), "components": components, "passes": passes}


# ------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------
def warm_up(cfg: Any, prepared: Any) -> None:
    """Imports and first calls that neither side should pay inside its timed run."""
    import matplotlib

    matplotlib.use("Agg")
    import captum.attr  # noqa: F401
    import matplotlib.pyplot
    import saliency.core  # noqa: F401
    import skimage.metrics  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import statsmodels.api  # noqa: F401

    from trustmap.trust import figures, report, stats  # noqa: F401

    x = prepared.images[: cfg.batch_size]
    for role in ("A1", "A2", "B"):
        input_gradient_pass(Setting(role, prepared.models[role], x, TARGET))()
    for role in ("L1", "L2"):
        forward_pass(Setting(role, prepared.models[role], x, TARGET))()


def compare_tables(trustmap_rows: Any, peer_rows: Any) -> dict[str, Any]:
    """Largest per-image difference between the two sides, per method and metric."""
    keys = ["image", "method", "criterion", "stage", "metric"]
    merged = trustmap_rows.merge(peer_rows, on=keys, suffixes=("_t", "_p"), how="outer")
    out: dict[str, Any] = {"rows_trustmap": len(trustmap_rows), "rows_peer": len(peer_rows)}
    out["rows_unmatched"] = int(merged[["value_t", "value_p"]].isna().any(axis=1).sum())
    diff = (merged.value_t - merged.value_p).abs()
    by: dict[str, dict[str, float]] = {}
    for (method, metric), d in diff.groupby([merged.method, merged.metric]):
        by.setdefault(str(method), {})[str(metric)] = float(d.max())
    out["max_abs_diff"] = by
    return out


def benchmark(
    cfg: Any,
    prepared: Any,
    *,
    scratch: Path,
    repeats: int = 1,
    limit_repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time trustmap and the peer (alternating, ``repeats`` times each; the fastest run of
    each side is kept) and the bare passes. Returns the JSON payload (without setup)."""
    say = progress or (lambda _m: None)
    warm_up(cfg, prepared)
    runs: dict[str, list[dict[str, Any]]] = {"trustmap": [], "peer": []}
    for i in range(repeats):
        for side, fn in (("trustmap", run_trustmap), ("peer", run_peer)):
            out = scratch / f"{side}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            say(f"{side} run {i + 1}/{repeats} ...")
            r = fn(cfg, prepared, out)
            say(f"{side} run {i + 1}/{repeats}: {r['total']:.1f} s")
            runs[side].append(r)
    best = {side: min(rs, key=lambda r: r["total"]) for side, rs in runs.items()}
    say("bare passes ...")
    bare = time_bare(bare_plan(cfg, prepared), limit_repeats)
    say(f"bare passes: {bare['total']:.1f} s")

    t, p = best["trustmap"], best["peer"]
    t_expl = sum(v for k, v in t["components"].items() if k.startswith("explainer "))
    b_expl = sum(v for k, v in bare["components"].items() if k.startswith("explainer "))
    ratios = {
        "peer_over_trustmap": p["total"] / t["total"],
        "peer_over_trustmap_target": TARGET_PEER,
        "peer_target_met": p["total"] / t["total"] >= TARGET_PEER,
        "trustmap_over_bare": t["total"] / bare["total"],
        "trustmap_over_bare_target": TARGET_BARE,
        "bare_target_met": t["total"] / bare["total"] <= TARGET_BARE,
        "trustmap_explainers_over_bare_explainer_passes": t_expl / b_expl if b_expl else None,
        "non_pass_share_of_trustmap": 1.0 - bare["total"] / t["total"],
    }
    if p.get("total_without_segment_reuse"):
        ratios["peer_without_segment_reuse_over_trustmap"] = (
            p["total_without_segment_reuse"] / t["total"]
        )
    agreement = compare_tables(t["per_image"], p["per_image"])
    # Per criterion: the mixed models are fitted jointly over all methods, so a method whose
    # maps are identical on both sides can still get a different p-value (and, near alpha,
    # verdict) when another method's maps differ; the randomization test is per method.
    agreement["verdicts_equal"] = {
        m: {c: v == p["summary"]["verdicts"].get(m, {}).get(c) for c, v in row.items()}
        for m, row in t["summary"]["verdicts"].items()
    }

    def side(r: dict[str, Any], runs_: list[dict[str, Any]]) -> dict[str, Any]:
        keep = {k: v for k, v in r.items() if k not in ("per_image", "summary")}
        keep["components"] = _ordered(r["components"])
        keep["run_totals"] = [x["total"] for x in runs_]
        keep["verdicts"] = r["summary"]["verdicts"]
        return keep

    return {
        "trustmap": side(t, runs["trustmap"]),
        "peer": {**side(p, runs["peer"]), "libraries": peer.PEER_LIBRARY},
        "bare_passes": {**bare, "components": _ordered(bare["components"])},
        "ratios": ratios,
        "agreement": agreement,
    }


def _ordered(components: dict[str, float]) -> dict[str, float]:
    explainers = sorted(k for k in components if k.startswith("explainer "))
    rest = [k for k in COMPONENTS if k in components]
    extra = sorted(k for k in components if k not in explainers and k not in rest)
    return {k: float(components[k]) for k in [*explainers, *rest, *extra]}


# ------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------
def format_table(payload: dict[str, Any]) -> str:
    t = payload["trustmap"]["components"]
    p = payload["peer"]["components"]
    b = payload["bare_passes"]["components"]
    names = list(dict.fromkeys([*t, *p, *b]))
    width = max(len(n) for n in [*names, "component"]) + 2

    def cell(d: dict[str, float], k: str) -> str:
        return f"{d[k]:10.2f}" if k in d else f"{'-':>10}"

    lines = [f"{'component':<{width}}{'trustmap s':>10}  {'peer s':>10}  {'bare s':>10}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{n:<{width}}{cell(t, n)}  {cell(p, n)}  {cell(b, n)}" for n in names]
    lines.append("-" * len(lines[0]))
    tot = (payload["trustmap"]["total"], payload["peer"]["total"], payload["bare_passes"]["total"])
    lines.append(f"{'total':<{width}}{tot[0]:10.2f}  {tot[1]:10.2f}  {tot[2]:10.2f}")
    r = payload["ratios"]
    lines.append(
        f"peer / trustmap = {r['peer_over_trustmap']:.2f}x (target >= {TARGET_PEER}: "
        f"{'met' if r['peer_target_met'] else 'NOT met'})"
    )
    lines.append(
        f"trustmap / bare passes = {r['trustmap_over_bare']:.2f}x (target <= {TARGET_BARE}: "
        f"{'met' if r['bare_target_met'] else 'NOT met'}); non-pass share of trustmap "
        f"{100 * r['non_pass_share_of_trustmap']:.0f}%"
    )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def setup_info(
    cfg: Any, prepared: Any, threads: int, load: list[float | None], preset: str
) -> dict:
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in (
                "trustmap",
                "captum",
                "saliency",
                "scikit-image",
                "scikit-learn",
                "statsmodels",
                "numpy",
                "matplotlib",
            )
        },
        "load_average_1min": {"before": load[0], "after": load[1]},
        "preset": preset,
        "config": cfg.to_dict(),
        "images": {"n": len(prepared.ids), "shape": list(prepared.images.shape[1:])},
        "model_states": [s for s, _ in model_states(cfg, prepared)],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "notes": NOTES,
    }


def write_payload(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------
def default_workdir(cfg: Any) -> Path:
    """A temp folder named by what the trained models depend on, so that a changed preset
    trains afresh and presets with the same models share them."""
    from trustmap.trust.cache import key_of

    models = {role: dataclasses.asdict(spec) for role, spec in cfg.models.items()}
    key = key_of(cfg.dataset, cfg.phantom, cfg.size, models, cfg.training, cfg.device)
    return Path(tempfile.gettempdir()) / f"trustmap-bench-trust-{key[:12]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("quick", "default"), default="default")
    p.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (default 2)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/trust.json)")
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the models are trained once and reused (default: a folder in the temp "
        "dir named by the data, model and training settings, shared by presets that agree)",
    )
    p.add_argument("--n-images", type=int, help="override the preset's number of images")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side (fastest kept)")
    p.add_argument("--limit-repeats", type=int, default=5, help="timed calls per bare pass")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.limit_repeats < 1:
        p.error("--threads, --repeats and --limit-repeats must be at least 1")
    if args.out is None:
        name = "trust.json" if args.preset == "default" else f"trust_{args.preset}.json"
        args.out = RESULTS / name
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from threadpoolctl import threadpool_limits

    from trustmap.trust import TrustConfig, prepare

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module=r"(captum|saliency|skimage|sklearn)(\..*)?")
    overrides: dict[str, Any] = {}
    if args.n_images is not None:
        overrides["n_images"] = args.n_images
    cfg = TrustConfig.from_preset(args.preset, **overrides)
    args.workdir = args.workdir or default_workdir(cfg)
    cfg = dataclasses.replace(cfg, out=str(args.workdir))
    load_before = _load()
    print(f"trust protocol benchmark, preset {args.preset}, {args.threads} threads, {_cpu()}")
    if load_before is not None and load_before > BUSY_LOAD:
        print(f"warning: 1-min load average is {load_before:.1f}; timings will be noisy")
    with threadpool_limits(limits=args.threads):
        tick = time.perf_counter()
        prepared = prepare(cfg)
        prep_seconds = time.perf_counter() - tick
        print(
            f"prepare (data + models, not compared): {prep_seconds:.1f} s, workdir {args.workdir}"
        )
        payload = benchmark(
            cfg,
            prepared,
            scratch=args.workdir / "runs",
            repeats=args.repeats,
            limit_repeats=args.limit_repeats,
            progress=lambda m: print(f"  {m}", flush=True),
        )
    payload = {
        "benchmark": "trust",
        "setup": setup_info(cfg, prepared, args.threads, [load_before, _load()], args.preset),
        "prepare": {
            "seconds": prep_seconds,
            "models": prepared.model_info,
            "note": "training or loading the models is not part of the comparison",
        },
        **payload,
    }
    print()
    print(format_table(payload))
    write_payload(payload, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
