"""RISE, meaningful and extremal perturbation, HiPe, iterative saliency: limits and the
HiPe evaluation curve.

Two parts.

**Timing** (hooked into ``methods.py`` through :func:`limit_plan` and :data:`PEERS`, or
run here with ``--timing``): each method against its *limit*, the bare passes it cannot
avoid, timed on the same model in the same run:

* ``rise``: ``n_samples * B`` masked rows forwarded under inference mode in trustmap's
  chunks, plus one forward of ``x`` (drawing, upsampling and blending the masks is the
  overhead measured against it);
* ``hipe``: the windows it reported evaluating, level by level in trustmap's chunks,
  plus one forward of ``x``;
* ``meaningful_perturbation``: ``n_iter`` input-gradient passes of the batch plus two
  forwards (``x`` and the final mask); ``extremal_perturbation`` the same with
  ``B * len(areas)`` rows;
* ``iterative_saliency`` with the gradient base: per iteration one input-gradient pass
  and one forward of the samples still running (from the reported iterations), plus one
  forward of ``x``; the inpainting is overhead.

Peers: none. captum, MONAI, PAIR ``saliency`` and the ``lime``/``shap`` packages have no
RISE, meaningful or extremal perturbation, HiPe or iterative saliency. TorchRay has RISE
and extremal perturbation, and HiPe's authors publish a script, but TorchRay needs
torchvision, which this environment cannot install without breaking torch, and neither
is a package; so :data:`PEERS` is empty and the table reports "none".

**HiPe evaluation curve** (``--curves``): the occlusion map at HiPe's finest resolution
(every window two cells wide, one cell apart, as in HiPe) is the reference; its top 5 %
of voxels is the region to find. HiPe is stopped after each of its levels and reported
against the evaluations used: *recall*, the share of that region in the top 5 % of
HiPe's map so far, and *reached*, the share of it that HiPe examined at that level's
resolution (its ``finest_region``); next to exhaustive occlusion at each level's
resolution (the recall of its own top 5 %). Written to ``results/hipe_curve.json``.

Usage::

    python benchmarks/_perturbation_masks.py --curves --quick
    python benchmarks/_perturbation_masks.py --timing --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import trustmap
from _limits import LimitPlan, Pass, Setting, input_gradient_pass
from trustmap.core.atomic import write_text_atomic
from trustmap.core.targets import resolve_target
from trustmap.methods.perturbation import hipe as hipe_module
from trustmap.methods.perturbation._common import perturbation_baseline
from trustmap.methods.perturbation._mask_optim import rows_per_pass

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = (
    "rise",
    "hipe",
    "meaningful_perturbation",
    "extremal_perturbation",
    "iterative_saliency",
)
LIMIT_FACTOR = 1.1  # the target: within 1.1x of the forward passes needed

# Timed settings: the library defaults are the papers' (RISE 4000 masks, 300 and 800
# optimisation steps), which take many minutes per call on 2 cores; the benchmark times
# fewer, and the ratio to the limit does not depend on the count.
BENCH_PARAMS: dict[str, dict[str, Any]] = {
    "rise": {"n_samples": 500, "seed": 0},
    "hipe": {},
    "meaningful_perturbation": {"n_iter": 30, "seed": 0},
    "extremal_perturbation": {"n_iter": 30, "seed": 0},
    "iterative_saliency": {"max_iter": 5, "seed": 0},
}
QUICK_PARAMS: dict[str, dict[str, Any]] = {
    "rise": {"n_samples": 100, "seed": 0},
    "hipe": {},
    "meaningful_perturbation": {"n_iter": 5, "seed": 0},
    "extremal_perturbation": {"n_iter": 5, "seed": 0},
    "iterative_saliency": {"max_iter": 3, "seed": 0},
}
# No library has these methods (see the module docstring).
PEERS: dict[str, list] = {name: [] for name in METHODS}


# ------------------------------------------------------------------------------------
# Limits
# ------------------------------------------------------------------------------------
def _forward_rows(s: Setting, n: int) -> Callable[[], object]:
    """One inference-mode forward of ``n`` rows (copies of the first sample)."""
    rows = s.x[:1].expand(n, *s.x.shape[1:]).contiguous()

    def run() -> object:
        with torch.inference_mode():
            return s.model(rows)[:, s.target]

    return run


def _gradient_rows(s: Setting, n: int) -> Callable[[], object]:
    """One input-gradient pass of ``n`` rows (the batch when ``n == B``)."""
    if n == s.x.shape[0]:
        return input_gradient_pass(s)
    rows = s.x[:1].expand(n, *s.x.shape[1:]).contiguous()
    return input_gradient_pass(Setting(s.label, s.model, rows, s.target))


def _chunked(s: Setting, n_rows: int, chunk: int) -> list[Pass]:
    full, rest = divmod(n_rows, chunk)
    passes = []
    if full:
        passes.append(Pass(f"forward x{chunk}", full, _forward_rows(s, chunk)))
    if rest:
        passes.append(Pass(f"forward x{rest}", 1, _forward_rows(s, rest)))
    return passes


def limit_plan(
    name: str, params: dict[str, Any], s: Setting, used: dict[str, Any] | None = None
) -> LimitPlan | None:
    """The bare passes of ``name`` with ``params`` on ``s``; ``used`` is the explanation's
    params (HiPe's windows per level, iterative saliency's iterations), needed for the
    two methods whose work depends on the image."""
    if name not in METHODS:
        return None
    b = s.x.shape[0]
    clean = Pass(f"forward (B={b})", 1, _forward_rows(s, b))
    chunk = rows_per_pass(params.get("batch_size"), s.x)
    if name == "rise":
        n = int(params.get("n_samples", 4000))
        # trustmap forwards max(1, chunk // B) masks of every sample per pass.
        k = max(1, chunk // b)
        full, rest = divmod(n, k)
        passes = [Pass(p.key, p.count * full, p.run) for p in _chunked(s, k * b, chunk)]
        if rest:
            passes += _chunked(s, rest * b, chunk)
        passes = _merge(passes) if full else passes
        return LimitPlan(
            f"{n} masks x B={b} rows forwarded in chunks of {chunk} + 1 on x",
            (clean, *passes),
            LIMIT_FACTOR,
        )
    if name == "hipe":
        if not used or "windows_per_level" not in used:
            return None
        per_level = [sum(level) for level in zip(*used["windows_per_level"])]
        passes = [clean]
        for rows in per_level:
            passes += _chunked(s, rows, chunk)
        return LimitPlan(
            f"{sum(per_level)} windows over {len(per_level)} levels + 1 on x",
            tuple(_merge(passes)),
            LIMIT_FACTOR,
        )
    if name in ("meaningful_perturbation", "extremal_perturbation"):
        n_iter = int(params.get("n_iter", 300 if name == "meaningful_perturbation" else 800))
        areas = params.get("areas", 0.1)
        n_areas = len(areas) if isinstance(areas, (list, tuple)) else 1
        rows = b * (n_areas if name == "extremal_perturbation" else 1)
        grad = Pass(f"input-gradient pass ({rows} rows)", n_iter, _gradient_rows(s, rows))
        final = Pass(f"forward ({rows} rows)", 1, _forward_rows(s, rows))
        return LimitPlan(
            f"{n_iter} input-gradient passes of {rows} rows + 2 forwards",
            (clean, grad, final),
            LIMIT_FACTOR,
        )
    if params.get("base", "gradient") != "gradient" or not used or "iterations" not in used:
        return None
    its = used["iterations"]
    passes = [clean]
    for i in range(1, max(its) + 1):
        active = sum(1 for n in its if n >= i)
        passes.append(Pass(f"input-gradient pass ({active} rows)", 1, _gradient_rows(s, active)))
        passes.append(Pass(f"forward ({active} rows)", 1, _forward_rows(s, active)))
    return LimitPlan(
        f"{sum(its)} maps: an input-gradient pass and a forward each + 1 on x",
        tuple(_merge(passes)),
        LIMIT_FACTOR,
    )


def _merge(passes: list[Pass]) -> list[Pass]:
    """Equal passes (same key) combined into one with the summed count."""
    merged: dict[str, Pass] = {}
    for p in passes:
        if p.key in merged:
            merged[p.key] = Pass(p.key, merged[p.key].count + p.count, p.run)
        else:
            merged[p.key] = p
    return list(merged.values())


# ------------------------------------------------------------------------------------
# Setting (as methods.py)
# ------------------------------------------------------------------------------------
def make_setting(dims: int, shape: tuple[int, ...]) -> Setting:
    from monai.networks.nets import DenseNet121

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2).eval()
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn((*shape[:2], *([8] * dims)), generator=gen)
    mode = "bilinear" if dims == 2 else "trilinear"
    x = F.interpolate(coarse, size=shape[2:], mode=mode, align_corners=False)
    x = (x + 0.1 * torch.randn(shape, generator=gen)).contiguous()
    return Setting(f"{dims}D", model, x, 1)


def _seconds(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timing(dims: list[int], quick: bool, repeats: int) -> dict[str, Any]:
    """Each method vs its limit on DenseNet121 (the setting of ``methods.py``).

    After a warm-up of each, trustmap's call and the whole limit loop are timed
    alternately ``repeats`` times and the fastest of each is kept: on a shared machine
    the two then see the same load, which timing them minutes apart does not ensure.
    """
    shapes = {
        2: (1, 1, 64, 64) if quick else (4, 1, 128, 128),
        3: (1, 1, 32, 32, 32) if quick else (1, 1, 64, 64, 64),
    }
    table = QUICK_PARAMS if quick else BENCH_PARAMS
    out: dict[str, Any] = {}
    for d in dims:
        s = make_setting(d, shapes[d])
        out[s.label] = {}
        for name in METHODS:
            params = dict(table[name])
            explainer = trustmap.get_method(name)(s.model, **params)
            used: dict[str, Any] = {}

            def run(explainer=explainer, used=used, s=s) -> None:
                used.update(explainer.explain(s.x, target=s.target).params)

            run()
            plan = limit_plan(name, params, s, used)

            def limit(plan=plan) -> None:
                for p in plan.passes:
                    for _ in range(p.count):
                        p.run()

            limit()
            runs = [(_seconds(run), _seconds(limit)) for _ in range(max(1, repeats))]
            t, lim = min(r[0] for r in runs), min(r[1] for r in runs)
            rec = {
                "seconds": t,
                "limit_seconds": lim,
                "limit": plan.description,
                "ratio_to_limit": t / lim,
                "limit_target_met": t / lim <= LIMIT_FACTOR,
                "runs": runs,
                "peers": "none (no library has this method)",
                "params": dict(params),
            }
            for key in ("n_evaluations", "occlusion_evaluations", "iterations"):
                if key in used:
                    rec[key] = used[key]
            out[s.label][name] = rec
            print(
                f"  {s.label} {name:<24} trustmap {t:.2f} s  limit {lim:.2f} s "
                f"({t / lim:.2f}x)  [{plan.description}]",
                flush=True,
            )
    return out


# ------------------------------------------------------------------------------------
# HiPe: evaluations to find the occlusion map's top 5 %
# ------------------------------------------------------------------------------------
class Box(nn.Module):
    """A focused model: the second logit is the mean of ``x`` over a box."""

    def __init__(self, spatial: tuple[int, ...], box: tuple[slice, ...]) -> None:
        super().__init__()
        w = torch.zeros(spatial)
        w[box] = 1.0 / w[box].numel()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[:, 0] * self.w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s], 1)


def full_occlusion(
    model: nn.Module, x: torch.Tensor, cells: tuple[int, ...], target: int, chunk: int
) -> tuple[torch.Tensor, int]:
    """Occlusion with every window of one HiPe level (the relu'd drop summed over the
    windows covering each voxel) and the number of evaluations it took."""
    with torch.no_grad():
        output = model(x)
    resolved = resolve_target(target, output)
    clean = resolved.scores(output).to(x.dtype)
    counts = tuple(math.ceil(n / c) + 1 for n, c in zip(x.shape[2:], cells))
    selected = torch.ones((x.shape[0], *counts), dtype=torch.bool)
    base = perturbation_baseline(x, "zeros")
    sal, n = hipe_module.occlude_windows(model, x, base, clean, resolved, cells, selected, chunk)
    return sal, int(n.sum()) + 1


def top_region(a: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = a.flatten()
    k = max(1, round(fraction * flat.numel()))
    region = torch.zeros_like(flat, dtype=torch.bool)
    region[flat.topk(k).indices] = True
    return region


def hipe_curve(
    model: nn.Module, x: torch.Tensor, target: int, min_window: int, fraction: float = 0.05
) -> dict[str, Any]:
    """HiPe stopped after each level vs exhaustive occlusion at each level's resolution,
    both scored by their recall of the finest occlusion map's top ``fraction``."""
    spatial = tuple(x.shape[2:])
    window = (min_window,) * len(spatial)
    levels = hipe_module.level_cells(spatial, hipe_module.default_start_cells(spatial), window)
    chunk = rows_per_pass(None, x)
    reference, n_reference = full_occlusion(model, x, levels[-1], target, chunk)
    truth = top_region(reference[0, 0], fraction)
    hipe_points, occlusion_points = [], []
    for cells in levels:
        exp = trustmap.get_method("hipe")(model, min_window=[2 * c for c in cells]).explain(
            x, target=target
        )
        found = top_region(exp.attributions[0, 0], fraction)
        reached = exp.params["finest_region"][0, 0].flatten()
        hipe_points.append(
            {
                "cells": list(cells),
                "evaluations": exp.params["n_evaluations"][0],
                "recall": float((found & truth).sum() / truth.sum()),
                "reached": float((reached & truth).sum() / truth.sum()),
            }
        )
        occ, n_occ = full_occlusion(model, x, cells, target, chunk)
        found = top_region(occ[0, 0], fraction)
        occlusion_points.append(
            {
                "cells": list(cells),
                "evaluations": n_occ,
                "recall": float((found & truth).sum() / truth.sum()),
            }
        )
    return {
        "reference": {"cells": list(levels[-1]), "evaluations": n_reference},
        "hipe": hipe_points,
        "occlusion": occlusion_points,
    }


