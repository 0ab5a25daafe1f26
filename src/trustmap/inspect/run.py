"""One inspection of a trained model on its data: every analysis of :mod:`trustmap.inspect`
in one call (what ``trustmap inspect`` runs), as one frozen :class:`InspectResult`.

The data are prepared exactly as training prepared them (:func:`trustmap.models.training.
prepare_data` at the input size recorded in the checkpoint), so the model sees the images
it was trained on. Every argument is checked before any work starts: an unknown layer
(with the closest names), a layer without spatial output, concept masks that do not fit
their images and a dataset with a single class each raise one ValueError.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.errors import InputError, MissingFileError
from trustmap.inspect.activations import layer_table, resolve_layer

__all__ = ["InspectConfig", "InspectResult", "inspect_model", "require_two_classes"]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class InspectConfig:
    """What :func:`inspect_model` computes.

    Attributes
    ----------
    layers
        Layers for feature maps, dissection and influence (default: the last layer with a
        spatial output, the one CAM methods use, and the block before it).
    n_images
        Images for unit rates, dissection and influence (the validation and test splits
        first, then training images).
    n_embed
        Images embedded (None: all).
    projections
        Among ``pca``, ``tsne``, ``umap`` (UMAP is skipped with a note when ``umap-learn``
        is not installed).
    k, outlier_quantile
        kNN outlier scores: neighbours, and the quantile of the training cases' scores
        above which a case is flagged.
    quantile, iou_threshold
        Network dissection (Bau et al. 2017: 0.005 and 0.04).
    concepts
        A concept folder (``<concept>/<image id>``); default the dataset's ``concepts/``.
        Without concepts the dissection is skipped with a note.
    steps
        Activation-maximization steps.
    cohort_method
        Method of the cohort map; None: ``grad_cam`` for 3D data (aligned volumes), none
        for 2D.
    influence_top
        Rows of the influence table.
    batch_size, seed, device
        Batch size of every pass, the seed of projections and maximization, the device.
    """

    layers: tuple[str, ...] | None = None
    n_images: int = 500
    n_embed: int | None = 2500
    projections: tuple[str, ...] = ("pca", "tsne", "umap")
    k: int = 5
    outlier_quantile: float = 0.95
    quantile: float = 0.005
    iou_threshold: float = 0.04
    concepts: str | None = None
    steps: int = 128
    cohort_method: str | None = None
    influence_top: int = 8
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        from trustmap.inspect.embeddings import PROJECTIONS

        for name in ("n_images", "steps", "batch_size", "k", "influence_top"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embed is not None and (not isinstance(self.n_embed, int) or self.n_embed < 3):
            raise InputError(f"n_embed must be an integer >= 3 or None, got {self.n_embed!r}")
        for p in self.projections:
            if p not in PROJECTIONS:
                raise InputError(f"unknown projection {p!r}: choose among {PROJECTIONS}")
        if not 0 < self.quantile < 1 or not 0 <= self.iou_threshold <= 1:
            raise InputError("quantile must lie in (0, 1) and iou_threshold in [0, 1]")
        if not 0 < self.outlier_quantile < 1:
            raise InputError(f"outlier_quantile must lie in (0, 1), got {self.outlier_quantile}")


@dataclass(frozen=True)
class InspectResult:
    """Everything :func:`inspect_model` computed; ``None`` where a part did not apply
    (``notes`` says why)."""

    model: dict[str, Any]
    data: dict[str, Any]
    config: InspectConfig
    layers: tuple[str, ...]
    layer_table: tuple[Any, ...]
    filters: Any
    filter_comparison: Any
    unit_rates: Any
    feature_maps: Any
    example_image: np.ndarray
    activation_images: np.ndarray
    activation_maps: np.ndarray
    embedding: Any
    projections: tuple[Any, ...]
    outliers: Any
    neighbours: dict[str, Any]
    dissections: tuple[Any, ...]
    influence: tuple[Any, ...]
    maximizations: tuple[Any, ...]
    maximization_labels: tuple[str, ...]
    attention_images: np.ndarray | None
    attention_maps: np.ndarray | None
    cohort: Any
    timings: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def require_two_classes(labels: Any, what: str) -> None:
    """Raise one ValueError when ``labels`` hold fewer than two classes; ``what`` names
    the analysis that contrasts classes."""
    present = np.unique(np.asarray(labels))
    if present.size < 2:
        only = present.tolist()
        raise InputError(
            f"the dataset has one class only ({only}); {what} contrasts classes and needs "
            "images of at least two"
        )


def _load_model(path: str | os.PathLike[str], device: str) -> tuple[nn.Module, dict[str, Any]]:
    from trustmap.models import load_checkpoint

    p = Path(path).expanduser()
    file = p / "model.pt" if p.is_dir() else p
    if not file.is_file():
        raise MissingFileError(f"no model checkpoint at {file} (a model.pt or its run folder)")
    return load_checkpoint(file, map_location=device)


def _check_layers(net: nn.Module, layers: tuple[str, ...], table: tuple[Any, ...]) -> None:
    """Every layer exists (else the closest names) and has a spatial output."""
    spatial = [i.name for i in table if i.spatial]
    for layer in layers:
        resolve_layer(net, layer)
        if layer not in spatial:
            shape = next((i.shape for i in table if i.name == layer), None)
            raise InputError(
                f"layer {layer!r} outputs {shape} per image, without spatial axes; feature maps "
                f"and dissection need a layer with a spatial feature map, e.g. {spatial[-1]!r}"
            )


def _recorded_dataset(info: dict[str, Any]) -> str:
    """The dataset a checkpoint was trained on: the folder in its model card when it still
    exists, else the dataset name it records (a phantom name)."""
    import json

    path = info.get("path")
    card = Path(path).parent / "model_card.json" if path else None
    if card is not None and card.is_file():
        folder = (json.loads(card.read_text()).get("dataset") or {}).get("path")
        if folder and Path(folder).is_dir():
            return str(folder)
    name = (info.get("extra") or {}).get("dataset")
    if name is None:
        raise InputError("the checkpoint records no dataset; pass --dataset")
    return str(name)


def _default_layers(model: nn.Module, table: Sequence[Any]) -> tuple[str, ...]:
    """The last two blocks with spatial output at different resolutions: for small_cnn
    ``features.block4`` and ``features.block3``. A block is a module whose children are
    all single layers (conv, norm, activation); without blocks, single layers are used."""
    spatial = [info for info in table if info.spatial]
    if not spatial:
        return ()
    modules = dict(model.named_modules())

    def is_block(name: str) -> bool:
        children = list(modules[name].children())
        return bool(children) and all(not list(c.children()) for c in children)

    blocks = [i.name for i in spatial if is_block(i.name)]
    leaves = [i.name for i in spatial if not list(modules[i.name].children())]
    picks = blocks or leaves
    last = picks[-1]
    shape = next(i.shape for i in spatial if i.name == last)
    before = [n for n in picks if next(i.shape for i in spatial if i.name == n) != shape]
    return (last, before[-1]) if before else (last,)


def _pick(labels: np.ndarray, split: dict[str, np.ndarray], n: int) -> np.ndarray:
    order = [split.get("val", []), split.get("test", []), split.get("train", [])]
    idx = np.concatenate([np.asarray(o, dtype=np.int64) for o in order])
    return np.sort(idx[:n])


def inspect_model(
    model: str | os.PathLike[str] | nn.Module,
    dataset: Any = None,
    *,
    config: InspectConfig | None = None,
    info: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> InspectResult:
    """Inspect a trained model on its dataset (see :class:`InspectConfig`).

    Parameters
    ----------
    model
        A checkpoint (``model.pt`` or its run folder), or a model with ``info`` (the
        checkpoint info: ``input_size`` and ``seed`` in ``info["extra"]``).
    dataset
        A phantom name or dataset folder (default: the dataset recorded in the
        checkpoint).
    progress
        Called as ``progress(stage, done, total)``.
    """
    from trustmap import inspect as ti
    from trustmap.models.training import TrainConfig, open_training_dataset, prepare_data

    cfg = config or InspectConfig()
    cfg.validate()
    timings: dict[str, float] = {}
    notes: list[str] = []
    started = time.perf_counter()

    def step(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        timings[name] = now - started
        started = now
        if progress is not None:
            progress(name, 1, 1)

    if isinstance(model, nn.Module):
        net, info = model, dict(info or {})
    else:
        net, info = _load_model(model, cfg.device)
    extra = info.get("extra") or {}
    if dataset is None:
        dataset = _recorded_dataset(info)
    size = extra.get("input_size")
    if size and cfg.layers:
        # Check the layers before the data are read: a typo fails at once.
        probe = torch.zeros((1, int(info.get("in_channels", 1)), *size))
        _check_layers(net, tuple(cfg.layers), tuple(layer_table(net, probe)))
    ds = open_training_dataset(dataset)
    data = prepare_data(ds, TrainConfig(size=tuple(size) if size else None))
    if data.spatial_dims != info.get(
        "spatial_dims", data.spatial_dims
    ) or data.in_channels != info.get("in_channels", data.in_channels):
        raise InputError(
            f"the model takes {info.get('in_channels')}-channel {info.get('spatial_dims')}D "
            f"images; dataset {data.name!r} has {data.in_channels}-channel "
            f"{data.spatial_dims}D images"
        )
    labels = data.labels.numpy()
    require_two_classes(labels, "inspection (embeddings by label, class models, influence)")
    images = data.images
    table = tuple(layer_table(net, images[:1]))
    layers = tuple(cfg.layers) if cfg.layers else _default_layers(net, table)
    if not layers:
        raise InputError("the model has no layer with a spatial output to inspect")
    _check_layers(net, layers, table)
    concept_source = cfg.concepts
    concepts = None
    if concept_source is not None or (
        ds.root is not None and (Path(ds.root) / "concepts").is_dir()
    ):
        concepts = ti.load_concepts(ds, folder=concept_source, size=data.spatial)
    else:
        notes.append(
            f"no concept masks: {ds.root or data.name} has no concepts/ folder and no "
            "--concepts was given, so the dissection was skipped (phantoms written before "
            "trustmap generated concept masks have none: pass --dataset with the phantom's "
            "name, or regenerate it with trustmap data make)"
        )
    step("setup")

    filt = ti.filters(net)
    comparison = None
    try:
        comparison = ti.compare_filters(
            ti.initial_model(info), net, labels=("initialisation", "trained")
        )
    except (ValueError, KeyError) as err:
        notes.append(f"filters not compared with the initialisation: {err}")
    step("filters")

    subset = _pick(labels, data.split, cfg.n_images)
    rates = ti.unit_rates(net, images[subset], batch_size=cfg.batch_size)
    step("unit_rates")

    positives = np.flatnonzero(labels[subset] == len(data.classes) - 1)
    example = int(subset[positives[0]]) if positives.size else int(subset[0])
    fmaps = ti.feature_maps(net, images[example], layers[0])
    shown = subset[:4] if not positives.size else subset[positives[:4]]
    act_maps = ti.activation_maps(net, images[shown], layers[0]).numpy()
    step("feature_maps")

    embed_idx = (
        np.arange(len(labels)) if cfg.n_embed is None else np.arange(min(cfg.n_embed, len(labels)))
    )
    splits = np.empty(len(labels), dtype=object)
    for name, idx in data.split.items():
        splits[idx] = name
    emb = ti.embed(
        net,
        images[embed_idx],
        labels=labels[embed_idx],
        splits=splits[embed_idx],
        ids=[data.ids[i] for i in embed_idx],
        batch_size=cfg.batch_size * 2,
    )
    emb = type(emb)(**{**emb.__dict__, "classes": tuple(data.classes)})
    projections = []
    for method in cfg.projections:
        if method == "umap" and importlib.util.find_spec("umap") is None:
            notes.append("UMAP skipped: install the optional extra (pip install 'trustmap[umap]')")
            continue
        projections.append(ti.project(emb, method, seed=cfg.seed, n_neighbors=cfg.k))
        step(f"projection_{method}")
    reference = emb.splits == "train"
    if reference.sum() <= cfg.k:
        reference = np.ones(len(emb), dtype=bool)
        notes.append("no training split among the embedded images: outliers scored against all")
    outliers = ti.knn_outliers(emb, reference=reference, k=cfg.k, quantile=cfg.outlier_quantile)
    train_idx = np.flatnonzero(reference)
    queries = np.flatnonzero(emb.splits == "test")[:4]
    neighbours = {}
    if queries.size:
        found = ti.nearest_cases(
            emb.features[train_idx], emb.features[queries], k=min(cfg.k, len(train_idx))
        )
        neighbours = {
            emb.ids[q]: [
                {
                    "id": emb.ids[train_idx[j]],
                    "distance": float(d),
                    "label": int(emb.labels[train_idx[j]]),
                }
                for j, d in zip(found.indices[r], found.distances[r])
            ]
            for r, q in enumerate(queries)
        }
    step("embedding")

    dissections, influence = [], []
    target = len(data.classes) - 1
    for layer in layers:
        dis = None
        if concepts is not None:
            cm = ti.ConceptMasks(concepts.names, concepts.masks[subset], concepts.source)
            dis = ti.dissect(
                net, images[subset], cm, layer=layer, quantile=cfg.quantile,
                iou_threshold=cfg.iou_threshold, batch_size=cfg.batch_size,
            )  # fmt: skip
            dissections.append(dis)
        pos_idx = subset[labels[subset] == target]
        influence.append(
            ti.influential_units(
                net,
                images,
                layer=layer,
                target=target,
                dissection=dis,
                top=cfg.influence_top,
                indices=pos_idx if pos_idx.size else subset,
                batch_size=cfg.batch_size,
            )
        )
        step(f"dissection_{layer}")

    train_images = images[data.split["train"]]
    mean_image = train_images.mean(0)
    low, high = float(train_images.min()), float(train_images.max())
    coarse = max(1, min(data.spatial) // 8)
    maximizations, max_labels = [], []
    for cls in range(len(data.classes)):
        # From the mean training image, a coarse offset pulled towards it: what each class
        # adds to an average case, at the scale of anatomy rather than of texture.
        maximizations.append(
            ti.maximize(
                net,
                target=cls,
                start=mean_image,
                center=mean_image,
                l2=10.0,
                tv=0.0,
                coarse=coarse,
                bounds=(low, high),
                steps=cfg.steps,
                seed=cfg.seed,
            )
        )
        max_labels.append(f"class model: {data.classes[cls]}")
    maximizations.append(
        ti.deep_dream(
            net,
            images[example],
            layer=layers[0],
            steps=max(8, cfg.steps // 4),
            seed=cfg.seed,
            bounds=(low, high),
        )
    )
    max_labels.append(f"Deep Dream: {layers[0]}")
    step("maximization")

    att_images = att_maps = None
    from trustmap.models.attention import attention_sources

    if attention_sources(net):
        att_maps = _explain(net, images[shown], "attention")
        att_images = images[shown].numpy()
        step("attention")

    cohort = None
    method = cfg.cohort_method or ("grad_cam" if data.spatial_dims == 3 else None)
    if method is not None:
        from trustmap.inspect.cohort import _affine_of

        chosen = _Images(
            images=images[torch.as_tensor(subset)],
            labels=labels[subset],
            ids=[data.ids[i] for i in subset],
        )
        cohort = ti.cohort_map(
            net, chosen, method, class_index=target, batch_size=4, affine=_affine_of(ds)
        )
        step("cohort")

    return InspectResult(
        model={
            "path": info.get("path"),
            "arch": info.get("arch"),
            "spatial_dims": info.get("spatial_dims"),
            "in_channels": info.get("in_channels"),
            "num_classes": info.get("num_classes"),
            "create_kwargs": info.get("create_kwargs"),
            "seed": extra.get("seed"),
            "test_roc_auc": extra.get("test_roc_auc"),
        },
        data={
            "name": data.name,
            "path": data.path,
            "classes": list(data.classes),
            "n_images": len(labels),
            "input_size": list(data.spatial),
            "counts": data.counts(),
            "inspected_images": len(subset),
            "concepts": list(concepts.names) if concepts is not None else None,
            "concept_source": concepts.source if concepts is not None else None,
        },
        config=cfg,
        layers=layers,
        layer_table=table,
        filters=filt,
        filter_comparison=comparison,
        unit_rates=rates,
        feature_maps=fmaps,
        example_image=images[example].numpy(),
        activation_images=images[shown].numpy(),
        activation_maps=act_maps,
        embedding=emb,
        projections=tuple(projections),
        outliers=outliers,
        neighbours=neighbours,
        dissections=tuple(dissections),
        influence=tuple(influence),
        maximizations=tuple(maximizations),
        maximization_labels=tuple(max_labels),
        attention_images=att_images,
        attention_maps=att_maps,
        cohort=cohort,
        timings=timings,
        notes=tuple(notes),
    )


def _explain(model: nn.Module, x: torch.Tensor, method: str) -> np.ndarray:
    import trustmap

    return trustmap.explain(model, x, method).detach().cpu().numpy()


@dataclass(frozen=True)
class _Images:
    """A subset of the prepared data, as the cohort map reads it."""

    images: torch.Tensor
    labels: np.ndarray
    ids: list[str]
