"""Train the reference classifiers and localizers: seeded, resumable, checked, with a card.

>>> result = train_classifier("cxr-pneumothorax", out="runs/a1", seed=1)  # doctest: +SKIP
>>> result.card["test"]["roc_auc"]  # doctest: +SKIP
{'value': 0.93, 'low': 0.9, 'high': 0.96, 'reason': None}

What a run does
---------------
* The whole dataset is held in memory (``dataset.tensors()``), optionally resized once
  (``TrainConfig.size``); batches are sliced from it, so no DataLoader workers are needed.
* The model is built from ``seed``; shuffling and augmentation draw from a
  :class:`torch.Generator` seeded from ``seed``; the whole run executes inside
  :func:`torch.random.fork_rng`, so the caller's global RNG state is left as it was and
  the same seed gives the same weights on the CPU.
* Classifiers minimise class-weighted cross-entropy (weights ``n / (K n_k)`` from the
  training prevalence); localizers minimise their own ``loss`` (masks or boxes), with the
  augmentation applied identically to image, mask and boxes.
* Early stopping on the validation loss with ``patience``; the best weights are kept.
* After every epoch ``DIR/last.pt`` is written atomically (model, optimizer, epoch, RNG
  states, history, early-stopping state). Running the same call again resumes from it;
  a finished run returns at once, reusing ``DIR/model.pt``.
* At the end: test metrics with 95 % bootstrap intervals, the checks of Huff et al.'s (2021)
  appendix (:mod:`trustmap.models.checks`), ``DIR/model.pt``
  (:func:`trustmap.models.save_checkpoint`), ``model_card.json``, ``model_card.md`` and
  ``learning_curves.png`` (:mod:`trustmap.models.card`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.atomic import atomic_path
from trustmap.models.augment import AugmentConfig, augment
from trustmap.models.checks import (
    Finding,
    check_augmentation,
    check_class_balance,
    check_dead_feature_maps,
    check_learning_curves,
    check_masks,
)

__all__ = [
    "CLASSIFIERS",
    "DEFAULT_LR",
    "LOCALIZERS",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "train_classifier",
    "train_localizer",
]

CLASSIFIERS = ("small_cnn", "attention_cnn", "resnet18", "densenet121")
LOCALIZERS = ("unet", "attention_unet", "box_localizer")
STATE_FORMAT = "trustmap-train-state"
STATE_VERSION = 1

# Options that change what is trained: a resumed run must agree with them. The others
# (device, time budget, evaluation batch size, bootstrap) can change between attempts.
_IDENTITY_FIELDS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "patience",
    "min_delta",
    "min_epochs",
    "size",
    "augment",
    "model_kwargs",
    "class_weighted",
    "split_seed",
    "grad_clip",
    "scheduler",
    "amp",
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Parameters
    ----------
    epochs
        Maximum number of epochs.
    batch_size
        Training batch size.
    lr, weight_decay, optimizer
        ``"adamw"`` (default) or ``"adam"``, with this learning rate and weight decay.
        ``lr=None`` takes :data:`DEFAULT_LR`: 2e-3 for classifiers, 1e-2 for localizers.
    patience
        Early stopping: stop after this many epochs without a validation-loss improvement
        larger than ``min_delta`` (None: never stop early). The best weights are kept.
    min_epochs
        Never stop early before this many epochs: a CNN learning a small lesion often sits
        on a plateau (loss ~ log 2) for a few epochs before its validation loss drops.
    size
        Resize every image (and mask, and box) once before training: an int for every
        spatial axis or one per axis. None keeps the native size.
    device
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    augment
        The augmentation (:class:`~trustmap.models.augment.AugmentConfig`), or None.
    model_kwargs
        Passed to :func:`trustmap.models.create` (e.g. ``{"width": 16}`` for small_cnn).
    class_weighted
        Weight the cross-entropy by inverse training prevalence.
    threshold
        Decision threshold on P(positive) for the test metrics, or ``"youden"`` to pick the
        one maximising sensitivity + specificity on the validation split.
    n_boot
        Bootstrap resamples for the confidence intervals.
    max_seconds
        Optional time budget: training stops after the epoch that exceeds it.
    eval_batch_size
        Batch size for validation and test passes.
    split_seed
        Seed of the stratified split for datasets that define none.
    grad_clip
        Clip the gradient norm to this value (None: no clipping).
    scheduler
        Learning-rate schedule, stepped per batch: ``"none"`` (constant), ``"cosine"``
        (cosine decay to 0 over ``epochs``) or ``"onecycle"`` (warm-up over the first
        30 % of ``epochs`` to ``lr``, then cosine decay; Smith & Topin 2019).
    amp
        Run the training forward passes in bfloat16 autocast (CPUs with AVX512-BF16/AMX and
        recent GPUs gain 1.5-2x); losses, optimizer and evaluation stay float32.
    channels_last
        Use the channels-last memory layout for 2D models (faster convolutions on CPU).
    checks
        Run the checks of Huff et al.'s (2021) appendix at the end.
    """

    epochs: int = 12
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    patience: int | None = 3
    min_delta: float = 1e-4
    min_epochs: int = 5
    size: int | tuple[int, ...] | None = None
    device: str = "cpu"
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    class_weighted: bool = True
    threshold: float | str = 0.5
    n_boot: int = 1000
    max_seconds: float | None = None
    eval_batch_size: int = 256
    split_seed: int = 0
    grad_clip: float | None = None
    scheduler: str = "none"
    amp: bool = False
    channels_last: bool = True
    checks: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""

        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("eval_batch_size", self.eval_batch_size)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ValueError(f"batch_size must be an integer >= 2, got {self.batch_size!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if self.patience is not None:
            positive_int("patience", self.patience)
        if isinstance(self.min_epochs, bool) or not isinstance(self.min_epochs, int):
            raise ValueError(f"min_epochs must be an integer >= 0, got {self.min_epochs!r}")
        if self.min_epochs < 0:
            raise ValueError(f"min_epochs must be >= 0, got {self.min_epochs}")
        for name in ("lr", "weight_decay", "min_delta"):
            value = getattr(self, name)
            if name == "lr" and value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.scheduler not in ("none", "cosine", "onecycle"):
            raise ValueError(
                f"scheduler must be 'none', 'cosine' or 'onecycle', got {self.scheduler!r}"
            )
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if isinstance(self.threshold, str):
            if self.threshold != "youden":
                raise ValueError(f"threshold must be a number or 'youden', got {self.threshold!r}")
        elif not (0 <= float(self.threshold) <= 1):
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or self.n_boot < 0:
            raise ValueError(f"n_boot must be an integer >= 0, got {self.n_boot!r}")
        if self.augment is not None and not isinstance(self.augment, AugmentConfig):
            raise ValueError(
                f"augment must be an AugmentConfig or None, got {type(self.augment).__name__}"
            )
        if not isinstance(self.model_kwargs, Mapping):
            raise ValueError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-like view (the augmentation as a dict, tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["augment"] = None if self.augment is None else dataclasses.asdict(self.augment)
        out["model_kwargs"] = dict(self.model_kwargs)
        return json.loads(json.dumps(out, default=list))


@dataclass(frozen=True)
class TrainEvent:
    """What a progress callback receives.

    ``kind`` is ``"start"`` (data loaded; ``epoch`` is the number of epochs already done,
    non-zero when resuming), ``"batch"`` (after each training step), ``"epoch"`` (after
    the epoch's validation and after ``last.pt`` was written; ``stats`` holds the
    history row) or ``"done"``. ``epochs`` is the maximum number of epochs and
    ``batches`` the number of training batches per epoch.
    """

    kind: str
    epoch: int
    epochs: int
    batch: int = 0
    batches: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[TrainEvent], None]


@dataclass(frozen=True)
class TrainResult:
    """A trained model and everything written about it.

    ``model`` is in eval mode on the training device, with the best weights.
    ``reused`` is True when a finished run in ``out`` was returned without training.
    """

    model: nn.Module
    out: Path
    checkpoint: Path
    card: dict[str, Any]
    history: list[dict[str, Any]]
    findings: list[Finding]
    best_epoch: int
    epochs_run: int
    seconds: float
    reused: bool = False

    @property
    def test(self) -> dict[str, Any]:
        """The test metrics of the card."""
        return self.card["test"]


# ----------------------------------------------------------------------------------------
# Data preparation
# ----------------------------------------------------------------------------------------


@dataclass
class _Data:
    name: str
    path: str | None
    classes: tuple[str, ...]
    spatial_dims: int
    in_channels: int
    ground_truth: str
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    boxes: list[list[tuple[float, ...]]]
    ids: list[str]
    split: dict[str, np.ndarray]
    native_size: tuple[int, ...]

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.images.shape[2:])

    def counts(self) -> dict[str, dict[str, int]]:
        k = len(self.classes)
        return {
            s: {str(c): int((self.labels[idx] == c).sum()) for c in range(k)}
            for s, idx in self.split.items()
        }

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update("\n".join(self.ids).encode())
        digest.update(self.labels.numpy().tobytes())
        for s in ("train", "val", "test"):
            digest.update(s.encode() + np.asarray(self.split[s], np.int64).tobytes())
        digest.update(str(tuple(self.images.shape)).encode())
        return digest.hexdigest()[:16]