def curves(quick: bool) -> dict[str, Any]:
    size = 64 if quick else 128
    min_window = 8
    out: dict[str, Any] = {"fraction": 0.05, "min_window": min_window, "cases": {}}
    box = (slice(size // 4, size // 4 + size // 8), slice(size // 2, size // 2 + size // 8))
    gen = torch.Generator().manual_seed(0)
    x_box = 0.5 + torch.rand((1, 1, size, size), generator=gen)
    s = make_setting(2, (1, 1, size, size))
    cases = {
        f"box model, {size}x{size}, box {size // 8}x{size // 8}": (
            Box((size, size), box),
            x_box,
        ),
        f"DenseNet121 (untrained, as methods.py), 1x1x{size}x{size}": (s.model, s.x),
    }
    for label, (model, x) in cases.items():
        result = hipe_curve(model, x, 1, min_window)
        out["cases"][label] = result
        print(f"\n{label}: reference occlusion {result['reference']['evaluations']} evaluations")
        head = ("cells", "HiPe evals", "recall", "reached", "occlusion evals", "recall")
        print("  {:<10} {:>10} {:>7} {:>8}   {:>15} {:>7}".format(*head))
        for h, o in zip(result["hipe"], result["occlusion"]):
            print(
                f"  {h['cells']!s:<10} {h['evaluations']:>10} {h['recall']:>7.2f} "
                f"{h['reached']:>8.2f}   {o['evaluations']:>15} {o['recall']:>7.2f}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--curves", action="store_true", help="HiPe evaluations vs recall")
    p.add_argument("--timing", action="store_true", help="time methods against limits")
    p.add_argument("--quick", action="store_true", help="reduced settings")
    p.add_argument("--dims", default="2", help="timing dims, e.g. 2,3")
    p.add_argument("--repeats", type=int, default=2, help="alternating timed runs")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.curves or args.timing):
        args.curves = True
    stamp = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_partial" if args.quick else ""
    if args.curves:
        result = curves(args.quick)
        result["setup"] = stamp
        path = RESULTS / f"hipe_curve{suffix}.json"
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    if args.timing:
        dims = [int(d) for d in args.dims.split(",")]
        result = timing(dims, args.quick, args.repeats)
        result["setup"] = {**stamp, "repeats": args.repeats}
        path = RESULTS / f"perturbation_masks{suffix}.json"
        write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
