"""Paper 004's trust protocol assembled from the usual libraries, for ``trust.py``.

The same criteria as :func:`trustmap.trust.evaluate`, on the same prepared models and
images, with the same methods and parameters, written the way a user would assemble them
without trustmap:

* maps: captum (``Saliency``, ``NoiseTunnel(Saliency)``, ``IntegratedGradients``,
  ``NoiseTunnel(IntegratedGradients)``, ``LayerGradCam`` + ``LayerAttribution.interpolate``,
  ``GuidedBackprop``, ``GuidedGradCam``) and PAIR ``saliency``'s ``XRAI`` with its own
  integrated gradients, one image at a time; every pass holds as many rows as trustmap's
  (``internal_batch_size`` / ``nt_samples_batch_size=1`` / PAIR ``batch_size``);
* post-processing in numpy, one map at a time: ``|A|``, sum over channels, clip at the
  99th percentile, min-max;
* randomization: a ``copy.deepcopy`` of the trained model for every stage, whose stage
  modules (``trustmap.trust.randomization.model_stages``, the stage *definition*) are
  re-initialised with the seeds trustmap draws, so both sides explain the same weights;
* metrics: ``skimage.metrics.structural_similarity``, ``sklearn.metrics``
  ``precision_recall_curve`` + ``auc`` and ``roc_auc_score``, one call per map;
* faithfulness: deletion and insertion curves, sensitivity-n and the IG completeness gap as
  plain PyTorch loops (no library ships them) with trustmap's definitions and batch sizes;
* statistics, figures and report: trustmap's own code (``_statistics``, ``write_outputs``),
  so those cost the same on both sides.

Every part is timed into exclusive buckets (:class:`Buckets`), named like the buckets
``trust.py`` measures on trustmap's run.
"""

from __future__ import annotations

import copy
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from trustmap.trust.protocol import records

TARGET = 1  # the protocol explains the positive class of every evaluated image

# The methods this peer assembles, and the library that provides each.
PEER_LIBRARY = {
    "gradient": "captum Saliency(abs=False)",
    "smoothgrad": "captum NoiseTunnel(Saliency), nt_samples_batch_size=1",
    "integrated_gradients": "captum IntegratedGradients(riemann_trapezoid), internal_batch_size=B",
    "smooth_ig": "captum NoiseTunnel(IntegratedGradients), nt_samples_batch_size=1, "
    "internal_batch_size=B",
    "grad_cam": "captum LayerGradCam(relu) + LayerAttribution.interpolate(bilinear)",
    "xrai": "PAIR saliency XRAI.GetMask (own IG, min/max baselines), per image, batch_size=B",
    "guided_backprop": "captum GuidedBackprop",
    "guided_grad_cam": "captum GuidedGradCam(interpolate_mode=bilinear)",
}


# ------------------------------------------------------------------------------------
# Exclusive timing
# ------------------------------------------------------------------------------------
class Buckets:
    """Exclusive wall time per named bucket: time inside a nested bucket counts only there.

    ``with b("ssim"): ...`` times a block; ``b.wrap("ssim", fn)`` a function; a generator
    wrapped by :meth:`wrap_iter` is charged for each step it takes.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            _, inner = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed

    def wrap(self, name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` charged to ``name`` (or to ``name(*args, **kwargs)``)."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs) if callable(name) else name
            with self(label):
                return fn(*args, **kwargs)

        return timed

    def wrap_iter(self, name: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
        """A generator function whose creation and every step are charged to ``name``."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with self(name):
                it = fn(*args, **kwargs)
            while True:
                with self(name):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item

        return timed

    def total(self) -> float:
        return float(sum(self.seconds.values()))


# ------------------------------------------------------------------------------------
# Explainers (captum, PAIR)
# ------------------------------------------------------------------------------------
def _interp_mode(x: torch.Tensor) -> str:
    return "bilinear" if x.ndim == 4 else "trilinear"