def open_training_dataset(dataset: Any) -> Any:
    """An ImageDataset from an ImageDataset, a directory or a phantom name; an unknown name
    gets an error that lists the phantoms (and the closest one)."""
    if not isinstance(dataset, (str, os.PathLike)):
        if not hasattr(dataset, "tensors") or not hasattr(dataset, "labels"):
            raise TypeError(
                "dataset must be an ImageDataset, a dataset directory or a phantom name, got "
                f"{type(dataset).__name__}"
            )
        return dataset
    from trustmap.data.datasets import open_dataset

    path = Path(dataset).expanduser()
    if not path.exists():
        try:
            from trustmap.data.phantoms import PHANTOMS
        except ImportError:
            PHANTOMS = ()
        if str(dataset) not in PHANTOMS:
            close = difflib.get_close_matches(str(dataset), list(PHANTOMS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown dataset {str(dataset)!r}: not an existing directory and not a phantom "
                f"name ({', '.join(PHANTOMS)}){hint}"
            )
    return open_dataset(dataset)


def normalize_size(size: Any, dims: int, *, minimum: int = 8) -> tuple[int, ...] | None:
    """``size`` (None, an int for every axis, or one per axis) as a tuple of ``dims`` ints
    of at least ``minimum``; ValueError otherwise."""
    if size is None:
        return None
    values = (size,) * dims if isinstance(size, (int, np.integer)) else tuple(size)
    if len(values) != dims or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum
        for v in values
    ):
        raise ValueError(f"size must be an integer >= {minimum} or {dims} of them, got {size!r}")
    return tuple(int(v) for v in values)


