"""Time every trustmap method against its bare-PyTorch limit and its peers.

Setting: MONAI DenseNet121 (untrained, seeded), 2D input ``4 x 1 x 128 x 128`` and 3D
input ``1 x 1 x 64 x 64 x 64``, on CPU with 2 threads, all in one run. For every name in
``trustmap.list_methods()`` (new methods are picked up automatically) it reports

* trustmap's time with the method's defaults (heavier settings only where noted below);
* the *limit*: the bare PyTorch passes the method needs, timed in the same run (see
  ``_limits.py``); "n/a" for a method without a limit rule;
* the *peers*: the same method in captum, MONAI and PAIR ``saliency`` (see
  ``_peers.py``), with the same layer, steps, samples and target.

Targets: every method within 1.15x of its limit (XRAI within 1.5x of its IG passes), and
none slower than its fastest peer.

Usage::

    python benchmarks/methods.py                      # everything, 10-15 min on 2 cores
    python benchmarks/methods.py --quick              # 2D only, one repeat
    python benchmarks/methods.py --methods gradient,grad_cam --dims 3 --repeats 1
    python benchmarks/methods.py --markdown           # also a markdown table (README)

A full run writes ``benchmarks/results/methods.json``; a partial one (``--quick``,
``--methods`` or ``--dims``) writes ``benchmarks/results/methods_partial.json`` so that it
never replaces the full results (``--out`` chooses another file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import _perturbation_masks
import _perturbation_segments
import _relevance
import _relevance_ref
import trustmap
from _limits import (
    DEFAULT_LAYER,
    LimitTimer,
    Setting,
    Timing,
    accepted,
    effective_params,
    limit_plan,
    time_call,
)
from _machine import cpu_name as _cpu
from _machine import load_average as _load
from _machine import version as _version
from _peers import PEERS, Unsupported
from trustmap.core.atomic import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES: dict[int, tuple[int, ...]] = {2: (4, 1, 128, 128), 3: (1, 1, 64, 64, 64)}
N_CLASSES = 2
TARGET = 1
MODEL_SEED = 0
INPUT_SEED = 0
LONG_CALL = 30.0
BUSY_LOAD = 0.5  # 1-min load average above which the machine is not idle

# The settings (IG 25 steps, SmoothGrad 25 samples) are the library defaults;
# they are repeated here so that a change of default does not silently change the
# benchmark. Smooth IG's default of 25 x 25 = 625 passes is cut to 5 x 25. Seeds make the
# stochastic methods repeatable; they do not change the cost.
BENCH_PARAMS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 25},
    "smoothgrad": {"n_samples": 25, "seed": 0},
    "smooth_ig": {"n_samples": 5, "n_steps": 25, "seed": 0},
    "xrai": {"n_steps": 25, "seed": 0},
}
# --smoke: small, cheap settings that run every method, limit and peer end to end in a
# few minutes; for checking the script, not for timing. Score-CAM and Ablation-CAM use a
# layer of 32 channels (the last dense layer's convolution) instead of 1024.
SMOKE_SHAPES: dict[int, tuple[int, ...]] = {2: (2, 1, 64, 64), 3: (1, 1, 64, 64, 64)}
SMOKE_LAYER = "features.denseblock4.denselayer16.layers.conv2"
SMOKE_PARAMS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 3},
    "smoothgrad": {"n_samples": 2, "seed": 0},
    "smooth_ig": {"n_samples": 2, "n_steps": 3, "seed": 0},
    "xrai": {"n_steps": 3, "seed": 0},
    "score_cam": {"layer": SMOKE_LAYER},
    "ablation_cam": {"layer": SMOKE_LAYER},
}
# The families benchmarked by their own modules: each adds its peers, its settings and a
# limit rule (tried before the generic rules of _limits.py).
# Rules take (name, params, setting, params the explanation reported), since some costs
# (HiPe's refinement, iterative saliency's iterations) are only known after the call.
PEERS = {
    **PEERS,
    **_relevance.PEERS,
    **_relevance_ref.RELEVANCE_PEERS,
    **_perturbation_segments.PEERS,
    **_perturbation_masks.PEERS,
}
for _family in (_relevance_ref.RELEVANCE_BENCH_PARAMS, _perturbation_segments.BENCH_PARAMS):
    BENCH_PARAMS.update(_family)
BENCH_PARAMS.update(_perturbation_masks.BENCH_PARAMS)
SMOKE_PARAMS.update(
    {
        "occlusion": {"window": 32, "stride": 32},
        "lime": {"n_samples": 20, "seed": 0},
        "kernel_shap": {"n_samples": 20, "seed": 0},
        "shapley_sampling": {"n_samples": 2, "seed": 0},
        "rise": {"n_samples": 16, "seed": 0},
        "meaningful_perturbation": {"n_iter": 2, "seed": 0},
        "extremal_perturbation": {"n_iter": 2, "seed": 0},
    }
)
FAMILY_LIMITS = (
    lambda name, params, s, used: _relevance.limit_plan(name, s),
    lambda name, params, s, used: _relevance_ref.relevance_limit_plan(name, params, s),
    _perturbation_segments.limit_plan,
    _perturbation_masks.limit_plan,
)
FAMILY_PREPARE = (_relevance_ref.prepare,)
NOTES = [
    "smooth_ig is timed with n_samples=5, n_steps=25 (125 passes; the library default is "
    "25 x 25 = 625)",
]


# ------------------------------------------------------------------------------------
# Setting
# ------------------------------------------------------------------------------------
def make_setting(dims: int, shapes: dict[int, tuple[int, ...]]) -> Setting:
    """The untrained DenseNet121 and a smooth, image-like input batch.

    The input is a coarse random field upsampled to full size plus a little noise: pure
    noise would give segmentation-based methods (XRAI) thousands of tiny segments, which
    no real scan has.
    """
    from monai.networks.nets import DenseNet121

    with torch.random.fork_rng():
        torch.manual_seed(MODEL_SEED)
        model = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=N_CLASSES)
    model.eval()
    shape = shapes[dims]
    gen = torch.Generator().manual_seed(INPUT_SEED)
    coarse = torch.randn((*shape[:2], *([8] * dims)), generator=gen)
    mode = "bilinear" if dims == 2 else "trilinear"
    x = F.interpolate(coarse, size=shape[2:], mode=mode, align_corners=False)
    x = x + 0.1 * torch.randn(shape, generator=gen)
    return Setting(f"{dims}D", model, x.contiguous(), TARGET)


def layer_lookup(model: nn.Module) -> Any:
    modules = dict(model.named_modules())

    def find(name: str) -> nn.Module:
        if name not in modules:
            raise ValueError(f"DenseNet121 has no layer {name!r}")
        return modules[name]

    return find


# ------------------------------------------------------------------------------------
# One method
# ------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def time_trustmap(name: str, s: Setting, args: argparse.Namespace) -> tuple[Timing, dict]:
    cls = trustmap.get_method(name)
    explainer = cls(s.model, **accepted(cls, args.params.get(name, {})))
    for prepare in FAMILY_PREPARE:  # one-off fitting (PatternNet) is not the timed call
        prepare(name, explainer, s)
    last: dict[str, Any] = {}

    def run() -> None:
        last["params"] = explainer.explain(s.x, target=s.target).params

    timing = time_call(run, args.repeats, args.long_call)
    return timing, last.get("params", {})


def time_peers(name: str, s: Setting, params: dict, args: argparse.Namespace) -> dict:
    """Per library: the fastest variant's seconds, every variant, and why any is absent."""
    best: dict[str, float] = {}
    variants: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    for peer in PEERS.get(name, []):
        label = f"{peer.library}: {peer.variant}" if peer.variant else peer.library
        try:
            run = peer.build(s, params)
        except ImportError as exc:
            notes[peer.library] = f"missing ({_error(exc)})"
            continue
        except Unsupported as exc:
            notes.setdefault(peer.library, f"unsupported ({exc})")
            continue
        except Exception as exc:
            notes[label] = f"failed to build ({_error(exc)})"
            continue
        try:
            seconds = time_call(run, args.repeats, args.long_call).seconds
        except Exception as exc:
            notes[label] = f"failed ({_error(exc)})"
            continue
        finally:
            del run
            gc.collect()
        variants.setdefault(peer.library, {})[peer.variant] = seconds
        if seconds < best.get(peer.library, math.inf):
            best[peer.library] = seconds
        # A library that ran in one variant is not missing.
        notes.pop(peer.library, None)
    return {"peers": best, "peer_variants": variants, "peer_notes": notes}