def _ig_baseline(params: dict[str, Any]) -> float:
    baseline = params.get("baseline", "zeros")
    if isinstance(baseline, str) and baseline == "zeros":
        return 0.0
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return float(baseline)
    raise ValueError(
        f"the peer protocol supports IG baselines 'zeros' or a number, got {baseline!r}"
    )


def _sigma(x: torch.Tensor, params: dict[str, Any]) -> float:
    # trustmap scales the noise per image; captum takes one number per input tensor, so the
    # peer uses the batch's range. Same cost; the maps differ only in their noise draws.
    return float(params.get("noise_level", 0.15)) * float(x.max() - x.min())


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    # captum's NoiseTunnel draws from torch's global generator.
    with torch.random.fork_rng():
        torch.manual_seed(0 if seed is None else int(seed))
        yield


def _rule(params: dict[str, Any]) -> str:
    rule = params.get("rule", "trapezoid")
    if rule not in ("trapezoid", "riemann_trapezoid"):
        raise ValueError(f"the peer protocol supports the trapezoid IG rule only, got {rule!r}")
    return "riemann_trapezoid"


def captum_attributions(
    method: str, model: nn.Module, x: torch.Tensor, params: dict[str, Any], layer: str | None
) -> torch.Tensor:
    """Raw attributions ``(B, C, *spatial)`` (Grad-CAM: ``(B, 1, *spatial)``) from captum."""
    import captum.attr as ca

    b = x.shape[0]
    if method == "gradient":
        return ca.Saliency(model).attribute(x, target=TARGET, abs=False)
    if method == "guided_backprop":
        return ca.GuidedBackprop(model).attribute(x, target=TARGET)
    if method == "integrated_gradients":
        return ca.IntegratedGradients(model).attribute(
            x,
            baselines=_ig_baseline(params),
            target=TARGET,
            n_steps=int(params["n_steps"]),
            method=_rule(params),
            internal_batch_size=b,
        )
    if method == "smoothgrad":
        if params.get("base", "gradient") != "gradient" or params.get("variant", "mean") != "mean":
            raise ValueError("the peer protocol supports SmoothGrad of the gradient (mean) only")
        with _seeded(params.get("seed")):
            return ca.NoiseTunnel(ca.Saliency(model)).attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=int(params["n_samples"]),
                nt_samples_batch_size=1,
                stdevs=_sigma(x, params),
                target=TARGET,
                abs=False,
            )
    if method == "smooth_ig":
        with _seeded(params.get("seed")):
            return ca.NoiseTunnel(ca.IntegratedGradients(model)).attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=int(params["n_samples"]),
                nt_samples_batch_size=1,
                stdevs=_sigma(x, params),
                target=TARGET,
                baselines=_ig_baseline(params),
                n_steps=int(params["n_steps"]),
                method=_rule(params),
                internal_batch_size=b,
            )
    module = dict(model.named_modules())[layer] if layer is not None else None
    if method == "grad_cam":
        cam = ca.LayerGradCam(model, module).attribute(x, target=TARGET, relu_attributions=True)
        return ca.LayerAttribution.interpolate(
            cam, tuple(x.shape[2:]), interpolate_mode=_interp_mode(x)
        )
    if method == "guided_grad_cam":
        return ca.GuidedGradCam(model, module).attribute(
            x, target=TARGET, interpolate_mode=_interp_mode(x)
        )
    raise ValueError(f"the peer protocol has no library version of {method!r}")


def pair_model_function(model: nn.Module) -> Callable[..., dict]:
    """PAIR's ``call_model_function``: input gradients of the target logit for a
    channels-last numpy batch."""
    import saliency.core as sc

    key = sc.base.INPUT_OUTPUT_GRADIENTS

    def call(x_batch: np.ndarray, call_model_args: Any = None, expected_keys: Any = None) -> dict:
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_batch, -1, 1))).float()
        t.requires_grad_(True)
        out = model(t)
        (g,) = torch.autograd.grad(out[:, TARGET].sum(), t)
        return {key: np.moveaxis(g.numpy(), 1, -1)}

    return call