def resize_images(images: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bi/trilinear resize of ``(N, C, *spatial)`` in chunks (2D anti-aliased when
    shrinking); returned as is when the size already matches."""
    spatial = tuple(images.shape[2:])
    if size == spatial:
        return images
    two_d = len(spatial) == 2
    shrink = any(t < s for t, s in zip(size, spatial))
    out = torch.empty((images.shape[0], images.shape[1], *size), dtype=images.dtype)
    for start in range(0, images.shape[0], 256):
        sl = slice(start, start + 256)
        out[sl] = F.interpolate(
            images[sl],
            size=size,
            mode="bilinear" if two_d else "trilinear",
            align_corners=False,
            antialias=two_d and shrink,
        )
    return out


def _resize(
    images: torch.Tensor,
    masks: torch.Tensor,
    boxes: list[list[tuple[float, ...]]],
    size: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[float, ...]]]]:
    spatial = tuple(images.shape[2:])
    if size == spatial:
        return images, masks, boxes
    out_i = resize_images(images, size)
    # "nearest-exact" samples at pixel centres, matching align_corners=False of the images.
    out_m = torch.empty((masks.shape[0], 1, *size), dtype=masks.dtype)
    for start in range(0, masks.shape[0], 256):
        sl = slice(start, start + 256)
        out_m[sl] = F.interpolate(masks[sl], size=size, mode="nearest-exact")
    factors = [t / s for t, s in zip(size, spatial)]
    rev = list(reversed(factors))  # (x, y[, z]) order of box coordinates
    n = len(spatial)
    scaled = [
        [tuple(v * rev[k % n] for k, v in enumerate(box[: 2 * n])) for box in bx] for bx in boxes
    ]
    return out_i, out_m, scaled


def _box_xyz(box: Sequence[float], dims: int) -> tuple[float, ...]:
    """A dataset box as ``(x, y[, z], width, height[, depth])``: datasets append 3D boxes'
    ``(z, depth)`` after ``(x, y, width, height)``; augmentation and the checks want the
    lower corner first."""
    values = tuple(float(v) for v in box)
    if dims == 3 and len(values) >= 6:
        x, y, w, h, z, d = values[:6]
        return (x, y, z, w, h, d)
    return values


def _prepare(dataset: Any, config: TrainConfig) -> _Data:
    ds = open_training_dataset(dataset)
    split = ds.split_indices(seed=config.split_seed)
    td = ds.tensors()
    images = td.images
    if images.dim() not in (4, 5):
        raise ValueError(
            f"dataset images must be (N, C, H, W) or (N, C, D, H, W), got {tuple(images.shape)}"
        )
    dims = images.dim() - 2
    boxes = [[_box_xyz(b, dims) for b in bx] for bx in td.boxes]
    native = tuple(images.shape[2:])
    size = normalize_size(config.size, dims)
    masks = td.masks
    if size is not None:
        images, masks, boxes = _resize(images, masks, boxes, size)
    root = getattr(ds, "root", None)
    return _Data(
        name=str(getattr(ds, "name", "dataset")),
        path=str(root) if root is not None else None,
        classes=tuple(getattr(ds, "classes", ("negative", "positive"))),
        spatial_dims=dims,
        in_channels=int(images.shape[1]),
        ground_truth=str(getattr(ds, "ground_truth", "none")),
        images=images.contiguous(),
        labels=td.labels.to(torch.int64),
        masks=masks,
        has_mask=td.has_mask,
        boxes=boxes,
        ids=list(td.ids),
        split={k: np.asarray(v, dtype=np.int64) for k, v in split.items()},
        native_size=native,
    )


def prepare_data(dataset: Any, config: TrainConfig) -> _Data:
    """The tensors training sees: the dataset opened, split and resized as ``config`` says.

    Returns an object with ``images`` ``(N, C, *size)``, ``labels``, ``masks``
    ``(N, 1, *size)``, ``ids``, ``split`` (``{"train", "val", "test"}`` -> indices),
    ``counts()`` and ``fingerprint()``; the trust protocol evaluates maps on exactly the
    images and masks the models were trained on.
    """
    return _prepare(dataset, config)


def _device(config: TrainConfig) -> torch.device:
    try:
        dev = torch.device(config.device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {config.device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {config.device!r}")
    return dev


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------
# The task-specific parts: what a batch costs and what evaluation reports
# ----------------------------------------------------------------------------------------


class _Task:
    kind = ""
    num_classes = 2

    def __init__(self, data: _Data, config: TrainConfig, device: torch.device) -> None:
        self.data = data
        self.config = config
        self.device = device
        self.memory_format = (
            torch.channels_last
            if config.channels_last and data.spatial_dims == 2
            else torch.contiguous_format
        )

    def forward_train(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The training forward pass (bfloat16 autocast with ``amp``), as float32."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp):
            out = model(self.to_device(x))
        return out.float()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def train_indices(self) -> np.ndarray:
        return self.data.split["train"]

    def batch_loss(self, model: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        raise NotImplementedError


class _ClassifierTask(_Task):
    kind = "classifier"

    def __init__(self, data: _Data, config: TrainConfig, device: torch.device) -> None:
        super().__init__(data, config, device)
        self.num_classes = len(data.classes)
        train_labels = data.labels[data.split["train"]]
        counts = torch.bincount(train_labels, minlength=self.num_classes).double()
        if config.class_weighted:
            weights = counts.sum() / (self.num_classes * counts.clamp_min(1))
        else:
            weights = torch.ones(self.num_classes, dtype=torch.float64)
        self.class_weights = weights.float()
        self.weights_dev = self.class_weights.to(device)

    def batch_loss(self, model: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = self.data.images[idx]
        if self.config.augment is not None:
            x = augment(x, config=self.config.augment, generator=gen).images
        y = self.data.labels[idx].to(self.device)
        logits = self.forward_train(model, x)
        return F.cross_entropy(logits, y, weight=self.weights_dev)

    @torch.inference_mode()
    def predict(self, model: nn.Module, idx: np.ndarray) -> torch.Tensor:
        logits = []
        bs = self.config.eval_batch_size
        for start in range(0, len(idx), bs):
            chunk = torch.as_tensor(idx[start : start + bs])
            logits.append(model(self.to_device(self.data.images[chunk])).float().cpu())
        if not logits:
            return torch.zeros(0, self.num_classes)
        return torch.cat(logits)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        idx = self.data.split[split]
        logits = self.predict(model, idx)
        y = self.data.labels[idx]
        loss = float(F.cross_entropy(logits, y, weight=self.class_weights))
        probs = torch.softmax(logits, 1)
        return {"loss": loss, "auc": _auc(y.numpy(), probs.numpy()), "probs": probs, "labels": y}


class _LocalizerTask(_Task):
    kind = "localizer"
    num_classes = 1

    def __init__(self, data: _Data, config: TrainConfig, device: torch.device, target: str) -> None:
        super().__init__(data, config, device)
        self.target = target

    def batch_loss(self, model: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x, m = self.data.images[idx], self.data.masks[idx]
        boxes = [self.data.boxes[i] for i in idx.tolist()]
        if self.config.augment is not None:
            out = augment(x, m, boxes, config=self.config.augment, generator=gen)
            x, m, boxes = out.images, out.masks, out.boxes
        output = self.forward_train(model, x)
        return model.loss(output, m.to(self.device), boxes)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        idx = self.data.split[split]
        bs = self.config.eval_batch_size
        total, maps = 0.0, []
        for start in range(0, len(idx), bs):
            chunk = torch.as_tensor(idx[start : start + bs])
            output = model(self.to_device(self.data.images[chunk]))
            boxes = [self.data.boxes[i] for i in chunk.tolist()]
            loss = model.loss(output, self.data.masks[chunk].to(self.device), boxes)
            total += float(loss) * len(chunk)
            maps.append(model.localization_map(output, self.data.spatial).float().cpu())
        maps_t = torch.cat(maps) if maps else torch.zeros(0, 1, *self.data.spatial)
        masks = self.data.masks[torch.as_tensor(idx)] > 0.5
        labels = self.data.labels[torch.as_tensor(idx)]
        scores = _localization_scores(maps_t, masks)
        image_score = maps_t.flatten(1).amax(1) if len(idx) else torch.zeros(0)
        return {
            "loss": total / max(len(idx), 1),
            "maps": maps_t,
            "masks": masks,
            "labels": labels,
            "image_score": image_score,
            **scores,
        }


def _auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    try:
        return float(roc_auc_score(y, probs, multi_class="ovr"))
    except ValueError:
        return None


def _average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (ties as one step)."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], target[order].astype(np.float64)
    # Positions where the score changes close a group of tied scores.
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(t)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _localization_scores(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, Any]:
    """Dice and IoU at 0.5 and AUPRC per image that has a non-empty mask."""
    dice, iou, auprc = [], [], []
    for i in range(maps.shape[0]):
        m = masks[i].reshape(-1)
        if not bool(m.any()):
            continue
        p = maps[i].reshape(-1)
        pred = p >= 0.5
        inter = float((pred & m).sum())
        dice.append(2 * inter / (float(pred.sum()) + float(m.sum())))
        iou.append(inter / float((pred | m).sum()))
        auprc.append(_average_precision(p.numpy(), m.numpy()))
    return {"dice": dice, "iou": iou, "auprc": auprc}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


def _state_dict_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as temp:
        torch.save(state, temp)


def load_state(
    path: Path, *, format: str = STATE_FORMAT, what: str = "trustmap training state"
) -> dict[str, Any]:
    """A resumable training state written with ``torch.save``, loaded with
    ``weights_only``; ValueError naming the file when it is unreadable or not ``format``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and why
        raise ValueError(
            f"{path} is not a readable training state ({type(err).__name__}: {err}); delete it "
            "to start the run afresh"
        ) from err
    if not isinstance(state, dict) or state.get("format") != format:
        raise ValueError(f"{path} is not a {what}; delete it or use another --out")
    return state


def _identity(
    kind: str, arch: str, seed: int, data: _Data, config: TrainConfig, num_classes: int
) -> dict[str, Any]:
    cfg = config.to_dict()
    return {
        "kind": kind,
        "arch": arch,
        "seed": seed,
        "num_classes": num_classes,
        "dataset": data.name,
        "data": data.fingerprint(),
        "config": {k: cfg[k] for k in _IDENTITY_FIELDS},
    }


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The settings in which two run identities differ, as ``key: old -> new`` lines (the
    ``config`` entry compared field by field), for refusing to resume another run."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def _build_model(
    arch: str, data: _Data, num_classes: int, config: TrainConfig, seed: int
) -> nn.Module:
    from trustmap.models import create

    return create(
        arch,
        data.spatial_dims,
        data.in_channels,
        max(num_classes, 1) if arch not in LOCALIZERS else 1,
        seed=seed,
        **dict(config.model_kwargs),
    )


