"""Paper 004's trust protocol, end to end: data, models, maps, the four criteria, statistics,
figures and the report.

Arun et al., "Assessing the trustworthiness of saliency maps for localizing abnormalities in
medical imaging", Radiology: AI 2021. For each saliency method the protocol asks:

1. *Utility*: does the map localize the lesion better than the average training mask (AVG)?
   AUPRC (and AUROC) of the map against the ground-truth mask, per positive test image.
2. *Randomization*: does the map change when the model's weights are randomized? SSIM between
   the trained model's map and the map after cascading randomization, logits first; it must
   fall to the level of two maps of different images (50 random pairs).
3. *Repeatability*: SSIM between the maps of two replicates of architecture A.
4. *Reproducibility*: SSIM between the maps of architectures A and B.

Each is tested against its baseline (mixed-effects model, image as random intercept, alpha
0.05) and given a verdict: pass, fail (the paper's "did not pass") or uncertain.

>>> from trustmap.trust import TrustConfig, run
>>> result = run(TrustConfig.from_preset("quick", out="trust_quick"))  # doctest: +SKIP
>>> result.summary["passes_all"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from trustmap.core.atomic import write_text_atomic
from trustmap.core.base import build
from trustmap.core.registry import get_method
from trustmap.metrics.localization import auprc_batch, auroc_batch
from trustmap.metrics.similarity import ssim_batch
from trustmap.trust.cache import Store, array_hash, key_of, weights_hash
from trustmap.trust.config import TrustConfig, load_config
from trustmap.trust.postprocess import PostprocessConfig, postprocess

# Called as progress(description, completed, total); total 0 means "a step without a count".
Progress = Callable[[str, int, int], None]

CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")
# Integrated gradients with a zero baseline is complete: its attributions sum to
# f(x) - f(0) (Sundararajan et al. 2017); the gap measures the quadrature error.
COMPLETE_METHODS = {"integrated_gradients": {"baseline": "zeros"}}


@dataclass(frozen=True)
class TrustResult:
    """What :func:`run` produced.

    Attributes
    ----------
    results
        The ``results.json`` content (see the README for its shape).
    per_image
        The tidy table of ``per_image.csv``: image, method, criterion, stage, metric, value.
    out
        The output directory.
    files
        Written files by role: ``results``, ``per_image``, ``report`` and the figures.
    """

    results: dict[str, Any]
    per_image: pd.DataFrame
    out: Path
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        """``{"verdicts": {method: {criterion: verdict}}, "passes_all": [...]}``."""
        return self.results["summary"]


@dataclass
class Prepared:
    """The data and models of a run, ready for the criteria.

    ``images`` are the evaluated positive test images ``(N, C, *spatial)`` at the model
    size, ``masks`` their ground truth ``(N, *spatial)`` bool, ``ids`` their names;
    ``avg_mask`` is the AVG baseline map ``(*spatial)``; ``models`` holds the classifiers
    ``A1``, ``A2``, ``B`` and the localizers ``L1``, ``L2``, in eval mode on the device.
    """

    images: torch.Tensor
    masks: np.ndarray
    ids: list[str]
    avg_mask: np.ndarray
    models: dict[str, nn.Module]
    model_info: dict[str, dict[str, Any]]
    n_skipped_empty: int
    dataset: dict[str, Any]


def average_mask(masks: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Paper 004's AVG baseline: the mean of an ``(N, *spatial)`` stack of binary masks.

    Scored like any saliency map, the single average mask is the minimum bar a map must
    clear: it knows where lesions tend to be, not where this image's lesion is.

    Returns a ``(*spatial)`` float map in [0, 1] (a float32 tensor for tensor input, a
    float64 array otherwise). Raises ValueError for an empty stack, fewer than 2 spatial
    axes, NaN, or values other than 0 and 1.
    """
    is_tensor = isinstance(masks, torch.Tensor)
    arr = masks.detach().to("cpu").numpy() if is_tensor else np.asarray(masks)
    if arr.ndim < 3:
        raise ValueError(
            f"average_mask expects an (N, *spatial) stack of 2D or 3D masks, got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError("average_mask: the stack of masks is empty (N = 0)")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("average_mask: the masks contain NaN or infinite values")
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("average_mask: masks must be binary (bool or 0/1 values)")
    mean = values.mean(axis=0)
    return torch.from_numpy(mean.astype(np.float32)) if is_tensor else mean


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def run(
    config: TrustConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    progress: Progress | None = None,
) -> TrustResult:
    """Run the trust protocol and write its outputs into ``config.out``.

    Parameters
    ----------
    config
        A :class:`TrustConfig`, a mapping of its fields, a TOML/YAML file, or None for the
        default preset. Everything is validated before any work starts.
    progress
        Called as ``progress(description, completed, total)``.

    Returns
    -------
    TrustResult
        Also written: ``results.json``, ``per_image.csv``, the figures and ``report.html``.
        Re-running resumes: models and every map set are cached under content hashes.

    Raises
    ------
    OutputBusyError
        If another run is writing into the same ``out`` (see :mod:`trustmap.core.lock`):
        it stops at once instead of training and computing everything a second time.
    """
    from trustmap.core.lock import output_lock

    cfg = _as_config(config)
    out = Path(cfg.out).expanduser()
    with output_lock(out):
        return _run(cfg, out, progress)


def _run(cfg: TrustConfig, out: Path, progress: Progress | None) -> TrustResult:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    prepared = prepare(cfg, progress=progress, timings=timings)
    results, per_image, examples = evaluate(cfg, prepared, progress=progress, timings=timings)
    results, files = write_outputs(
        cfg, results, per_image, examples, timings=timings, started=started
    )
    return TrustResult(results=results, per_image=per_image, out=out, files=files)


def _as_config(config: TrustConfig | Mapping[str, Any] | str | Path | None) -> TrustConfig:
    if config is None:
        return TrustConfig.from_preset("default")
    if isinstance(config, TrustConfig):
        config.validate()
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, Mapping):
        return TrustConfig.from_mapping(config)
    raise TypeError(
        "config must be a TrustConfig, a mapping or a config file path, got "
        f"{type(config).__name__}"
    )