def bench_method(
    name: str, s: Setting, limits: LimitTimer, args: argparse.Namespace
) -> dict[str, Any]:
    cls = trustmap.get_method(name)
    params = effective_params(cls, args.params.get(name, {}))
    record: dict[str, Any] = {
        "seconds": None,
        "limit_seconds": None,
        "peers": {},
        "params": _json_safe({k: v for k, v in params.items() if not isinstance(v, torch.Tensor)}),
    }
    used: dict[str, Any] = {}
    try:
        timing, used = time_trustmap(name, s, args)
        record.update(
            seconds=timing.seconds,
            warmup_seconds=timing.warmup,
            runs=list(timing.runs),
            warmup_counted=timing.warmup_counted,
        )
        used_layer = used.get("layer")
        expected = params.get("layer") or DEFAULT_LAYER
        if used_layer is not None and used_layer != expected:
            record["warning"] = (
                f"trustmap used layer {used_layer!r}; limit and peers use {expected!r}"
            )
    except Exception as exc:
        record["error"] = _error(exc)
    gc.collect()

    try:
        plan = next(
            (p for rule in FAMILY_LIMITS if (p := rule(name, params, s, used)) is not None),
            None,
        ) or limit_plan(name, cls, params, s, layer_lookup(s.model))
    except Exception as exc:
        plan = None
        record["limit_error"] = _error(exc)
    if plan is None:
        record["limit"] = "n/a"
    else:
        try:
            lim = limits.time(plan)
            record.update(
                limit_seconds=lim.seconds,
                limit=lim.description,
                limit_factor=lim.factor,
                limit_passes=lim.pass_seconds,
            )
        except Exception as exc:
            record["limit"] = plan.description
            record["limit_error"] = _error(exc)
    gc.collect()

    record.update(time_peers(name, s, params, args))
    _add_verdicts(record)
    return record