def _run(task: _Task, arch: str, *, out: Path, **kwargs: Any) -> TrainResult:
    """:func:`_run_unlocked` holding the lock of ``out``: a second run into the same
    folder stops at once (see :mod:`trustmap.core.lock`) instead of training again."""
    from trustmap.core.lock import output_lock

    with output_lock(out):
        return _run_unlocked(task, arch, out=out, **kwargs)


def _run_unlocked(
    task: _Task,
    arch: str,
    *,
    out: Path,
    seed: int,
    progress: Progress | None,
    finalize: Callable[[nn.Module, list[dict[str, Any]], dict[str, Any]], TrainResult],
    reuse: Callable[[dict[str, Any]], TrainResult],
) -> TrainResult:
    config = task.config
    data = task.data
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / "last.pt"
    num_classes = task.num_classes
    identity = _identity(task.kind, arch, seed, data, config, num_classes)
    state: dict[str, Any] | None = None
    if last_path.exists():
        state = load_state(last_path)
        diffs = identity_diff(state.get("identity", {}), identity)
        if diffs:
            raise ValueError(
                f"{last_path} belongs to another training run ({'; '.join(diffs)}); use another "
                "--out directory or delete it to start afresh"
            )
        if (
            state.get("finished")
            and (out / "model.pt").exists()
            and (out / "model_card.json").exists()
        ):
            return reuse(state)

    devices = [task.device] if task.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_derived_seed(seed, 2))
        model = _build_model(arch, data, num_classes, config, seed).to(task.device)
        model = model.to(memory_format=task.memory_format)
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        train_idx = task.train_indices()
        bs = config.batch_size
        n_batches = max(1, math.ceil(len(train_idx) / bs))
        scheduler = _scheduler(optimizer, config, n_batches)
        gen = torch.Generator().manual_seed(_derived_seed(seed, 1))
        history: list[dict[str, Any]] = []
        best = {"loss": math.inf, "epoch": 0, "bad_epochs": 0}
        best_state = _state_dict_copy(model)
        epoch, seconds, stop_reason = 0, 0.0, None
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if devices and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], task.device)
            history = list(state["history"])
            best = dict(state["best"])
            best_state = state["best_state"]
            epoch, seconds = int(state["epoch"]), float(state["seconds"])
            stop_reason = state.get("stop_reason")
        if progress:
            progress(
                TrainEvent(
                    "start", epoch, config.epochs, 0, n_batches, {"resumed": state is not None}
                )
            )
        while stop_reason is None and epoch < config.epochs:
            started = time.perf_counter()
            model.train()
            order = torch.as_tensor(train_idx)[torch.randperm(len(train_idx), generator=gen)]
            total, seen = 0.0, 0
            for b in range(n_batches):
                idx = order[b * bs : (b + 1) * bs]
                if len(idx) < 2:
                    continue  # BatchNorm needs two samples; the next epoch reshuffles
                loss = task.batch_loss(model, idx, gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                value = float(loss.detach())
                total += value * len(idx)
                seen += len(idx)
                if progress:
                    progress(
                        TrainEvent(
                            "batch", epoch + 1, config.epochs, b + 1, n_batches, {"loss": value}
                        )
                    )
            model.eval()
            val = task.evaluate(model, "val")
            epoch += 1
            row = {
                "epoch": epoch,
                "train_loss": total / max(seen, 1),
                "val_loss": val["loss"],
                **_epoch_metrics(val),
                "lr": float(optimizer.param_groups[0]["lr"]),
            }
            if val["loss"] < best["loss"] - config.min_delta:
                best = {"loss": val["loss"], "epoch": epoch, "bad_epochs": 0}
                best_state = _state_dict_copy(model)
            else:
                best["bad_epochs"] += 1
            if not math.isfinite(row["train_loss"]):
                stop_reason = "non-finite training loss"
            elif (
                config.patience is not None
                and best["bad_epochs"] >= config.patience
                and epoch >= config.min_epochs
            ):
                stop_reason = "early stopping"
            seconds += time.perf_counter() - started
            row["seconds"] = seconds
            history.append(row)
            if (
                stop_reason is None
                and config.max_seconds is not None
                and seconds >= config.max_seconds
            ):
                stop_reason = "time budget"
            if stop_reason is None and epoch >= config.epochs:
                stop_reason = "max epochs"
            _save_state(
                last_path,
                {
                    "format": STATE_FORMAT,
                    "version": STATE_VERSION,
                    "identity": identity,
                    "epoch": epoch,
                    "model": _state_dict_copy(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(task.device) if devices else None,
                    "history": history,
                    "best": best,
                    "best_state": best_state,
                    "seconds": seconds,
                    "stop_reason": stop_reason,
                    "finished": False,
                },
            )
            if progress:
                progress(TrainEvent("epoch", epoch, config.epochs, n_batches, n_batches, dict(row)))
        model.load_state_dict(best_state)
        model.eval()
        info = {
            "best_epoch": best["epoch"],
            "epochs_run": epoch,
            "seconds": seconds,
            "stop_reason": stop_reason or "max epochs",
            "identity": identity,
        }
        result = finalize(model, history, info)
        # Mark the run finished only once model.pt and the card exist.
        _save_state(
            last_path,
            {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "identity": identity,
                "epoch": epoch,
                "history": history,
                "best": best,
                "seconds": seconds,
                "stop_reason": info["stop_reason"],
                "finished": True,
            },
        )
        if progress:
            progress(TrainEvent("done", epoch, config.epochs, 0, n_batches, {"seconds": seconds}))
        return result


def _scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, n_batches: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    total = config.epochs * n_batches
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=0.3
        )
    return None


def _epoch_metrics(val: Mapping[str, Any]) -> dict[str, Any]:
    if "auc" in val:
        return {"val_auc": val["auc"]}
    return {"val_dice": _mean(val["dice"]), "val_auprc": _mean(val["auprc"])}


# ----------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------


# Learning rates used when TrainConfig.lr is None. Measured on cxr-pneumothorax (64 x 64):
# small_cnn learns within ~8 epochs at 2e-3 and gets noisier above; the U-Net (instance
# norm, PReLU) barely leaves its start in 6 epochs at 2e-3 (AUPRC 0.04) but reaches 0.6
# at 1e-2, as does the box localizer.
DEFAULT_LR = {"classifier": 2e-3, "localizer": 1e-2}


def _with_lr(config: TrainConfig, kind: str) -> TrainConfig:
    """``config`` validated, its ``lr`` filled in from :data:`DEFAULT_LR` when None."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    if config.lr is None:
        config = dataclasses.replace(config, lr=DEFAULT_LR[kind])
    return config


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_splits(data: _Data, *, need_both_classes: bool) -> None:
    for s in ("train", "val", "test"):
        idx = data.split.get(s)
        if idx is None or len(idx) == 0:
            raise ValueError(
                f"dataset {data.name!r} has no {s} images; training needs train, val and test "
                "splits"
            )
        if need_both_classes:
            present = set(data.labels[idx].tolist())
            missing = [data.classes[k] for k in range(len(data.classes)) if k not in present]
            if missing:
                counts = {
                    data.classes[k]: int((data.labels[idx] == k).sum())
                    for k in range(len(data.classes))
                }
                raise ValueError(
                    f"the {s} split of dataset {data.name!r} has one class only ({counts}): class "
                    f"{', '.join(missing)} is missing, so the class-weighted loss, ROC AUC and "
                    "sensitivity/specificity are undefined; re-split the data stratified by class"
                )


def _versions() -> dict[str, str]:
    import trustmap

    out = {
        "trustmap": trustmap.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    # Package metadata, not an import: importing MONAI only to read its version takes seconds.
    for name in ("monai", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _base_card(
    kind: str,
    arch: str,
    seed: int,
    data: _Data,
    config: TrainConfig,
    model: nn.Module,
    info: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "format": "trustmap-model-card",
        "version": 1,
        "kind": kind,
        "arch": arch,
        "create_kwargs": dict(config.model_kwargs),
        "params": int(sum(p.numel() for p in model.parameters())),
        "seed": seed,
        "dataset": {
            "name": data.name,
            "path": data.path,
            "classes": list(data.classes),
            "spatial_dims": data.spatial_dims,
            "in_channels": data.in_channels,
            "ground_truth": data.ground_truth,
            "native_size": list(data.native_size),
            "input_size": list(data.spatial),
            "counts": data.counts(),
        },
        "config": config.to_dict(),
        "epochs_run": int(info["epochs_run"]),
        "best_epoch": int(info["best_epoch"]),
        "stop_reason": info["stop_reason"],
        "wall_time_s": float(info["seconds"]),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {
            "checkpoint": "model.pt",
            "learning_curves": "learning_curves.png",
            "card_json": "model_card.json",
            "card_markdown": "model_card.md",
        },
    }


def _data_findings(data: _Data, task: _Task, arch: str) -> list[Finding]:
    findings: list[Finding] = []
    findings += check_class_balance(
        {s: data.labels[idx] for s, idx in data.split.items()}, classes=data.classes
    )
    if data.ground_truth != "none":
        order = np.concatenate([data.split[s] for s in ("val", "test", "train")])
        pick = torch.as_tensor(order)
        box_gt = "boxes" in data.ground_truth
        findings += check_masks(
            data.images[pick],
            data.masks[pick],
            data.labels[pick],
            ids=[data.ids[i] for i in order],
            boxes=[data.boxes[i] for i in order] if box_gt else None,
        )
    if task.config.augment is not None and not task.config.augment.is_identity:
        cfg = task.config.augment

        def fn(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator):
            res = augment(images, masks, config=cfg, generator=gen)
            return res.images, res.masks

        findings += check_augmentation(fn, data.spatial, in_channels=data.in_channels)
    return findings


def _reuse(out: Path, device: torch.device) -> Callable[[dict[str, Any]], TrainResult]:
    from trustmap.models import load_checkpoint

    def reuse(state: dict[str, Any]) -> TrainResult:
        model, _info = load_checkpoint(out / "model.pt", map_location=device)
        card = json.loads((out / "model_card.json").read_text())
        findings = [Finding(**f) for f in card.get("findings", [])]
        return TrainResult(
            model=model,
            out=out,
            checkpoint=out / "model.pt",
            card=card,
            history=list(card.get("history", state.get("history", []))),
            findings=findings,
            best_epoch=int(card.get("best_epoch", state["best"]["epoch"])),
            epochs_run=int(card.get("epochs_run", state["epoch"])),
            seconds=float(card.get("wall_time_s", state["seconds"])),
            reused=True,
        )

    return reuse


def _youden(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thr[best], 0.0), 1.0))


def _findings(
    model: nn.Module,
    arch: str,
    data: _Data,
    task: _Task,
    config: TrainConfig,
    history: list[dict[str, Any]],
    info: Mapping[str, Any],
) -> list[Finding]:
    """The checks of Huff et al.'s (2021) appendix after training (none when ``config.checks`` is
    off): learning curves, dead feature maps on the validation set, the data itself."""
    if not config.checks:
        return []
    findings = check_learning_curves(history, best_epoch=info["best_epoch"])
    val_images = data.images[torch.as_tensor(data.split["val"])]
    findings += check_dead_feature_maps(
        model, task.to_device(val_images), batch_size=config.eval_batch_size
    )
    return findings + _data_findings(data, task, arch)


def _save_result(
    out: Path,
    model: nn.Module,
    arch: str,
    data: _Data,
    config: TrainConfig,
    num_classes: int,
    card: dict[str, Any],
    history: list[dict[str, Any]],
    findings: list[Finding],
    info: Mapping[str, Any],
) -> TrainResult:
    """Write ``model.pt`` and the model card; the result of a finished run."""
    from trustmap.models.card import write_model_card
    from trustmap.models.checkpoint import save_checkpoint

    # Training runs in channels-last memory format (faster convolutions on CPUs); the
    # model handed back is in the standard format, as the checkpoint reloads it, so that
    # a trained model and its reloaded copy compute bit for bit the same maps.
    model = model.to(memory_format=torch.contiguous_format)
    ckpt = save_checkpoint(
        out / "model.pt",
        model,
        arch=arch,
        spatial_dims=data.spatial_dims,
        in_channels=data.in_channels,
        num_classes=num_classes,
        extra=_checkpoint_extra(card),
        **dict(config.model_kwargs),
    )
    write_model_card(out, card)
    return TrainResult(
        model=model,
        out=out,
        checkpoint=ckpt,
        card=card,
        history=history,
        findings=findings,
        best_epoch=info["best_epoch"],
        epochs_run=info["epochs_run"],
        seconds=info["seconds"],
    )


def train_classifier(
    dataset: Any,
    arch: str = "small_cnn",
    *,
    out: str | os.PathLike[str],
    seed: int = 0,
    config: TrainConfig | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a classifier on a dataset's train split; early stopping on its val split;
    test metrics with 95 % bootstrap intervals on its test split.

    Parameters
    ----------
    dataset
        An :class:`~trustmap.data.datasets.ImageDataset`, a dataset directory or a phantom
        name (``"cxr-pneumothorax"``, generated on first use).
    arch
        ``"small_cnn"``, ``"resnet18"`` or ``"densenet121"``.
    out
        Output directory: ``model.pt``, ``last.pt``, ``model_card.json``,
        ``model_card.md``, ``learning_curves.png``. Re-running with the same arguments
        resumes an interrupted run, or returns a finished one.
    seed
        Seeds the weights, the shuffling and the augmentation.
    config
        :class:`TrainConfig` (defaults when None).
    progress
        Called with a :class:`TrainEvent` at start, after every batch and epoch, and at
        the end. An exception it raises stops training; ``last.pt`` then holds the last
        finished epoch.

    Raises
    ------
    ValueError
        Unknown architecture or dataset, a localizer architecture, a split that is empty
        or lacks a class, invalid options, or a ``last.pt`` of another run in ``out``.
    """
    config = _with_lr(config or TrainConfig(), "classifier")
    seed = _check_seed(seed)
    if arch not in CLASSIFIERS:
        if arch in LOCALIZERS:
            raise ValueError(
                f"{arch!r} is a localizer: train it with train_localizer "
                "(trustmap train --localizer)"
            )
        close = difflib.get_close_matches(
            str(arch), list(CLASSIFIERS + LOCALIZERS), n=1, cutoff=0.4
        )
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown architecture {arch!r}: choose one of {', '.join(CLASSIFIERS)}{hint}"
        )
    device = _device(config)
    data = _prepare(dataset, config)
    _check_splits(data, need_both_classes=True)
    task = _ClassifierTask(data, config, device)
    out = Path(out)

    def finalize(
        model: nn.Module, history: list[dict[str, Any]], info: dict[str, Any]
    ) -> TrainResult:
        test = task.evaluate(model, "test")
        val = task.evaluate(model, "val")
        binary = task.num_classes == 2
        threshold: float = 0.5
        if binary and config.threshold == "youden":
            threshold = _youden(val["labels"].numpy(), val["probs"][:, 1].numpy())
        elif binary:
            threshold = float(config.threshold)
        test_metrics = _classification_metrics(test, threshold, config, seed, task.num_classes)
        findings = _findings(model, arch, data, task, config, history, info)
        card = _base_card("classifier", arch, seed, data, config, model, info)
        card.update(
            {
                "num_classes": task.num_classes,
                "class_weights": [float(w) for w in task.class_weights],
                "threshold": threshold,
                "test": test_metrics,
                "confusion": test_metrics.get("confusion"),
                "val": {"loss": val["loss"], "roc_auc": val["auc"]},
                "history": history,
                "findings": [f.to_dict() for f in findings],
            }
        )
        return _save_result(
            out, model, arch, data, config, task.num_classes, card, history, findings, info
        )

    return _run(
        task,
        arch,
        out=out,
        seed=seed,
        progress=progress,
        finalize=finalize,
        reuse=_reuse(out, device),
    )