def pair_segments(image: np.ndarray, params: dict[str, Any]) -> list[np.ndarray]:
    """PAIR's Felzenszwalb segments of one ``(C, H, W)`` image (its own defaults)."""
    from saliency.core import xrai

    if params.get("segments") is not None or params.get("scales") is not None:
        raise ValueError("the peer protocol runs XRAI with PAIR's default segmentation only")
    return xrai._get_segments_felzenszwalb(
        np.moveaxis(image, 0, -1), resize_image=params.get("resize", (224, 224)) is not None
    )


def pair_xrai(
    model: nn.Module,
    x: torch.Tensor,
    params: dict[str, Any],
    segments: list[list[np.ndarray]],
    batch_size: int,
) -> np.ndarray:
    """PAIR XRAI maps ``(B, 1, *spatial)``, one image at a time."""
    import saliency.core as sc

    if x.ndim != 4:
        raise ValueError("PAIR's XRAI handles 2D images only")
    xrai = sc.XRAI()
    fn = pair_model_function(model)
    extra = sc.XRAIParameters(
        steps=int(params.get("n_steps", 25)),
        area_threshold=float(params.get("area_threshold", 1.0)),
    )
    extra.experimental_params["min_pixel_diff"] = int(params.get("min_pixel_diff", 50))
    images = x.detach().cpu().numpy()
    out = []
    for i in range(x.shape[0]):
        im = np.moveaxis(images[i], 0, -1)
        mask = xrai.GetMask(
            im, fn, batch_size=batch_size, extra_parameters=extra, segments=segments[i]
        )
        out.append(np.asarray(mask, dtype=np.float64)[None])
    return np.stack(out)


# ------------------------------------------------------------------------------------
# Post-processing and metrics, one map at a time
# ------------------------------------------------------------------------------------
def postprocess_maps(attributions: np.ndarray) -> np.ndarray:
    """``minmax(clip_99(sum_c |A|))`` per map, float32 ``(B, *spatial)``."""
    out = []
    for a in np.asarray(attributions, dtype=np.float64):
        m = np.abs(a).sum(axis=0)
        m = np.minimum(m, np.percentile(m, 99.0))
        low, span = m.min(), m.max() - m.min()
        out.append((m - low) / span if span > 0 else np.zeros_like(m))
    return np.stack(out).astype(np.float32)