# ------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------


def prepare(
    cfg: TrustConfig,
    *,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> Prepared:
    """Open (or generate) the dataset, train or load the five models, pick the images."""
    from trustmap.data.datasets import open_dataset
    from trustmap.data.phantoms import PHANTOMS
    from trustmap.models.training import prepare_data

    timings = {} if timings is None else timings
    out = Path(cfg.out).expanduser()
    tick = time.perf_counter()
    _say(progress, "data")
    if cfg.dataset in PHANTOMS and not Path(cfg.dataset).exists():
        dataset = open_dataset(cfg.dataset, **cfg.phantom)
    else:
        dataset = open_dataset(cfg.dataset)
    data = prepare_data(dataset, cfg.train_config())
    timings["data"] = time.perf_counter() - tick

    tick = time.perf_counter()
    device = torch.device(cfg.device)
    models: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    roles = [("A1", "A", 0), ("A2", "A", 1), ("B", "B", 0), ("L1", "localizer", 0)]
    roles.append(("L2", "localizer", 1))
    for n, (role, group, k) in enumerate(roles):
        _say(progress, f"model {role}", n, len(roles))
        models[role], info[role] = _model(cfg, dataset, group, k, out / "models" / role, progress)
        # One memory format whatever the model's origin (trained, or reloaded from a
        # checkpoint): PyTorch's kernels differ between formats in the last bits.
        models[role] = models[role].to(device, memory_format=torch.contiguous_format).eval()
    _say(progress, "models", len(roles), len(roles))
    timings["models"] = time.perf_counter() - tick

    # The evaluated images: positive test images with a lesion mask.
    test = np.asarray(data.split["test"])
    labels = data.labels.numpy()
    positive = test[labels[test] == 1]
    has_lesion = data.masks[positive].flatten(1).amax(1).numpy() > 0
    n_empty = int((~has_lesion).sum())
    chosen = positive[has_lesion]
    if len(chosen) < 2:
        raise ValueError(
            f"the test split has {len(chosen)} positive image(s) with a non-empty mask; the "
            "protocol needs at least 2 (empty masks are skipped and counted)"
        )
    if cfg.n_images is not None and len(chosen) > cfg.n_images:
        rng = np.random.default_rng(cfg.seed)
        chosen = np.sort(rng.choice(chosen, size=cfg.n_images, replace=False))
    images = data.images[chosen].to(device)
    masks = data.masks[chosen, 0].numpy() > 0.5

    fit = np.concatenate([data.split["train"], data.split["val"]])
    fit_pos = fit[labels[fit] == 1]
    fit_masks = data.masks[fit_pos, 0].numpy() > 0.5
    fit_masks = fit_masks[fit_masks.reshape(len(fit_masks), -1).any(1)]
    if len(fit_masks) == 0:
        raise ValueError(
            "no training or validation positive has a non-empty mask: the AVG baseline "
            "needs ground-truth masks (or boxes)"
        )
    avg = np.asarray(average_mask(fit_masks), dtype=np.float64)
    described = {
        "name": data.name,
        "path": data.path,
        "ground_truth": data.ground_truth,
        "spatial_dims": data.spatial_dims,
        "size": list(data.spatial),
        "native_size": list(data.native_size),
        "counts": data.counts(),
        "fingerprint": data.fingerprint(),
        "n_avg_masks": len(fit_masks),
    }
    return Prepared(
        images=images,
        masks=masks,
        ids=[data.ids[i] for i in chosen],
        avg_mask=avg,
        models=models,
        model_info=info,
        n_skipped_empty=n_empty,
        dataset=described,
    )


def _model(
    cfg: TrustConfig,
    dataset: Any,
    group: str,
    k: int,
    out: Path,
    progress: Progress | None,
) -> tuple[nn.Module, dict[str, Any]]:
    from trustmap.models import load_checkpoint, train_classifier, train_localizer

    spec = cfg.models[group]
    if spec.checkpoints:
        path = Path(spec.checkpoints[k]).expanduser()
        model, ckpt = load_checkpoint(path, map_location="cpu")
        return model, {"arch": ckpt.get("arch", spec.arch), "checkpoint": str(path), "seed": None}
    seed = spec.seeds[k]
    train = train_localizer if group == "localizer" else train_classifier
    extra: dict[str, Any] = {"model_kwargs": dict(spec.kwargs)}
    if group == "localizer":
        extra.update(cfg.localizer_training)

    def on_event(event: Any) -> None:
        if progress is not None and event.kind == "epoch":
            progress(f"train {out.name} ({spec.arch})", event.epoch, event.epochs)

    result = train(
        dataset, spec.arch, out=out, seed=seed, config=cfg.train_config(**extra), progress=on_event
    )
    test = result.card.get("test", {})
    # Classifiers report the ROC AUC of the diagnosis, localizers that of detecting the
    # lesion from their map (the image's maximum lesion probability).
    key = "detection_roc_auc" if group == "localizer" else "roc_auc"
    auc = test.get(key) if isinstance(test, Mapping) else None
    if isinstance(auc, Mapping):
        auc = auc.get("value")
    return result.model, {
        "arch": spec.arch,
        "seed": seed,
        "checkpoint": str(result.checkpoint),
        "test_auc": auc,
        "seconds": round(result.seconds, 2),
        "reused": result.reused,
    }


# ------------------------------------------------------------------------------------------
# Maps
# ------------------------------------------------------------------------------------------


class _Maps:
    """Computes post-processed maps of one model state, through the resumable store."""

    def __init__(self, cfg: TrustConfig, prepared: Prepared, store: Store) -> None:
        self.cfg = cfg
        self.images = prepared.images
        self.images_hash = array_hash(prepared.images)
        self.post = PostprocessConfig(**cfg.postprocess)
        self.store = store
        self.seconds = 0.0  # time spent in explainers (cache misses only)
        self.target = torch.ones(len(prepared.images), dtype=torch.long, device=self.images.device)

    def params(self, method: str) -> dict[str, Any]:
        return dict(self.cfg.method_params.get(method, {}))

    def __call__(
        self, model: nn.Module, method: str, *, model_hash: str | None = None, raw: bool = False
    ) -> dict[str, np.ndarray]:
        """``{"maps": (N, *spatial) float32}``, plus ``"raw"`` attributions when asked."""
        mhash = model_hash or weights_hash(model)
        params = self.params(method)
        key = key_of(
            "maps", mhash, method, params, self.images_hash, self.post.as_dict(), "target=1", raw
        )

        def compute() -> dict[str, np.ndarray]:
            tick = time.perf_counter()
            explainer = build(get_method(method), model, params)
            maps, raws = [], []
            bs = self.cfg.batch_size
            for start in range(0, len(self.images), bs):
                xb = self.images[start : start + bs]
                attr = explainer.explain(xb, target=self.target[start : start + bs]).attributions
                attr = attr.detach().to("cpu", torch.float32)
                maps.append(np.asarray(postprocess(attr, config=self.post), dtype=np.float32))
                if raw:
                    raws.append(attr.numpy())
            self.seconds += time.perf_counter() - tick
            out = {"maps": np.concatenate(maps)}
            if raw:
                out["raw"] = np.concatenate(raws)
            return out

        return self.store.arrays("maps", key, compute)


def _localizer_maps(model: nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """The localizer's lesion probability per pixel, ``(N, *spatial)`` in [0, 1]."""
    spatial = tuple(images.shape[2:])
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            raw = model(images[start : start + batch_size])
            out.append(model.localization_map(raw, spatial)[:, 0].to("cpu", torch.float32).numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------
# The criteria
# ------------------------------------------------------------------------------------------


def evaluate(
    cfg: TrustConfig,
    prepared: Prepared,
    *,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """Compute every criterion, the baselines and the statistics for prepared models.

    Returns ``(results, per_image, examples)``; ``examples`` holds the maps of the first
    image that the figures show.
    """
    from trustmap.trust import stats
    from trustmap.trust.randomization import model_stages, randomization_baseline, randomized_models

    timings = {} if timings is None else timings
    out = Path(cfg.out).expanduser()
    store = Store(out / "cache")
    maps_of = _Maps(cfg, prepared, store)
    masks = prepared.masks
    ids = prepared.ids
    rows: list[dict[str, Any]] = []
    methods = list(cfg.methods)
    a1 = prepared.models["A1"]
    a1_hash = weights_hash(a1)
    randomization_cfg = cfg.randomization_settings()

    def add(method: str, criterion: str, metric: str, values: np.ndarray, stage: str = "") -> None:
        rows.extend(records(ids, method, criterion, metric, values, stage))

    # -- trained maps, utility ------------------------------------------------------------
    tick = time.perf_counter()
    trained: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    for i, method in enumerate(methods):
        _say(progress, f"maps of the trained model: {method}", i, len(methods))
        got = maps_of(a1, method, model_hash=a1_hash, raw=True)
        trained[method], raw[method] = got["maps"], got["raw"]
    _say(progress, "maps of the trained model", len(methods), len(methods))
    avg_maps = np.broadcast_to(prepared.avg_mask, masks.shape)
    localizer1 = _localizer_maps(prepared.models["L1"], prepared.images, cfg.batch_size)
    localizer2 = _localizer_maps(prepared.models["L2"], prepared.images, cfg.batch_size)
    for name, maps in [("AVG", avg_maps), ("localizer", localizer1), *trained.items()]:
        add(name, "utility", "auprc", _scores(auprc_batch, maps, masks))
        add(name, "utility", "auroc", _scores(auroc_batch, maps, masks))
    timings["trained maps and utility"] = time.perf_counter() - tick

    # -- randomization --------------------------------------------------------------------
    tick = time.perf_counter()
    stage_list = model_stages(a1, randomization_cfg["stages"])
    modes = ["cascading"] + (["independent"] if randomization_cfg["independent"] else [])
    stage_names = [s.name for s in stage_list]
    full_random: dict[str, np.ndarray] = {}
    example_cascade: dict[str, list[np.ndarray]] = {m: [trained[m][0]] for m in methods}
    for mode in modes:
        criterion = "randomization" if mode == "cascading" else "independent_randomization"
        total = len(stage_list) * len(methods)
        done = 0
        for stage_name, copy in randomized_models(
            a1, stage_list, mode=mode, seed=int(randomization_cfg["seed"])
        ):
            chash = weights_hash(copy)
            for method in methods:
                _say(progress, f"{mode} randomization: {stage_name}, {method}", done, total)
                maps = maps_of(copy, method, model_hash=chash)["maps"]
                add(method, criterion, "ssim", ssim_batch(maps, trained[method]), stage_name)
                if mode == "cascading":
                    example_cascade[method].append(maps[0])
                    full_random[method] = maps
                done += 1
        _say(progress, f"{mode} randomization", total, total)
    for method in methods:
        add(method, "utility_randomized", "auprc", _scores(auprc_batch, full_random[method], masks))
    baseline_pairs = {
        m: randomization_baseline(
            trained[m], n_pairs=int(randomization_cfg["n_pairs"]), seed=cfg.seed
        )
        for m in methods
    }
    timings["randomization"] = time.perf_counter() - tick

    # -- repeatability and reproducibility -------------------------------------------------
    tick = time.perf_counter()
    a2, b = prepared.models["A2"], prepared.models["B"]
    other: dict[str, dict[str, np.ndarray]] = {}
    for i, method in enumerate(methods):
        _say(progress, f"maps of A2 and B: {method}", i, len(methods))
        m2 = maps_of(a2, method)["maps"]
        mb = maps_of(b, method)["maps"]
        other[method] = {"A2": m2, "B": mb}
        add(method, "repeatability", "ssim", ssim_batch(trained[method], m2))
        add(method, "reproducibility", "ssim", ssim_batch(trained[method], mb))
    localizer_ssim = ssim_batch(localizer1, localizer2)
    add("localizer", "repeatability", "ssim", localizer_ssim)
    add("localizer", "reproducibility", "ssim", localizer_ssim)
    timings["repeatability and reproducibility"] = time.perf_counter() - tick

    # -- faithfulness ---------------------------------------------------------------------
    tick = time.perf_counter()
    faith = _faithfulness(cfg, prepared, trained, raw, store, a1_hash, progress)
    timings["faithfulness"] = time.perf_counter() - tick

    # -- statistics and results -------------------------------------------------------------
    tick = time.perf_counter()
    per_image = pd.DataFrame(
        rows + faith["rows"], columns=["image", "method", "criterion", "stage", "metric", "value"]
    )
    results = _statistics(
        cfg, per_image, methods, stage_names, modes, baseline_pairs, faith, prepared, stats
    )
    timings["statistics"] = time.perf_counter() - tick
    timings["explainers (cache misses)"] = maps_of.seconds
    examples = {
        "image": prepared.images[0].detach().to("cpu").numpy(),
        "mask": masks[0],
        "stage_names": stage_names,
        "cascade": {m: np.stack(v) for m, v in example_cascade.items()},
        "repro": {
            m: {"A1": trained[m][0], "A2": other[m]["A2"][0], "B": other[m]["B"][0]}
            for m in methods
        },
    }
    results["cache"] = {"hits": store.hits, "misses": store.misses}
    return results, per_image, examples


def records(
    ids: list[str], method: str, criterion: str, metric: str, values: Any, stage: str = ""
) -> list[dict[str, Any]]:
    """Rows of ``per_image.csv`` for one method, criterion and metric: one per image."""
    return [
        {
            "image": image,
            "method": method,
            "criterion": criterion,
            "stage": stage,
            "metric": metric,
            "value": float(value),
        }
        for image, value in zip(ids, values)
    ]


def _scores(fn: Callable[..., Any], maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    values = fn(np.asarray(maps, dtype=np.float64), masks)
    return np.asarray(values, dtype=np.float64)


def _faithfulness(
    cfg: TrustConfig,
    prepared: Prepared,
    trained: dict[str, np.ndarray],
    raw: dict[str, np.ndarray],
    store: Store,
    a1_hash: str,
    progress: Progress | None,
) -> dict[str, Any]:
    """Deletion and insertion AUCs, sensitivity-n, the IG completeness gap and the count of
    explainability failures (paper 003, section 3) of the trained model A1."""
    from trustmap.metrics.faithfulness import (
        completeness_gap,
        deletion_curve,
        insertion_curve,
        sensitivity_n,
    )

    fcfg = cfg.faithfulness_settings()
    model = prepared.models["A1"]
    images = prepared.images
    out: dict[str, Any] = {"rows": [], "methods": {}}

    # Explainability failures need no extra passes: predictions and per-image AUPRCs.
    with torch.no_grad():
        preds = torch.cat(
            [
                model(images[s : s + cfg.batch_size]).argmax(1)
                for s in range(0, len(images), cfg.batch_size)
            ]
        )
    correct = (preds == 1).to("cpu").numpy()
    avg_auprc = _scores(
        auprc_batch, np.broadcast_to(prepared.avg_mask, prepared.masks.shape), prepared.masks
    )
    for method, maps in trained.items():
        method_auprc = _scores(auprc_batch, maps, prepared.masks)
        failures = int(np.sum(correct & (method_auprc < avg_auprc)))
        out["methods"][method] = {
            "explainability_failures": {"count": failures, "n_correct_positive": int(correct.sum())}
        }
    if not fcfg["enabled"]:
        return out

    n = min(int(fcfg["n_images"]), len(images))
    ids = prepared.ids[:n]
    target = torch.ones(1, dtype=torch.long, device=images.device)
    n_values = [int(v) for v in fcfg["n_values"] if v < int(np.prod(images.shape[2:]))]
    for i, method in enumerate(trained):
        _say(progress, f"faithfulness: {method}", i, len(trained))
        key = key_of(
            "faith", a1_hash, method, _maps_key_params(cfg, method), array_hash(images[:n]), fcfg
        )

        def compute(method: str = method) -> dict[str, Any]:
            deletion, insertion, gaps = [], [], []
            sens: dict[int, list[float]] = {v: [] for v in n_values}
            for j in range(n):
                x = images[j : j + 1]
                smap = torch.from_numpy(trained[method][j])
                deletion.append(deletion_curve(model, x, smap, target, steps=fcfg["steps"]).auc)
                insertion.append(insertion_curve(model, x, smap, target, steps=fcfg["steps"]).auc)
                attr = torch.from_numpy(raw[method][j : j + 1]).to(x.device, x.dtype)
                if n_values:
                    corr = sensitivity_n(
                        model,
                        x,
                        attr,
                        target,
                        n_values=n_values,
                        n_subsets=int(fcfg["n_subsets"]),
                        seed=cfg.seed + j,
                    )
                    for v in n_values:
                        value = corr.get(v)
                        sens[v].append(float("nan") if value is None else float(value))
                if method in COMPLETE_METHODS and _zero_baseline(cfg, method):
                    gaps.append(float(completeness_gap(model, x, attr, target)))
            return {
                "deletion": deletion,
                "insertion": insertion,
                "gaps": gaps,
                "sens": {str(k): v for k, v in sens.items()},
            }

        got = store.record("faithfulness", key, compute)
        for metric, key in (
            ("deletion_auc", "deletion"),
            ("insertion_auc", "insertion"),
            ("completeness_gap", "gaps"),
        ):
            out["rows"] += records(ids, method, "faithfulness", metric, got[key])
        sens_mean = []
        for v in n_values:
            vals = np.asarray(got["sens"][str(v)], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            sens_mean.append(float(vals.mean()) if len(vals) else None)
        out["methods"][method].update(
            {
                "deletion": got["deletion"],
                "insertion": got["insertion"],
                "gaps": got["gaps"],
                "sensitivity_n": {"n": n_values, "correlation": sens_mean},
            }
        )
    return out


def _maps_key_params(cfg: TrustConfig, method: str) -> dict[str, Any]:
    """What a method's maps depend on besides the model and the images."""
    return {"params": cfg.method_params.get(method, {}), "post": cfg.postprocess}


def _zero_baseline(cfg: TrustConfig, method: str) -> bool:
    baseline = cfg.method_params.get(method, {}).get("baseline", "zeros")
    return (isinstance(baseline, str) and baseline == "zeros") or baseline == 0


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------


def _statistics(
    cfg: TrustConfig,
    per_image: pd.DataFrame,
    methods: list[str],
    stage_names: list[str],
    modes: list[str],
    baseline_pairs: dict[str, np.ndarray],
    faith: dict[str, Any],
    prepared: Prepared,
    stats: Any,
) -> dict[str, Any]:
    alpha = cfg.alpha

    def frame(criterion: str, metric: str, stage: str = "") -> pd.DataFrame:
        sel = per_image[
            (per_image.criterion == criterion)
            & (per_image.metric == metric)
            & (per_image.stage == stage)
        ]
        return sel[["image", "method", "value"]].reset_index(drop=True)

    util = frame("utility", "auprc")
    util_roc = frame("utility", "auroc")
    meth_util = util[util.method.isin(methods)]
    vs_avg = stats.compare_to_level(util[util.method != "localizer"], "AVG", alpha=alpha)
    vs_loc = stats.compare_to_level(util[util.method != "AVG"], "localizer", alpha=alpha)
    roc_avg = stats.compare_to_level(util_roc[util_roc.method != "localizer"], "AVG", alpha=alpha)
    randomized = frame("utility_randomized", "auprc")

    full_stage = stage_names[-1]
    full = frame("randomization", "ssim", full_stage)
    vs_pairs = stats.compare_to_sample(
        full, {m: baseline_pairs[m] for m in methods}, alpha=alpha, higher_is_better=False
    )
    rep = frame("repeatability", "ssim")
    rep_low = stats.compare_to_constant(rep[rep.method != "localizer"], 0.5, alpha=alpha)
    rep_high = stats.compare_to_level(rep, "localizer", alpha=alpha)
    pro = frame("reproducibility", "ssim")
    pro_low = stats.compare_to_constant(pro[pro.method != "localizer"], 0.5, alpha=alpha)
    pro_high = stats.compare_to_level(pro, "localizer", alpha=alpha)

    def summary(values: Any) -> dict[str, Any]:
        return stats.summarize(np.asarray(values, dtype=np.float64))

    def base(name: str, values: Any) -> dict[str, Any]:
        s = summary(values)
        return {"name": name, "mean": s["mean"], "sd": s["sd"]}

    avg_vals = util[util.method == "AVG"].value
    loc_vals = util[util.method == "localizer"].value
    out_methods: dict[str, Any] = {}
    for m in methods:
        c = vs_avg[m]
        trained_vals = meth_util[meth_util.method == m]
        rand_vals = randomized[randomized.method == m]
        pair = pd.concat(
            [trained_vals.assign(method="trained"), rand_vals.assign(method="randomized")]
        )
        vs_rand = stats.compare_to_level(pair, "randomized", alpha=alpha)["trained"]
        utility = {
            "metric": "auprc",
            **_stat(c),
            "n_skipped_empty": prepared.n_skipped_empty,
            "baseline": base("AVG", avg_vals),
            "high_baseline": {**base("localizer", loc_vals), "p_value": vs_loc[m].p_value},
            "auroc": {
                **_stat(roc_avg[m]),
                "baseline": base("AVG", util_roc[util_roc.method == "AVG"].value),
            },
            "randomized": {**summary(rand_vals.value), "p_value": vs_rand.p_value},
        }
        r = vs_pairs[m]
        pairs = summary(baseline_pairs[m])
        randomization = {
            "metric": "ssim",
            **_stat(r),
            "stage": full_stage,
            "baseline": {
                "name": "random pairs",
                "mean": pairs["mean"],
                "sd": pairs["sd"],
                "n_pairs": len(baseline_pairs[m]),
            },
            "stages": _stage_means(per_image, m, "randomization", stage_names),
            "independent": _stage_means(per_image, m, "independent_randomization", stage_names)
            if "independent" in modes
            else [],
        }
        repeat = {
            "metric": "ssim",
            **_stat(rep_low[m]),
            "baseline": {"name": "LOW", "mean": 0.5},
            "high_baseline": {
                **base("localizer", rep[rep.method == "localizer"].value),
                "p_value": rep_high[m].p_value,
            },
        }
        repro = {
            "metric": "ssim",
            **_stat(pro_low[m]),
            "baseline": {"name": "LOW", "mean": 0.5},
            "high_baseline": {
                **base("localizer", pro[pro.method == "localizer"].value),
                "p_value": pro_high[m].p_value,
            },
        }
        fm = faith["methods"].get(m, {})
        faithfulness = {
            "deletion_auc": summary(fm.get("deletion", [])),
            "insertion_auc": summary(fm.get("insertion", [])),
            "sensitivity_n": fm.get("sensitivity_n", {"n": [], "correlation": []}),
            "completeness_gap": summary(fm["gaps"]) if fm.get("gaps") else None,
            "explainability_failures": fm.get("explainability_failures"),
        }
        out_methods[m] = {
            "utility": utility,
            "randomization": randomization,
            "repeatability": repeat,
            "reproducibility": repro,
            "faithfulness": faithfulness,
        }

    verdicts = {m: {c: out_methods[m][c]["verdict"] for c in CRITERIA} for m in methods}
    passes_all = [m for m in methods if all(v == "pass" for v in verdicts[m].values())]
    return {
        "methods": out_methods,
        "baselines": {
            "avg_mask": {
                "auprc": summary(avg_vals),
                "auroc": summary(util_roc[util_roc.method == "AVG"].value),
            },
            "localizer": {
                "auprc": summary(loc_vals),
                "auroc": summary(util_roc[util_roc.method == "localizer"].value),
            },
            "randomization": {
                m: {**summary(baseline_pairs[m]), "n_pairs": len(baseline_pairs[m])}
                for m in methods
            },
            "repeatability_high": summary(rep[rep.method == "localizer"].value),
            "reproducibility_high": summary(pro[pro.method == "localizer"].value),
            "low_ssim": 0.5,
        },
        "tukey": {
            "utility": stats.tukey_hsd(util, alpha=alpha),
            "randomization": stats.tukey_hsd(full, alpha=alpha),
            "repeatability": stats.tukey_hsd(rep, alpha=alpha),
            "reproducibility": stats.tukey_hsd(pro, alpha=alpha),
        },
        "summary": {"verdicts": verdicts, "passes_all": passes_all},
        "models": {role: info for role, info in prepared.model_info.items()},
        "dataset": prepared.dataset,
        "images": {
            "n": len(prepared.ids),
            "ids": prepared.ids,
            "n_skipped_empty": prepared.n_skipped_empty,
        },
    }


def _stat(comparison: Any) -> dict[str, Any]:
    d = comparison.as_dict()
    out = {k: d.get(k) for k in ("mean", "sd", "n", "p_value", "verdict", "test")}
    if d.get("note"):
        out["note"] = d["note"]
    return out


def _stage_means(
    per_image: pd.DataFrame, method: str, criterion: str, stage_names: list[str]
) -> list[dict[str, Any]]:
    from trustmap.trust.stats import summarize

    sel = per_image[(per_image.method == method) & (per_image.criterion == criterion)]
    out = []
    for name in stage_names:
        s = summarize(sel[sel.stage == name].value.to_numpy(dtype=np.float64))
        out.append({"name": name, "mean": s["mean"], "sd": s["sd"]})
    return out


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------


def write_outputs(
    cfg: TrustConfig,
    results: dict[str, Any],
    per_image: pd.DataFrame,
    examples: dict[str, Any],
    *,
    timings: dict[str, float],
    started: float,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Figures, ``report.html``, ``results.json`` and ``per_image.csv``, each atomically.

    Returns the results as written (JSON-safe, with config, versions and timings) and the
    files by role."""
    from trustmap.core.atomic import atomic_path
    from trustmap.trust import figures
    from trustmap.trust.report import write_report

    out = Path(cfg.out).expanduser()
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    figs: dict[str, Path] = {}
    figs["utility"] = figures.utility_boxplot(per_image, results, fig_dir / "utility_auprc.png")
    figs["randomization_curves"] = figures.randomization_curves(
        results, fig_dir / "randomization_curves.png"
    )
    # One grey image per panel: a multi-channel input is shown as its channel mean.
    shown = examples["image"][0] if examples["image"].shape[0] == 1 else examples["image"].mean(0)
    figs["randomization_grid"] = figures.randomization_grid(
        shown,
        examples["cascade"],
        examples["stage_names"],
        fig_dir / "randomization_grid.png",
        mask=examples["mask"],
    )
    figs["repeatability"] = figures.repro_boxplot(per_image, results, fig_dir / "repeatability.png")
    figs["repeatability_examples"] = figures.repro_examples(
        shown,
        examples["repro"],
        fig_dir / "repeatability_examples.png",
        mask=examples["mask"],
    )
    figs["faithfulness"] = figures.faithfulness_plot(results, fig_dir / "faithfulness.png")
    timings["figures"] = time.perf_counter() - tick

    timings["total"] = time.perf_counter() - started
    results["notes"] = _notes(cfg, results.get("models", {}))
    results["config"] = cfg.to_dict()
    results["versions"] = _versions()
    results["timings"] = {k: round(float(v), 3) for k, v in timings.items()}
    results = _json_safe(results)

    files: dict[str, Path] = {k: Path(v) for k, v in figs.items()}
    with atomic_path(out / "per_image.csv") as tmp:
        per_image.to_csv(tmp, index=False)
    files["per_image"] = out / "per_image.csv"
    tick = time.perf_counter()
    files["report"] = Path(write_report(results, figs, out / "report.html", per_image=per_image))
    results["timings"]["report"] = round(time.perf_counter() - tick, 3)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, allow_nan=False))
    files["results"] = out / "results.json"
    return results, files


# Below this test ROC AUC a model has learned too little for its maps to test anything.
WEAK_MODEL_AUC = 0.75


def weak_models(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Warnings for the models whose test AUC is below :data:`WEAK_MODEL_AUC`."""
    out = []
    for role, info in models.items():
        auc = info.get("test_auc")
        if isinstance(auc, (int, float)) and auc < WEAK_MODEL_AUC:
            out.append(
                f"WARNING: model {role} ({info.get('arch')}, seed {info.get('seed')}) reached "
                f"a test AUC of only {auc:.2f}; the criteria that use it compare maps of a "
                "model that has not learned the task. Train it longer or with another seed "
                "(models.*.seeds) before reading its verdicts."
            )
    return out


def _notes(cfg: TrustConfig, models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a reader must know to compare this run with paper 004."""
    params = cfg.method_params
    notes = weak_models(models)
    if "smooth_ig" in cfg.methods:
        sig = params.get("smooth_ig", {})
        n, steps = sig.get("n_samples", 25), sig.get("n_steps", 25)
        notes.append(
            f"Smooth IG costs {n} noise samples x {steps} path steps = {n * steps} "
            "gradient passes per image and model state, the bulk of the run; paper 004's "
            "25 interpolation steps are kept and the noise samples reduced to fit the time "
            "budget (set method_params.smooth_ig.n_samples to change it)."
        )
    notes += [
        "Maps are post-processed as in paper 004's code: "
        + ", ".join(f"{k}={v}" for k, v in PostprocessConfig(**cfg.postprocess).as_dict().items())
        + ". Localizer maps are its per-pixel lesion probabilities, used as they are.",
        "Randomization re-initialises each stage's layers with their own initialisers; "
        "normalisation layers return to their initial state (weight 1, bias 0, running "
        "statistics 0 and 1).",
        "Mixed-model p-values: statsmodels' Wald statistic referred to t(images - 1) "
        "(paper 004 used lmerTest's Satterthwaite t tests); Tukey HSD is the one-way test, "
        "which ignores the pairing by image.",
        f"Target class: 1 (positive) for every model state; images: {cfg.n_images or 'all'} "
        "positive test images with a non-empty mask.",
    ]
    return notes


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities by None, numpy scalars by Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in (
        "trustmap",
        "torch",
        "numpy",
        "scipy",
        "scikit-image",
        "scikit-learn",
        "statsmodels",
        "pandas",
        "monai",
        "matplotlib",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _say(progress: Progress | None, text: str, done: int = 0, total: int = 0) -> None:
    if progress is not None:
        progress(text, done, total)