def _checkpoint_extra(card: Mapping[str, Any]) -> dict[str, Any]:
    test = card.get("test", {})
    auc = test.get("roc_auc", {}) if isinstance(test, dict) else {}
    return {
        "kind": card["kind"],
        "dataset": card["dataset"]["name"],
        "classes": card["dataset"]["classes"],
        "input_size": card["dataset"]["input_size"],
        "seed": card["seed"],
        "best_epoch": card["best_epoch"],
        "threshold": card.get("threshold"),
        "test_roc_auc": auc.get("value") if isinstance(auc, dict) else None,
    }


def _classification_metrics(
    test: Mapping[str, Any], threshold: float, config: TrainConfig, seed: int, num_classes: int
) -> dict[str, Any]:
    from trustmap.metrics.classification import classification_report

    y = test["labels"].numpy()
    probs = test["probs"].numpy().astype(np.float64)
    if num_classes == 2:
        report = classification_report(
            y, np.clip(probs[:, 1], 0.0, 1.0), threshold=threshold, n_boot=config.n_boot, seed=seed
        )
        return report.to_dict()
    # More than two classes: accuracy, one-vs-rest ROC AUC and the confusion matrix.
    pred = probs.argmax(1)
    confusion = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    return {
        "n": int(y.size),
        "accuracy": {
            "value": float((pred == y).mean()),
            "low": None,
            "high": None,
            "reason": "multi-class: no interval",
        },
        "roc_auc": {
            "value": _auc(y, probs),
            "low": None,
            "high": None,
            "reason": "one-vs-rest macro average",
        },
        "confusion": confusion.tolist(),
    }