def _add_verdicts(r: dict[str, Any]) -> None:
    t, lim, peers = r["seconds"], r["limit_seconds"], r["peers"]
    r["ratio_to_limit"] = t / lim if t is not None and lim else None
    r["limit_target_met"] = (
        r["ratio_to_limit"] <= r["limit_factor"] if r["ratio_to_limit"] is not None else None
    )
    if peers:
        fastest = min(peers, key=peers.get)
        r["fastest_peer"] = fastest
        r["fastest_peer_seconds"] = peers[fastest]
        r["ratio_to_fastest_peer"] = t / peers[fastest] if t is not None else None
        r["peer_target_met"] = t <= peers[fastest] if t is not None else None
    else:
        r["fastest_peer"] = r["fastest_peer_seconds"] = r["ratio_to_fastest_peer"] = None
        r["peer_target_met"] = None
    verdicts = [v for v in (r["limit_target_met"], r["peer_target_met"]) if v is not None]
    r["targets_met"] = all(verdicts) if verdicts and t is not None else None


# ------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------
def _s(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _sec(v: float | None) -> str:
    return "n/a" if v is None else f"{_s(v)} s"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _verdict(r: dict[str, Any]) -> str:
    if r.get("error"):
        return "error"
    if r["targets_met"] is None:
        return "n/a"
    failed = []
    if r["limit_target_met"] is False:
        failed.append("limit")
    if r["peer_target_met"] is False:
        failed.append("peer")
    return "yes" if not failed else "no (" + ", ".join(failed) + ")"


HEADER = [
    "method",
    "dims",
    "trustmap s",
    "limit s",
    "x limit",
    "fastest peer",
    "peer s",
    "x peer",
    "targets",
]


def table_rows(results: dict[str, dict[str, dict]]) -> list[list[str]]:
    rows = []
    for label, methods in results.items():
        for name, r in methods.items():
            mark = "*" if r.get("warmup_counted") else ""
            rows.append(
                [
                    name,
                    label,
                    _s(r["seconds"]) + mark,
                    _s(r["limit_seconds"]),
                    _x(r["ratio_to_limit"]),
                    r["fastest_peer"] or "-",
                    _s(r["fastest_peer_seconds"]),
                    _x(r["ratio_to_fastest_peer"]),
                    _verdict(r),
                ]
            )
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    line = "  ".join(h.ljust(w) for h, w in zip(HEADER, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def setup_info(
    args: argparse.Namespace, methods: list[str], seconds: float, load: list[float | None]
) -> dict:
    return {
        "torch": torch.__version__,
        "trustmap": trustmap.__version__,
        "monai": _version("monai"),
        "captum": _version("captum"),
        "saliency": _version("saliency"),
        "python": platform.python_version(),
        "cpu": _cpu(),
        "threads": torch.get_num_threads(),
        "model": f"monai DenseNet121(in_channels=1, out_channels={N_CLASSES}), untrained, "
        f"torch.manual_seed({MODEL_SEED}), eval mode",
        "shapes": {f"{d}D": list(args.shapes[d]) for d in args.dims},
        "target": TARGET,
        "layer": DEFAULT_LAYER,
        "params": args.params,
        "smoke": args.smoke,
        "notes": NOTES,
        "repeats": args.repeats if args.repeats is not None else "3 if under 2 s, else 1",
        "warmup": f"one warm-up call; a warm-up of {args.long_call} s or more is the measurement",
        "limits": "each pass timed, times its count" if not args.exact_limits else "exact loops",
        "methods": methods,
        "quick": args.quick,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "total_seconds": seconds,
        "load_average_1min": {"start": load[0], "end": load[1]},
    }


# ------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one repeat, 2D only (unless --dims)")
    p.add_argument("--methods", help="comma-separated method names (default: all)")
    p.add_argument("--dims", help="comma-separated spatial dims, 2 and/or 3 (default: 2,3)")
    p.add_argument(
        "--repeats", type=int, help="timed calls after the warm-up (default: 3 under 2 s, else 1)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument(
        "--long-call",
        type=float,
        default=LONG_CALL,
        help="with default repeats, a warm-up this long (s) is the measurement",
    )
    p.add_argument("--exact-limits", action="store_true", help="time every limit loop in full")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings that run everything once: checks the script, times nothing useful",
    )
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/...)")
    args = p.parse_args(argv)

    available = trustmap.list_methods()
    if args.methods:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in available]
        if unknown:
            p.error(f"unknown method(s) {unknown}; available: {', '.join(available)}")
        args.method_list = chosen
    else:
        args.method_list = available
    if args.dims:
        try:
            dims = [int(d) for d in args.dims.split(",") if d.strip()]
        except ValueError:
            p.error(f"--dims takes 2 and/or 3, got {args.dims!r}")
        if not dims or any(d not in SHAPES for d in dims):
            p.error(f"--dims takes 2 and/or 3, got {args.dims!r}")
        args.dims = sorted(set(dims))
    else:
        args.dims = [2] if args.quick else [2, 3]
    if args.repeats is None and args.quick:
        args.repeats = 1
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    args.shapes = SMOKE_SHAPES if args.smoke else SHAPES
    args.params = {**BENCH_PARAMS, **SMOKE_PARAMS} if args.smoke else BENCH_PARAMS
    partial = args.quick or args.smoke or args.methods or args.dims != [2, 3]
    if args.out is None:
        args.out = RESULTS / ("methods_partial.json" if partial else "methods.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module=r"(captum|monai|saliency|skimage)(\..*)?")
    start = time.perf_counter()
    print(
        f"trustmap {trustmap.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {_cpu()}"
    )
    for note in NOTES:
        print("note:", note)
    if args.smoke:
        print("note: --smoke uses tiny settings; its timings mean nothing")
    load_start = _load()
    if load_start is not None and load_start > BUSY_LOAD:
        print(
            f"warning: 1-min load average is {load_start:.1f}: other processes are running "
            "and the timings will be noisy"
        )

    results: dict[str, dict[str, dict]] = {}
    for dims in args.dims:
        s = make_setting(dims, args.shapes)
        print(f"\n== {s.label}: input {tuple(s.x.shape)}, target class {s.target}", flush=True)
        limits = LimitTimer(args.repeats, args.long_call, args.exact_limits)
        results[s.label] = {}
        for name in args.method_list:
            t0 = time.perf_counter()
            r = bench_method(name, s, limits, args)
            results[s.label][name] = r
            peers = ", ".join(f"{k} {_s(v)}" for k, v in r["peers"].items()) or "none"
            extra = f"  [{r['error']}]" if r.get("error") else ""
            print(
                f"  {name:<22} trustmap {_sec(r['seconds'])}  limit {_sec(r['limit_seconds'])}"
                f"  peers: {peers}  ({time.perf_counter() - t0:.0f} s){extra}",
                flush=True,
            )
        del s, limits
        gc.collect()

    total = time.perf_counter() - start
    rows = table_rows(results)
    print()
    print(format_table(rows))
    if any(r.get("warmup_counted") for m in results.values() for r in m.values()):
        print(f"* the warm-up was the measurement (a call of {args.long_call:g} s or more)")
    judged = [r for m in results.values() for r in m.values() if r["targets_met"] is not None]
    held = sum(bool(r["targets_met"]) for r in judged)
    print(f"targets hold for {held} of {len(judged)} (method, dims) pairs; total {total:.0f} s")
    if args.markdown:
        print()
        print(format_markdown(rows))

    payload = {
        "methods": results.get("2D", {}),
        "methods_3d": results.get("3D", {}),
        "setup": setup_info(args, args.method_list, total, [load_start, _load()]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(_json_safe(payload), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
