"""Occlusion, LIME, KernelSHAP and Shapley sampling: limits, peers and Shapley accuracy.

Two parts.

**Timing** (hooked into ``methods.py`` through :func:`limit_plan` and :data:`PEERS`, or
run here with ``--timing``): each method against its *limit*, the bare forward passes of
the perturbed inputs it evaluates, in the same chunks, under inference mode (building the
inputs, segmenting and the regressions are the overhead measured against it), and
against its peers at equal settings and segments: captum ``Occlusion``, ``Lime``,
``KernelShap``, ``ShapleyValueSampling``, MONAI ``OcclusionSensitivity`` and the `lime`
package's ``LimeImageExplainer``.

**Accuracy per model evaluation** (``--curves``): on a CNN with 16 segments (a 4 x 4
grid), the exact Shapley values are computed from all ``2^16`` coalitions; then
trustmap's ``kernel_shap`` and ``shapley_sampling`` and captum's ``KernelShap`` and
``ShapleyValueSampling`` are run at several budgets, with several seeds, counting the
rows each one forwards. Reported: relative L2 error versus evaluations, and for each
captum point how many evaluations trustmap needs for the same error (target: at most
half). Written to ``results/shapley_curves.json``.

Usage::

    python benchmarks/_perturbation_segments.py --curves    # ~15 min on 2 idle cores
    python benchmarks/_perturbation_segments.py --timing --quick    # reduced settings
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import trustmap
from _limits import LimitPlan, Pass, Setting
from _peers import Peer, Unsupported
from trustmap.core.atomic import write_text_atomic
from trustmap.methods.perturbation import _coalitions, _segmentation, occlusion

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("occlusion", "lime", "kernel_shap", "shapley_sampling")

# The comparison settings: occlusion window 16 stride 8; LIME and KernelSHAP 200
# samples over SLIC segments (49 for n_segments=50 on the benchmark image); Shapley
# sampling 2 orderings (captum's cost n * M + 1 forward rows, ours at most n * (M - 1) + 2).
BENCH_PARAMS: dict[str, dict[str, Any]] = {
    "occlusion": {"window": 16, "stride": 8, "baseline": 0.0},
    "lime": {"n_samples": 200, "seed": 0},
    "kernel_shap": {"n_samples": 200, "seed": 0},
    "shapley_sampling": {"n_samples": 2, "seed": 0},
}


# ------------------------------------------------------------------------------------
# Counting forward rows
# ------------------------------------------------------------------------------------
class Counting(nn.Module):
    """Wraps a model and counts the rows it forwards (every library, same counter)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += int(x.shape[0])
        return self.model(x)


# ------------------------------------------------------------------------------------
# Limits
# ------------------------------------------------------------------------------------
def _forward_rows(s: Setting, n: int) -> Callable[[], object]:
    """One inference-mode forward of ``n`` rows (copies of the first sample), in the
    channels-last layout the methods hand the model on CPU (see ``FastLayout``)."""
    rows = s.x[:1].expand(n, *s.x.shape[1:]).contiguous()
    if rows.device.type == "cpu":
        rows = _coalitions.channels_last(rows)

    def run() -> object:
        with torch.inference_mode():
            return s.model(rows)[:, s.target]

    return run


def forward_plan(s: Setting, n_rows: int, chunk: int, what: str) -> LimitPlan:
    """The batch ``x`` and ``n_rows`` perturbed inputs forwarded in chunks of ``chunk``
    rows, ``x`` in the first chunk (as the methods do; see ``score_with_x``)."""
    b = s.x.shape[0]
    first = min(n_rows, max(0, chunk - b))
    passes = [Pass(f"forward x{b + first}", 1, _forward_rows(s, b + first))]
    full, rest = divmod(n_rows - first, chunk)
    if full:
        passes.append(Pass(f"forward x{chunk}", full, _forward_rows(s, chunk)))
    if rest:
        passes.append(Pass(f"forward x{rest}", 1, _forward_rows(s, rest)))
    return LimitPlan(
        f"x and {n_rows} perturbed inputs, forwarded in chunks of {chunk} ({what})",
        tuple(passes),
        1.1,
    )