def _boxes_from_masks(masks: torch.Tensor) -> list[list[tuple[float, ...]]]:
    """Bounding boxes of the connected components of each mask ``(N, 1, *S)``."""
    from scipy import ndimage

    out = []
    for m in masks[:, 0].numpy() > 0.5:
        labelled, _ = ndimage.label(m)
        boxes = []
        for sl in ndimage.find_objects(labelled):
            if sl is None:
                continue
            lo = [s.start for s in reversed(sl)]
            ext = [s.stop - s.start for s in reversed(sl)]
            boxes.append(tuple(float(v) for v in (*lo, *ext)))
        out.append(boxes)
    return out


def _bootstrap_mean(values: Sequence[float], n_boot: int, seed: int) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {
            "value": None,
            "low": None,
            "high": None,
            "n": 0,
            "reason": "no test image with a lesion",
        }
    if n_boot == 0 or v.size < 2:
        return {
            "value": float(v.mean()),
            "low": None,
            "high": None,
            "n": int(v.size),
            "reason": "no interval",
        }
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "value": float(v.mean()),
        "low": float(low),
        "high": float(high),
        "n": int(v.size),
        "reason": None,
    }


def train_localizer(
    dataset: Any,
    arch: str = "unet",
    *,
    out: str | os.PathLike[str],
    seed: int = 0,
    config: TrainConfig | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a localizer (``"unet"`` on masks, ``"box_localizer"`` on boxes) on all
    training images, positives and negatives, with early stopping on the validation loss.

    ``box_localizer`` learns the dataset's boxes; on a dataset with masks only it learns
    the bounding boxes of the masks' connected components. ``unet`` learns the masks (for
    box datasets the union-of-boxes masks). The card reports, on the test images with a
    lesion, the mean Dice and IoU of ``localization_map >= 0.5`` and the mean AUPRC of
    the map against the mask, each with a 95 % bootstrap interval, and the image-level
    ROC AUC of the map's maximum.

    Parameters and errors as :func:`train_classifier`; also raises ValueError for a
    dataset without masks or boxes.
    """
    config = _with_lr(config or TrainConfig(), "localizer")
    seed = _check_seed(seed)
    if arch not in LOCALIZERS:
        if arch in CLASSIFIERS:
            raise ValueError(f"{arch!r} is a classifier: train it with train_classifier")
        close = difflib.get_close_matches(
            str(arch), list(LOCALIZERS + CLASSIFIERS), n=1, cutoff=0.4
        )
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown localizer {arch!r}: choose one of {', '.join(LOCALIZERS)}{hint}")
    device = _device(config)
    data = _prepare(dataset, config)
    _check_splits(data, need_both_classes=False)
    has_any = bool(data.has_mask.any()) and bool((data.masks.flatten(1).amax(1) > 0).any())
    if data.ground_truth == "none" or not has_any:
        raise ValueError(
            f"dataset {data.name!r} has no lesion masks or boxes (ground_truth "
            f"{data.ground_truth!r}): a localizer needs them; train a classifier instead"
        )
    for s in ("train", "test"):
        idx = torch.as_tensor(data.split[s])
        if not bool((data.masks[idx].flatten(1).amax(1) > 0).any()):
            raise ValueError(
                f"the {s} split of dataset {data.name!r} has no image with a lesion mask"
            )
    if arch == "box_localizer":
        if data.spatial_dims != 2:
            raise ValueError("box_localizer is 2D only; train 'unet' on 3D data")
        if "boxes" not in data.ground_truth or not any(data.boxes):
            data.boxes = _boxes_from_masks(data.masks)
    task = _LocalizerTask(
        data, config, device, target="boxes" if arch == "box_localizer" else "mask"
    )
    out = Path(out)

    def finalize(
        model: nn.Module, history: list[dict[str, Any]], info: dict[str, Any]
    ) -> TrainResult:
        test = task.evaluate(model, "test")
        labels = test["labels"].numpy()
        positive = len(data.classes) - 1
        detection = None
        if len(np.unique(labels)) == 2:
            from sklearn.metrics import roc_auc_score

            detection = float(roc_auc_score(labels == positive, test["image_score"].numpy()))
        metrics = {
            "dice": _bootstrap_mean(test["dice"], config.n_boot, seed),
            "iou": _bootstrap_mean(test["iou"], config.n_boot, seed),
            "auprc": _bootstrap_mean(test["auprc"], config.n_boot, seed),
            "detection_roc_auc": detection,
            "loss": test["loss"],
            "n_images": len(labels),
            "n_with_lesion": len(test["dice"]),
            "threshold": 0.5,
            "auprc_definition": "average precision of localization_map against the mask, per image",
        }
        findings = _findings(model, arch, data, task, config, history, info)
        card = _base_card("localizer", arch, seed, data, config, model, info)
        card.update(
            {
                "target_kind": getattr(model, "target_kind", task.target),
                "test": metrics,
                "history": history,
                "findings": [f.to_dict() for f in findings],
            }
        )
        return _save_result(out, model, arch, data, config, 1, card, history, findings, info)

    return _run(
        task,
        arch,
        out=out,
        seed=seed,
        progress=progress,
        finalize=finalize,
        reuse=_reuse(out, device),
    )