def auprc_loop(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    from sklearn.metrics import auc, precision_recall_curve

    values = []
    for m, k in zip(maps, masks):
        precision, recall, _ = precision_recall_curve(k.ravel(), np.asarray(m, np.float64).ravel())
        values.append(auc(recall, precision))
    return np.asarray(values, dtype=np.float64)


def auroc_loop(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    from sklearn.metrics import roc_auc_score

    return np.asarray(
        [roc_auc_score(k.ravel(), np.asarray(m, np.float64).ravel()) for m, k in zip(maps, masks)]
    )


def ssim_loop(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    return np.asarray(
        [
            structural_similarity(
                np.asarray(x, np.float64), np.asarray(y, np.float64), data_range=1.0
            )
            for x, y in zip(a, b)
        ]
    )


# ------------------------------------------------------------------------------------
# Randomized copies
# ------------------------------------------------------------------------------------
def stage_seeds(n_stages: int, seed: int) -> list[int]:
    """The per-stage seeds trustmap draws (one ``integers`` draw per stage), so that both
    sides randomize to the same weights."""
    rng = np.random.default_rng(seed)
    return [int(rng.integers(0, 2**63 - 1)) for _ in range(n_stages)]


def reinitialise(model: nn.Module, module_names: tuple[str, ...], seed: int) -> None:
    """Re-initialise, in place, the parameters below ``module_names``: ``reset_parameters``
    where a module has it, N(0, 0.01^2) for the rest."""
    modules = dict(model.named_modules(remove_duplicate=False))
    targets = [modules[name] for name in module_names]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        done: set[int] = set()
        for module in targets:
            for sub in module.modules():
                if callable(getattr(sub, "reset_parameters", None)):
                    sub.reset_parameters()
                    done.update(id(p) for p in sub.parameters(recurse=False))
        for module in targets:
            for p in module.parameters():
                if id(p) not in done:
                    p.normal_(0.0, 0.01)
                    done.add(id(p))


def randomized_copy(
    model: nn.Module, stages: list[Any], seeds: list[int], k: int, mode: str
) -> nn.Module:
    """A fresh deep copy with stage ``k`` (independent) or stages ``0..k`` (cascading)
    re-initialised."""
    work = copy.deepcopy(model).eval()
    chosen = range(k + 1) if mode == "cascading" else [k]
    for j in chosen:
        reinitialise(work, tuple(stages[j].modules), seeds[j])
    return work


# ------------------------------------------------------------------------------------
# Faithfulness, plain loops with trustmap's definitions
# ------------------------------------------------------------------------------------
def _blurred(x1: torch.Tensor, sigma: float) -> torch.Tensor:
    from scipy.ndimage import gaussian_filter

    s = (0.0, 0.0) + (sigma,) * (x1.ndim - 2)
    return torch.from_numpy(gaussian_filter(x1.double().numpy(), s, mode="reflect")).to(x1.dtype)


def _curve_auc(
    model: nn.Module, x1: torch.Tensor, smap: np.ndarray, steps: int, deletion: bool
) -> float:
    from trustmap.metrics.faithfulness import BLUR_SIGMA

    n_pixels = smap.size
    order = np.argsort(-smap.ravel(), kind="stable")
    counts = np.arange(steps + 1) * n_pixels // steps
    base = torch.zeros_like(x1) if deletion else _blurred(x1, BLUR_SIGMA)
    start, end = (x1, base) if deletion else (base, x1)
    flat_start = start.reshape(1, x1.shape[1], -1)
    flat_end = end.reshape(1, x1.shape[1], -1)
    scores = []
    for s0 in range(0, steps + 1, 32):
        batch = []
        for n in counts[s0 : s0 + 32]:
            img = flat_start.clone()
            idx = torch.from_numpy(order[:n])
            img[..., idx] = flat_end[..., idx]
            batch.append(img.reshape(x1.shape))
        with torch.no_grad():
            logits = model(torch.cat(batch)).double()
        scores.append(torch.softmax(logits, dim=1)[:, TARGET].numpy())
    return float(np.trapezoid(np.concatenate(scores), counts / n_pixels))


def _sensitivity_n(
    model: nn.Module,
    x1: torch.Tensor,
    raw: np.ndarray,
    n_values: list[int],
    n_subsets: int,
    seed: int,
) -> dict[int, float | None]:
    from scipy.stats import pearsonr

    pixel_attr = raw.reshape(raw.shape[0], -1).sum(axis=0)
    n_pixels = pixel_attr.size
    rng = np.random.default_rng(seed)
    flat = x1.reshape(1, x1.shape[1], -1)
    with torch.no_grad():
        f_x = float(model(x1)[0, TARGET])
    out: dict[int, float | None] = {}
    for n in n_values:
        keys = rng.random((n_subsets, n_pixels))
        members = np.argpartition(keys, n - 1, axis=1)[:, :n]
        sums = pixel_attr[members].sum(axis=1)
        drops = []
        for s0 in range(0, n_subsets, 64):
            batch = []
            for row in members[s0 : s0 + 64]:
                img = flat.clone()
                img[..., torch.from_numpy(row)] = 0.0
                batch.append(img.reshape(x1.shape))
            with torch.no_grad():
                logits = model(torch.cat(batch)).double()
            drops.append(f_x - logits[:, TARGET].numpy())
        d = np.concatenate(drops)
        out[n] = None if np.ptp(sums) == 0 or np.ptp(d) == 0 else float(pearsonr(sums, d)[0])
    return out


def _completeness_gap(model: nn.Module, x1: torch.Tensor, raw: np.ndarray) -> float:
    with torch.no_grad():
        out = model(torch.cat([x1, torch.zeros_like(x1)])).double()
    delta = float(out[0, TARGET] - out[1, TARGET])
    gap = abs(float(raw.astype(np.float64).sum()) - delta)
    return gap / abs(delta) if abs(delta) > 1e-6 * max(1.0, abs(float(out[0, TARGET]))) else gap


# ------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------
@dataclass
class PeerResult:
    results: dict[str, Any]
    per_image: pd.DataFrame
    buckets: dict[str, float]
    total: float
    files: dict[str, Path]
    trained_maps: dict[str, np.ndarray] = field(default_factory=dict)
    xrai_segment_seconds_per_image: float | None = None


def method_params(cfg: Any, method: str) -> dict[str, Any]:
    """trustmap's effective parameters of ``method`` (constructor defaults + config)."""
    import inspect

    from trustmap.core.registry import get_method

    cls = get_method(method)
    sig = inspect.signature(cls.__init__)
    params = {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in ("self", "model") and p.default is not inspect.Parameter.empty
    }
    params.update(cfg.method_params.get(method, {}))
    return params


def layer_names(prepared: Any) -> dict[str, str]:
    """The default CAM layer per classifier role, as trustmap resolves it (the randomized
    copies of A1 have A1's module names)."""
    from trustmap.methods.cam._layer import default_layer

    x1 = prepared.images[:1]
    return {role: default_layer(prepared.models[role], x1) for role in ("A1", "A2", "B")}


def run_peer(cfg: Any, prepared: Any) -> PeerResult:
    """Run the whole protocol the peer way; ``cfg.out`` receives its outputs."""
    from trustmap.trust import protocol, stats
    from trustmap.trust.postprocess import PostprocessConfig
    from trustmap.trust.randomization import model_stages, randomization_baseline

    if PostprocessConfig(**cfg.postprocess) != PostprocessConfig():
        raise ValueError("the peer protocol implements the default post-processing only")
    unknown = [m for m in cfg.methods if m not in PEER_LIBRARY]
    if unknown:
        raise ValueError(f"the peer protocol has no library version of {unknown}")

    b = Buckets()
    started = time.perf_counter()
    with b("orchestration"):
        images, masks, ids = prepared.images, prepared.masks, prepared.ids
        methods = list(cfg.methods)
        bs = cfg.batch_size
        params = {m: method_params(cfg, m) for m in methods}
        layers = layer_names(prepared)
        rcfg = cfg.randomization_settings()
        rows: list[dict[str, Any]] = []
        segments: list[list[np.ndarray]] = []
        seg_seconds = 0.0

        def add(method: str, criterion: str, metric: str, values: Any, stage: str = "") -> None:
            rows.extend(records(ids, method, criterion, metric, values, stage))

        def maps_of(model: nn.Module, method: str, role: str) -> tuple[np.ndarray, np.ndarray]:
            nonlocal seg_seconds
            maps, raws = [], []
            for start in range(0, len(images), bs):
                xb = images[start : start + bs]
                with b(f"explainer {method}"):
                    if method == "xrai":
                        while len(segments) < start + len(xb):
                            tick = time.perf_counter()
                            segments.append(
                                pair_segments(images[len(segments)].numpy(), params[method])
                            )
                            seg_seconds += time.perf_counter() - tick
                        attr = pair_xrai(model, xb, params[method], segments[start:], bs)
                    else:
                        layer = params[method].get("layer") or layers[role]
                        attr = captum_attributions(method, model, xb, params[method], layer)
                        attr = attr.detach().cpu().numpy()
                with b("postprocess"):
                    maps.append(postprocess_maps(attr))
                raws.append(attr)
            return np.concatenate(maps), np.concatenate(raws)

    # -- trained maps, utility --------------------------------------------------------
    a1 = prepared.models["A1"]
    trained: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    for method in methods:
        trained[method], raw[method] = maps_of(a1, method, "A1")
    with b("localizer maps"):
        localizer1 = _localizer_maps(prepared.models["L1"], images, bs)
        localizer2 = _localizer_maps(prepared.models["L2"], images, bs)
    utility: dict[str, np.ndarray] = {}
    with b("utility metrics"):
        avg_maps = np.broadcast_to(prepared.avg_mask, masks.shape)
        for name, maps in [("AVG", avg_maps), ("localizer", localizer1), *trained.items()]:
            utility[name] = auprc_loop(maps, masks)
            add(name, "utility", "auprc", utility[name])
            add(name, "utility", "auroc", auroc_loop(maps, masks))

    # -- randomization --------------------------------------------------------------------
    with b("stage definition"):
        stages = model_stages(a1, rcfg["stages"])
        seeds = stage_seeds(len(stages), int(rcfg["seed"]))
    modes = ["cascading"] + (["independent"] if rcfg["independent"] else [])
    stage_names = [s.name for s in stages]
    full_random: dict[str, np.ndarray] = {}
    cascade: dict[str, list[np.ndarray]] = {m: [trained[m][0]] for m in methods}
    first_stage: dict[str, np.ndarray] = {}
    for mode in modes:
        criterion = "randomization" if mode == "cascading" else "independent_randomization"
        for k, stage in enumerate(stages):
            # The first stage randomizes the same modules with the same seed in both modes:
            # its maps are computed once (trustmap's content-hash cache does the same).
            reuse = mode == "independent" and k == 0
            if not reuse:
                with b("randomized copies"):
                    work = randomized_copy(a1, stages, seeds, k, mode)
            for method in methods:
                if reuse:
                    maps = first_stage[method]
                else:
                    maps, _ = maps_of(work, method, "A1")
                if mode == "cascading" and k == 0:
                    first_stage[method] = maps
                with b("ssim"):
                    add(method, criterion, "ssim", ssim_loop(maps, trained[method]), stage.name)
                if mode == "cascading":
                    cascade[method].append(maps[0])
                    full_random[method] = maps
    with b("utility metrics"):
        for method in methods:
            add(method, "utility_randomized", "auprc", auprc_loop(full_random[method], masks))
    with b("ssim"):
        baseline_pairs = {
            m: randomization_baseline(
                trained[m], n_pairs=int(rcfg["n_pairs"]), seed=cfg.seed, similarity=ssim_loop
            )
            for m in methods
        }

    # -- repeatability and reproducibility --------------------------------------------------
    other: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        m2, _ = maps_of(prepared.models["A2"], method, "A2")
        mb, _ = maps_of(prepared.models["B"], method, "B")
        other[method] = {"A2": m2, "B": mb}
        with b("ssim"):
            add(method, "repeatability", "ssim", ssim_loop(trained[method], m2))
            add(method, "reproducibility", "ssim", ssim_loop(trained[method], mb))
    with b("ssim"):
        loc_ssim = ssim_loop(localizer1, localizer2)
        add("localizer", "repeatability", "ssim", loc_ssim)
        add("localizer", "reproducibility", "ssim", loc_ssim)

    # -- faithfulness -------------------------------------------------------------------------
    with b("faithfulness"):
        faith = _faithfulness(cfg, prepared, trained, raw, utility, params)

    # -- statistics and outputs ---------------------------------------------------------------
    with b("orchestration"):
        per_image = pd.DataFrame(
            rows + faith["rows"],
            columns=["image", "method", "criterion", "stage", "metric", "value"],
        )
    with b("statistics"):
        results = protocol._statistics(
            cfg, per_image, methods, stage_names, modes, baseline_pairs, faith, prepared, stats
        )
    timings: dict[str, float] = {}
    with b("orchestration"):
        examples = {
            "image": images[0].detach().cpu().numpy(),
            "mask": masks[0],
            "stage_names": stage_names,
            "cascade": {m: np.stack(v) for m, v in cascade.items()},
            "repro": {
                m: {"A1": trained[m][0], "A2": other[m]["A2"][0], "B": other[m]["B"][0]}
                for m in methods
            },
        }
    with b("outputs (json, csv)"):
        _, files = protocol.write_outputs(
            cfg, results, per_image, examples, timings=timings, started=started
        )
    total = time.perf_counter() - started
    buckets = dict(b.seconds)
    split_output_time(buckets, files)
    buckets["orchestration"] = buckets.get("orchestration", 0.0) + total - b.total()
    n_seg = len(segments)
    return PeerResult(
        results=results,
        per_image=per_image,
        buckets=buckets,
        total=total,
        files=files,
        trained_maps=trained,
        xrai_segment_seconds_per_image=seg_seconds / n_seg if n_seg else None,
    )


def split_output_time(buckets: dict[str, float], files: dict[str, Path]) -> None:
    """Split the ``outputs (json, csv)`` bucket by the figure and report seconds that
    ``write_outputs`` records in the ``results.json`` it wrote."""
    import json

    written = json.loads(Path(files["results"]).read_text(encoding="utf-8"))["timings"]
    buckets["figures"] = float(written.get("figures", 0.0))
    buckets["report"] = float(written.get("report", 0.0))
    buckets["outputs (json, csv)"] -= buckets["figures"] + buckets["report"]


def _localizer_maps(model: nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    spatial = tuple(images.shape[2:])
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            out.append(model.localization_map(logits, spatial)[:, 0].float().numpy())
    return np.concatenate(out)


def _faithfulness(
    cfg: Any,
    prepared: Any,
    trained: dict[str, np.ndarray],
    raw: dict[str, np.ndarray],
    utility: dict[str, np.ndarray],
    params: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    fcfg = cfg.faithfulness_settings()
    model = prepared.models["A1"]
    images = prepared.images
    out: dict[str, Any] = {"rows": [], "methods": {}}
    with torch.no_grad():
        preds = torch.cat(
            [
                model(images[s : s + cfg.batch_size]).argmax(1)
                for s in range(0, len(images), cfg.batch_size)
            ]
        )
    correct = (preds == TARGET).numpy()
    for method in trained:
        failures = int(np.sum(correct & (utility[method] < utility["AVG"])))
        out["methods"][method] = {
            "explainability_failures": {"count": failures, "n_correct_positive": int(correct.sum())}
        }
    if not fcfg["enabled"]:
        return out
    n = min(int(fcfg["n_images"]), len(images))
    ids = prepared.ids[:n]
    n_pixels = int(np.prod(images.shape[2:]))
    n_values = [int(v) for v in fcfg["n_values"] if v < n_pixels]
    steps = int(fcfg["steps"])
    for method in trained:
        deletion, insertion, gaps = [], [], []
        sens: dict[int, list[float]] = {v: [] for v in n_values}
        complete = method == "integrated_gradients" and _ig_baseline(params[method]) == 0.0
        for j in range(n):
            x1 = images[j : j + 1]
            smap = trained[method][j].astype(np.float64)
            deletion.append(_curve_auc(model, x1, smap, steps, deletion=True))
            insertion.append(_curve_auc(model, x1, smap, steps, deletion=False))
            if n_values:
                corr = _sensitivity_n(
                    model, x1, raw[method][j], n_values, int(fcfg["n_subsets"]), cfg.seed + j
                )
                for v in n_values:
                    sens[v].append(float("nan") if corr[v] is None else corr[v])
            if complete:
                gaps.append(_completeness_gap(model, x1, raw[method][j]))
        for metric, values in (
            ("deletion_auc", deletion),
            ("insertion_auc", insertion),
            ("completeness_gap", gaps),
        ):
            out["rows"] += records(ids, method, "faithfulness", metric, values)
        means = []
        for v in n_values:
            vals = np.asarray(sens[v], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            means.append(float(vals.mean()) if len(vals) else None)
        out["methods"][method].update(
            {
                "deletion": deletion,
                "insertion": insertion,
                "gaps": gaps,
                "sensitivity_n": {"n": n_values, "correlation": means},
            }
        )
    return out


__all__ = [
    "PEER_LIBRARY",
    "Buckets",
    "PeerResult",
    "auprc_loop",
    "auroc_loop",
    "captum_attributions",
    "layer_names",
    "method_params",
    "pair_xrai",
    "postprocess_maps",
    "randomized_copy",
    "run_peer",
    "ssim_loop",
    "stage_seeds",
]