def limit_plan(
    name: str, params: dict[str, Any], s: Setting, used: dict[str, Any] | None = None
) -> LimitPlan | None:
    """The bare forward passes of ``name`` with ``params`` on setting ``s``.

    For occlusion the count follows from the window grid. For the segment methods it is
    the number of perturbed rows the method reported (``used["n_evaluations"]``, from the
    explanation's params: it depends on the segments found and, for Shapley sampling, on
    how many coalitions repeat), or, without it, the nominal count.
    """
    if name not in METHODS:
        return None
    b, _, *spatial = s.x.shape
    chunk = _coalitions.batch_rows(s.x, params.get("batch_size"))
    if name == "occlusion":
        window = occlusion.per_axis("window", params.get("window", 16), len(spatial))
        stride = occlusion.per_axis("stride", params.get("stride"), len(spatial), allow_none=True)
        stride = stride or tuple(max(1, (w + 1) // 2) for w in window)
        n_win = math.prod(
            len(occlusion.window_starts(n, w, st)) for n, w, st in zip(spatial, window, stride)
        )
        return forward_plan(s, b * n_win, chunk, f"{n_win} windows x B={b}")
    if used and "n_evaluations" in used:
        n_rows = int(used["n_evaluations"]) - b
        return forward_plan(s, n_rows, chunk, "rows the method reported")
    n = params.get("n_samples")
    if name == "lime":
        return forward_plan(s, b * (int(n) - 1), chunk, "n_samples - 1 per image")
    if name == "kernel_shap" and n is not None:
        return forward_plan(s, b * (int(n) + 1), chunk, "n_samples + empty per image")
    return None


# ------------------------------------------------------------------------------------
# Peers (same segments, same samples, same target)
# ------------------------------------------------------------------------------------
def _segments_of(s: Setting, params: dict[str, Any]) -> torch.Tensor:
    """trustmap's segmentation of the setting's batch, ``(B, *spatial)``, for the peers."""
    seg = _segmentation.prepare(
        s.x,
        params.get("segments"),
        params.get("segmentation", "slic"),
        params.get("n_segments", 50),
        params.get("segmentation_params"),
    )
    return seg.labels.view(s.x.shape[0], *s.x.shape[2:])


def _captum_occlusion(s: Setting, params: dict[str, Any]) -> Callable[[], object]:
    from captum.attr import Occlusion

    b, c, *spatial = s.x.shape
    window = occlusion.per_axis("window", params.get("window", 16), len(spatial))
    stride = occlusion.per_axis("stride", params.get("stride"), len(spatial), allow_none=True)
    stride = stride or tuple(max(1, (w + 1) // 2) for w in window)
    chunk = _coalitions.batch_rows(s.x, params.get("batch_size"))
    method = Occlusion(s.model)
    baseline = params.get("baseline", 0.0)
    if not isinstance(baseline, (int, float)):
        raise Unsupported("the peer is timed with a constant baseline only")
    return lambda: method.attribute(
        s.x,
        sliding_window_shapes=(c, *window),
        strides=(c, *stride),
        baselines=float(baseline),
        target=s.target,
        perturbations_per_eval=max(1, chunk // b),
    )


def _monai_occlusion(s: Setting, params: dict[str, Any]) -> Callable[[], object]:
    import copy

    from monai.visualize import OcclusionSensitivity

    window = params.get("window", 16)
    stride = params.get("stride") or max(1, (window + 1) // 2)
    if not isinstance(window, int) or not isinstance(stride, int):
        raise Unsupported("MONAI takes one window size and an overlap fraction")
    chunk = _coalitions.batch_rows(s.x, params.get("batch_size"))
    occ = OcclusionSensitivity(
        nn_module=copy.deepcopy(s.model),
        mask_size=window,
        n_batch=chunk,
        verbose=False,
        mode=float(params.get("baseline", 0.0)),
        overlap=1.0 - stride / window,
        activate=False,
    )
    # MONAI takes one image per call.
    return lambda: [occ(s.x[i : i + 1]) for i in range(s.x.shape[0])]


def _captum_segment(cls_name: str) -> Callable[[Setting, dict[str, Any]], Callable[[], object]]:
    def build(s: Setting, params: dict[str, Any]) -> Callable[[], object]:
        import captum.attr as ca

        mask = _segments_of(s, params).unsqueeze(1)
        method = getattr(ca, cls_name)(s.model)
        chunk = _coalitions.batch_rows(s.x, params.get("batch_size"))
        baseline = params.get("baseline", 0.0)
        if not isinstance(baseline, (int, float)):
            raise Unsupported("the peer is timed with a constant baseline")
        kw: dict[str, Any] = {
            "target": s.target,
            "baselines": float(baseline),
            "perturbations_per_eval": chunk,
        }
        if cls_name == "ShapleyValueSampling":
            kw["n_samples"] = int(params.get("n_samples") or 25)
        else:
            kw["n_samples"] = int(params.get("n_samples") or 200)

        def run() -> object:
            # captum's Lime and KernelShap explain one sample per call with a feature mask.
            with torch.random.fork_rng():
                torch.manual_seed(0)
                if cls_name == "ShapleyValueSampling":
                    return method.attribute(s.x, feature_mask=mask, **kw)
                return [
                    method.attribute(s.x[i : i + 1], feature_mask=mask[i : i + 1], **kw)
                    for i in range(s.x.shape[0])
                ]

        return run

    return build


def _lime_package(s: Setting, params: dict[str, Any]) -> Callable[[], object]:
    if s.x.ndim != 4 or s.x.shape[1] != 1:
        raise Unsupported("the lime package explains 2D images (grey or RGB)")
    from lime import lime_image

    labels = _segments_of(s, params).cpu().numpy()
    chunk = _coalitions.batch_rows(s.x, params.get("batch_size"))
    n = int(params.get("n_samples") or 1000)

    def classifier(images: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(images[..., :1])).permute(0, 3, 1, 2)
        with torch.inference_mode():
            return s.model(t.to(s.x.dtype)).numpy()

    def run() -> object:
        out = []
        for i in range(s.x.shape[0]):
            explainer = lime_image.LimeImageExplainer(random_state=0)
            image = np.repeat(s.x[i, 0].numpy()[..., None], 3, axis=-1).astype(np.float64)
            seg = labels[i]
            out.append(
                explainer.explain_instance(
                    image,
                    classifier,
                    labels=(s.target,),
                    top_labels=None,
                    hide_color=None,
                    num_samples=n,
                    batch_size=chunk,
                    segmentation_fn=lambda _im, seg=seg: seg,
                    random_seed=0,
                )
            )
        return out

    return run


PEERS: dict[str, list[Peer]] = {
    "occlusion": [
        Peer("captum", "Occlusion, perturbations_per_eval=chunk/B", _captum_occlusion),
        Peer("monai", "OcclusionSensitivity, n_batch=chunk, per image", _monai_occlusion),
    ],
    "lime": [
        Peer("captum", "Lime, same segments, per image", _captum_segment("Lime")),
        Peer("lime", "LimeImageExplainer, same segments, per image", _lime_package),
    ],
    "kernel_shap": [
        Peer("captum", "KernelShap, same segments, per image", _captum_segment("KernelShap")),
    ],
    "shapley_sampling": [
        Peer(
            "captum",
            "ShapleyValueSampling, same segments",
            _captum_segment("ShapleyValueSampling"),
        ),
    ],
}


# ------------------------------------------------------------------------------------
# Accuracy per evaluation
# ------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """A random 2D CNN with ReLUs and global pooling: non-additive over segments."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def curve_setting(size: int = 64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The CNN, one image ``(1, 1, size, size)`` and its 4 x 4 grid of segments."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SmallCNN().double().eval()
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn((1, 1, 8, 8), generator=gen, dtype=torch.float64)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    labels = torch.from_numpy(_segmentation.grid_labels((size, size), 16))
    return model, x, labels


@torch.inference_mode()
def all_coalition_values(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, target: int, chunk: int = 1024
) -> np.ndarray:
    """``v(S)`` for every ``S`` as a bit mask ``0..2^M - 1`` (baseline 0), by brute force."""
    m = int(labels.max()) + 1
    out = np.empty(2**m)
    flat = labels.reshape(-1)
    for start in range(0, 2**m, chunk):
        codes = torch.arange(start, min(2**m, start + chunk))
        bits = (codes[:, None] >> torch.arange(m)) & 1
        keep = bits[:, flat].bool().view(len(codes), 1, *x.shape[2:])
        out[start : start + len(codes)] = model(torch.where(keep, x, 0.0))[:, target].numpy()
    return out


def exact_shapley(values: np.ndarray) -> np.ndarray:
    """``phi_i = sum_{S not containing i} |S|! (M - |S| - 1)! / M! (v(S + i) - v(S))``."""
    m = round(math.log2(values.size))
    codes = np.arange(values.size)
    sizes = np.array([bin(c).count("1") for c in codes])
    weight = np.array(
        [math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m) for k in range(m)]
    )
    phi = np.zeros(m)
    for i in range(m):
        without = codes[(codes >> i) & 1 == 0]
        phi[i] = (weight[sizes[without]] * (values[without | (1 << i)] - values[without])).sum()
    return phi


class TableModel(nn.Module):
    """Serves the CNN's tabulated outputs: the coalition of an input is read off which
    segments still hold ``x`` (the baseline is 0 and ``x`` has no zero voxel), and the
    target logit is the CNN's value for that coalition. Other classes output 0."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, values: np.ndarray, target: int):
        super().__init__()
        m = int(labels.max()) + 1
        self.onehot = F.one_hot(labels.reshape(-1), m).to(x.dtype)
        self.values = torch.from_numpy(values)
        self.target = target
        self.pow2 = 2 ** torch.arange(m)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        on = (inp[:, 0].reshape(inp.shape[0], -1) != 0).to(inp.dtype) @ self.onehot
        codes = ((on > 0).long() * self.pow2).sum(1)
        out = torch.zeros((inp.shape[0], 2), dtype=inp.dtype)
        out[:, self.target] = self.values[codes].to(inp.dtype)
        return out


def _run_trustmap(name: str, model: Counting, x, labels, target, n, seed) -> np.ndarray:
    exp = trustmap.get_method(name)(
        model, segments=labels, n_samples=n, seed=seed, baseline=0.0, batch_size=256
    ).explain(x, target=target)
    return np.asarray(exp.params["segment_weights"][0])


def _run_captum(cls_name: str, model: Counting, x, labels, target, n, seed) -> np.ndarray:
    import captum.attr as ca

    method = getattr(ca, cls_name)(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        attr = method.attribute(
            x,
            target=target,
            baselines=0.0,
            feature_mask=labels[None, None],
            n_samples=n,
            perturbations_per_eval=256,
        )
    flat = attr.reshape(-1).double()
    m = int(labels.max()) + 1
    # Every voxel of a segment carries the segment's value.
    first = torch.stack([(labels.reshape(-1) == k).nonzero()[0, 0] for k in range(m)])
    return flat[first].numpy()


ESTIMATORS: dict[str, tuple[Callable, str, list[int]]] = {
    # name: (runner, method, budgets as n_samples)
    "trustmap kernel_shap": (
        lambda *a: _run_trustmap("kernel_shap", *a),
        "kernel_shap",
        [16, 32, 64, 128, 256, 512, 1024, 2048],
    ),
    "captum KernelShap": (
        lambda *a: _run_captum("KernelShap", *a),
        "kernel_shap",
        [32, 64, 128, 256, 512, 1024, 2048, 4096],
    ),
    "trustmap shapley_sampling": (
        lambda *a: _run_trustmap("shapley_sampling", *a),
        "shapley_sampling",
        [1, 2, 4, 8, 16, 32, 64, 128, 256],
    ),
    "captum ShapleyValueSampling": (
        lambda *a: _run_captum("ShapleyValueSampling", *a),
        "shapley_sampling",
        [1, 2, 4, 8, 16, 32, 64, 128, 256],
    ),
}


def _interp_evals(curve: list[dict], error: float) -> float | None:
    """Evaluations at which ``curve`` reaches ``error`` (log-log interpolation); None if
    the curve never gets that low."""
    pts = sorted((p["evaluations"], p["error"]) for p in curve)
    if pts[0][1] <= error:
        return float(pts[0][0])  # already there at the smallest budget: an upper bound
    for (e0, r0), (e1, r1) in itertools.pairwise(pts):
        if r1 <= error:
            t = (math.log(error) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return float(math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0))))
    return None


def shapley_curves(repeats: int, size: int, direct: bool, target: int = 1) -> dict[str, Any]:
    model, x, labels = curve_setting(size)
    t0 = time.perf_counter()
    values = all_coalition_values(model, x, labels, target)
    exact = exact_shapley(values)
    exact_seconds = time.perf_counter() - t0
    served: nn.Module = model
    if not direct:
        served = TableModel(x, labels, values, target)
        # The table answers exactly what the CNN answers, coalition by coalition.
        gen = torch.Generator().manual_seed(0)
        bits = torch.randint(0, 2, (64, 16), generator=gen).bool()
        probe = torch.where(bits[:, labels.reshape(-1)].view(64, 1, size, size), x, 0.0)
        with torch.inference_mode():
            gap = (served(probe)[:, target] - model(probe)[:, target]).abs().max()
        assert float(gap) < 1e-12, f"table and CNN disagree by {float(gap)}"
    norm = float(np.linalg.norm(exact))
    counting = Counting(served)
    curves: dict[str, list[dict]] = {}
    for label, (run, _method, budgets) in ESTIMATORS.items():
        curves[label] = []
        for n in budgets:
            errors, evals = [], []
            for r in range(repeats):
                counting.rows = 0
                phi = run(counting, x, labels, target, n, 1000 + r)
                evals.append(counting.rows)
                errors.append(float(np.linalg.norm(phi - exact)) / norm)
            point = {
                "n_samples": n,
                "evaluations": float(np.mean(evals)),
                "error": float(np.sqrt(np.mean(np.square(errors)))),
                "error_sem": float(np.std(errors) / math.sqrt(len(errors))),
            }
            curves[label].append(point)
            print(
                f"  {label:<28} n={n:<5} evaluations {point['evaluations']:>7.0f}  "
                f"rel. error {point['error']:.4f}",
                flush=True,
            )
    comparisons = []
    for ours, theirs in (
        ("trustmap kernel_shap", "captum KernelShap"),
        ("trustmap shapley_sampling", "captum ShapleyValueSampling"),
    ):
        for p in curves[theirs]:
            need = _interp_evals(curves[ours], p["error"])
            comparisons.append(
                {
                    "trustmap": ours,
                    "peer": theirs,
                    "peer_evaluations": p["evaluations"],
                    "peer_error": p["error"],
                    "trustmap_evaluations_for_same_error": need,
                    "ratio": None if need is None else need / p["evaluations"],
                }
            )
    return {
        "setting": {
            "model": "random 4-layer CNN (16-32-64-64 channels, ReLU, global mean pool), "
            "float64, torch.manual_seed(0)",
            "input": f"1 x 1 x {size} x {size} smooth random field + noise, seed 0",
            "segments": "4 x 4 grid (16 segments)",
            "baseline": 0.0,
            "target": target,
            "repeats": repeats,
            "error": "RMS over repeats of ||phi - phi_exact||_2 / ||phi_exact||_2",
            "evaluations": "rows forwarded through the model, counted by a wrapper",
            "served": "the CNN itself"
            if direct
            else "the table of all 2^16 CNN outputs (same values, checked on 64 coalitions)",
            "exact": f"all 2^16 coalitions, {exact_seconds:.1f} s",
        },
        "exact_shapley": exact.tolist(),
        "curves": curves,
        "comparisons": comparisons,
    }


def print_curves(result: dict[str, Any]) -> None:
    print()
    print("peer                         peer evals  peer error  trustmap evals  ratio")
    for c in result["comparisons"]:
        need = c["trustmap_evaluations_for_same_error"]
        ratio = c["ratio"]
        print(
            f"{c['peer']:<28} {c['peer_evaluations']:>10.0f}  {c['peer_error']:>10.4f}  "
            f"{'n/a' if need is None else f'{need:.0f}':>14}  "
            f"{'n/a' if ratio is None else f'{ratio:.2f}':>5}"
        )


# ------------------------------------------------------------------------------------
# Timing, standalone
# ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _interleaved(
    runners: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds of each runner over ``rounds`` rounds, after one warm-up each.

    Every round times all runners once, in rotating order, so that load from other
    processes on a shared machine falls on all of them alike. ``clock`` is
    ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time of this process,
    steadier when other processes compete for the cores).
    """
    names = list(runners)
    for name in names:
        runners[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            runners[name]()
            times[name].append(clock() - start)
    return {n: float(np.median(t)) for n, t in times.items()}


def timing(dims: list[int], quick: bool, rounds: int, cpu: bool) -> dict[str, Any]:
    """Each method vs its limit and peers on DenseNet121 (as ``methods.py``), timed in
    interleaved rounds (see :func:`_interleaved`)."""
    from monai.networks.nets import DenseNet121

    shapes = {
        2: (1, 1, 64, 64) if quick else (4, 1, 128, 128),
        3: (1, 1, 32, 32, 32) if quick else (1, 1, 64, 64, 64),
    }
    out: dict[str, Any] = {}
    for d in dims:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = DenseNet121(spatial_dims=d, in_channels=1, out_channels=2).eval()
        shape = shapes[d]
        gen = torch.Generator().manual_seed(0)
        coarse = torch.randn((*shape[:2], *([8] * d)), generator=gen)
        mode = "bilinear" if d == 2 else "trilinear"
        x = F.interpolate(coarse, size=shape[2:], mode=mode, align_corners=False)
        x = (x + 0.1 * torch.randn(shape, generator=gen)).contiguous()
        s = Setting(f"{d}D", model, x, 1)
        out[s.label] = {}
        for name in METHODS:
            params = dict(BENCH_PARAMS[name])
            if quick and name == "occlusion":
                params.update(window=16, stride=16)
            if quick and name in ("lime", "kernel_shap"):
                params.update(n_samples=50)
            explainer = trustmap.get_method(name)(model, **params)
            used: dict[str, Any] = {}

            def run(explainer=explainer, used=used, s=s) -> None:
                used.update(explainer.explain(s.x, target=s.target).params)

            run()
            plan = limit_plan(name, params, s, used)

            def limit(plan=plan) -> None:
                for p in plan.passes:
                    for _ in range(p.count):
                        p.run()

            runners: dict[str, Callable[[], object]] = {"trustmap": run, "limit": limit}
            notes = {}
            for peer in PEERS[name]:
                label = f"{peer.library}: {peer.variant}"
                try:
                    runners[label] = peer.build(s, params)
                except (ImportError, Unsupported) as exc:
                    notes[label] = f"skipped ({exc})"
            with _quiet():
                clock = time.process_time if cpu else time.perf_counter
                secs = _interleaved(runners, rounds, clock)
            t, lim = secs.pop("trustmap"), secs.pop("limit")
            rec = {
                "seconds": t,
                "limit_seconds": lim,
                "limit": plan.description,
                "ratio_to_limit": t / lim,
                "peers": secs,
                "peer_notes": notes,
                "ratio_to_fastest_peer": t / min(secs.values()) if secs else None,
                "n_evaluations": used.get("n_evaluations"),
                "clock": "process CPU time" if cpu else "wall",
                "params": params,
            }
            out[s.label][name] = rec
            peer_txt = ", ".join(f"{k.split(':')[0]} {v:.2f} s" for k, v in secs.items())
            print(
                f"  {s.label} {name:<17} trustmap {t:.2f} s  limit {lim:.2f} s "
                f"({t / lim:.2f}x)  peers: {peer_txt}",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--curves", action="store_true", help="Shapley error vs evaluations")
    p.add_argument("--repeats", type=int, default=50, help="seeds per curve point")
    p.add_argument("--sizes", default="32,64", help="image sizes of the curve CNN (one game each)")
    p.add_argument(
        "--direct", action="store_true", help="run the estimators on the CNN, not its table"
    )
    p.add_argument("--timing", action="store_true", help="time methods, limits and peers")
    p.add_argument("--quick", action="store_true", help="reduced timing settings")
    p.add_argument("--dims", default="2", help="timing dims, e.g. 2,3")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument(
        "--cpu-time", action="store_true", help="time by process CPU time (busy machine)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="curves JSON (default results/shapley_curves.json)")
    args = p.parse_args(argv)
    args.sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    torch.set_num_threads(args.threads)
    if not (args.curves or args.timing):
        args.curves = True
    if args.curves:
        games = {}
        for size in args.sizes:
            print(f"Shapley curves, CNN on {size} x {size}: {args.repeats} seeds per point")
            games[f"{size}x{size}"] = result = shapley_curves(args.repeats, size, args.direct)
            print_curves(result)
        payload = {
            "games": games,
            "setup": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        }
        out = args.out or RESULTS / "shapley_curves.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}")
    if args.timing:
        dims = [int(d) for d in args.dims.split(",")]
        result = timing(dims, args.quick, args.rounds, args.cpu_time)
        name = "perturbation_segments_partial.json" if args.quick else "perturbation_segments.json"
        write_text_atomic(RESULTS / name, json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
