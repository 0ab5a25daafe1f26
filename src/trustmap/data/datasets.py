"""One dataset interface for phantoms and real data: samples, splits, in-memory tensors.

Every loader (:mod:`trustmap.data.loaders`) is an :class:`ImageDataset` whose items are
:class:`Sample` objects: the image as a float32 tensor ``(C, *spatial)`` with the
dataset's intensity mapping applied, the class index, the ground-truth mask (or None),
boxes, the shortcut token's mask and metadata naming the file and the CSV row it came
from.

>>> ds = open_dataset("cxr-pneumothorax")  # doctest: +SKIP
>>> ds[0].image.shape, ds[0].label, ds[0].mask.shape  # doctest: +SKIP
(torch.Size([1, 128, 128]), 0, torch.Size([128, 128]))
>>> train = ds.tensors("train")  # loads every image once, then slices  # doctest: +SKIP
>>> loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate)  # doctest: +SKIP

Intensity mappings
------------------
How stored values become network inputs, as in the ``intensity`` entry of a dataset card:

* ``{"kind": "range", "min": a, "max": b}``: ``(v - a) / (b - a)``, not clipped.
* ``{"kind": "window", "center": c, "width": w}``: clip to the window, scale to [0, 1].
* ``{"kind": "zscore"}``: ``(v - mean) / std`` with mean and std over the nonzero voxels
  of the image; zero voxels (background outside the head) stay 0.
* ``{"kind": "minmax"}``: the image's own minimum and maximum to [0, 1].
* ``{"kind": "dicom"}``: the DICOM file's own WindowCenter/WindowWidth.

A bare kind name (``"minmax"``) stands for the dict.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trustmap.data.io import apply_window
from trustmap.data.labels import boxes_to_mask
from trustmap.errors import DataError, InputTypeError, MissingFileError

__all__ = [
    "GROUND_TRUTH_KINDS",
    "INTENSITY_KINDS",
    "SPLITS",
    "ImageDataset",
    "Sample",
    "TensorData",
    "collate",
    "dataset_cache_dir",
    "map_intensity",
    "normalize_intensity",
    "open_dataset",
    "resize_sample",
    "stratified_split",
]

SPLITS = ("train", "val", "test")
GROUND_TRUTH_KINDS = ("mask", "boxes", "mask+boxes", "none")
INTENSITY_KINDS = ("range", "window", "zscore", "minmax", "dicom")

Box = tuple[float, ...]


# ---------------------------------------------------------------------------------------
# Samples and batches


@dataclass(frozen=True, eq=False)
class Sample:
    """One item of an :class:`ImageDataset`.

    Attributes
    ----------
    image:
        ``(C, *spatial)`` float32, intensity-mapped as the dataset says.
    label:
        Class index into ``dataset.classes``.
    mask:
        ``(*spatial)`` bool lesion ground truth (for box datasets the union of the boxes;
        all False for a negative image), or None where the dataset has no localization
        ground truth.
    boxes:
        ``(x, y, width, height)`` boxes in pixels of ``image`` (``x`` the left column,
        ``y`` the top row); 3D boxes append ``(z, depth)`` in slices. Empty if none.
    token_mask:
        ``(*spatial)`` bool mask of the shortcut token, where the dataset records one.
    meta:
        At least ``id``, ``path`` (the image file), ``split`` (None where the source has
        none), ``spacing`` (mm per spatial axis, or None) and ``row`` (the line of the
        CSV file the sample comes from, the header being line 1; or the index in an
        array file), plus loader-specific entries.
    """

    image: torch.Tensor
    label: int
    mask: torch.Tensor | None = None
    boxes: tuple[Box, ...] = ()
    token_mask: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class TensorData:
    """A whole dataset (or split) in memory, as training wants it.

    Attributes
    ----------
    images:
        ``(N, C, *spatial)`` float32.
    labels:
        ``(N,)`` int64.
    masks:
        ``(N, 1, *spatial)`` float32 in {0, 1}; zeros where a sample has no mask.
    has_mask:
        ``(N,)`` bool, True where the sample has localization ground truth.
    boxes:
        Per sample, its list of boxes.
    ids:
        Per sample, its id.
    token_masks:
        ``(N, 1, *spatial)`` float32, or None when no sample records a token.
    indices:
        ``(N,)`` positions of the samples in the dataset they were loaded from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    boxes: list[list[Box]]
    ids: list[str]
    token_masks: torch.Tensor | None = None
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: Sequence[int] | np.ndarray) -> TensorData:
        """The rows ``indices`` (positions in this object, not in the dataset)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        pick = torch.as_tensor(idx)
        return TensorData(
            images=self.images[pick],
            labels=self.labels[pick],
            masks=self.masks[pick],
            has_mask=self.has_mask[pick],
            boxes=[self.boxes[i] for i in idx],
            ids=[self.ids[i] for i in idx],
            token_masks=None if self.token_masks is None else self.token_masks[pick],
            indices=self.indices[idx],
        )


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack samples into a batch for :class:`torch.utils.data.DataLoader`.

    Returns a dict with the keys of :class:`TensorData`: ``images`` ``(B, C, *S)``,
    ``labels`` ``(B,)`` int64, ``masks`` ``(B, 1, *S)`` float32 (zeros where a sample has
    none), ``has_mask`` ``(B,)`` bool, ``boxes``, ``token_masks`` (or None), ``ids``, and
    ``meta`` (the list of sample metadata).
    """
    samples = list(samples)
    if not samples:
        raise DataError("collate needs at least one sample")
    shape = tuple(samples[0].image.shape)
    for s in samples[1:]:
        if tuple(s.image.shape) != shape:
            raise DataError(
                f"cannot batch images of shapes {shape} ({samples[0].meta.get('id')}) and "
                f"{tuple(s.image.shape)} ({s.meta.get('id')}); open the dataset with size= "
                "to resize on load"
            )
    spatial = shape[1:]
    any_token = any(s.token_mask is not None for s in samples)
    return {
        "images": torch.stack([s.image for s in samples]),
        "labels": torch.tensor([s.label for s in samples], dtype=torch.int64),
        "masks": torch.stack([_mask_plane(s.mask, spatial) for s in samples]),
        "has_mask": torch.tensor([s.mask is not None for s in samples], dtype=torch.bool),
        "boxes": [list(s.boxes) for s in samples],
        "token_masks": (
            torch.stack([_mask_plane(s.token_mask, spatial) for s in samples])
            if any_token
            else None
        ),
        "ids": [str(s.meta.get("id")) for s in samples],
        "meta": [s.meta for s in samples],
    }


def _mask_plane(mask: torch.Tensor | None, spatial: tuple[int, ...]) -> torch.Tensor:
    if mask is None:
        return torch.zeros((1, *spatial), dtype=torch.float32)
    return mask.to(torch.float32)[None]


# ---------------------------------------------------------------------------------------
# Intensity


def normalize_intensity(intensity: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Check an intensity mapping (see the module docstring); return it as a dict."""
    if intensity is None:
        return None
    spec = {"kind": intensity} if isinstance(intensity, str) else dict(intensity)
    kind = spec.get("kind")
    if kind not in INTENSITY_KINDS:
        raise DataError(
            f"unknown intensity kind {kind!r} in {intensity!r}; use one of "
            f"{', '.join(INTENSITY_KINDS)}"
        )
    needed = {"range": ("min", "max"), "window": ("center", "width")}.get(kind, ())
    for key in needed:
        value = spec.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise DataError(f"intensity {kind!r} needs a finite number {key!r}, got {spec!r}")
    if kind == "range" and not spec["max"] > spec["min"]:
        raise DataError(f"intensity range needs max > min, got {spec!r}")
    if kind == "window" and not spec["width"] > 0:
        raise DataError(f"intensity window needs width > 0, got {spec!r}")
    return spec


def map_intensity(
    array: np.ndarray,
    intensity: str | Mapping[str, Any],
    *,
    meta: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Map stored values to network input as float32 (see the module docstring).

    ``meta`` supplies ``window_center``/``window_width`` for the ``"dicom"`` kind (the
    :attr:`~trustmap.data.io.LoadedImage.meta` of a DICOM file).
    """
    spec = normalize_intensity(intensity)
    assert spec is not None
    values = np.asarray(array, dtype=np.float64)
    kind = spec["kind"]
    if kind == "range":
        out = (values - spec["min"]) / (spec["max"] - spec["min"])
    elif kind == "window":
        return apply_window(values, float(spec["center"]), float(spec["width"]))
    elif kind == "dicom":
        center = (meta or {}).get("window_center")
        width = (meta or {}).get("window_width")
        if center is None or width is None or not width > 0:
            raise DataError(
                "intensity 'dicom' needs the file's WindowCenter/WindowWidth, which it lacks; "
                "use 'minmax' or an explicit window"
            )
        return apply_window(values, float(center), float(width))
    elif kind == "zscore":
        nonzero = values != 0
        out = np.zeros_like(values)
        if nonzero.any():
            inside = values[nonzero]
            std = float(inside.std())
            out[nonzero] = (inside - float(inside.mean())) / (std if std > 0 else 1.0)
    else:  # minmax
        low, high = float(values.min()), float(values.max())
        out = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Resizing


def _normalize_size(size: int | Sequence[int] | None, spatial_dims: int) -> tuple[int, ...] | None:
    if size is None:
        return None
    values = (size,) * spatial_dims if isinstance(size, int | np.integer) else tuple(size)
    if len(values) != spatial_dims or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise DataError(
            f"size must be a positive integer or {spatial_dims} positive integers, got {size!r}"
        )
    return tuple(int(v) for v in values)


def _resize_mask(mask: torch.Tensor | None, size: tuple[int, ...]) -> torch.Tensor | None:
    if mask is None:
        return None
    # "nearest-exact" samples at pixel centres; plain "nearest" is shifted by half a pixel.
    out = F.interpolate(mask[None, None].to(torch.float32), size=size, mode="nearest-exact")
    return out[0, 0] > 0.5


def resize_sample(
    sample: Sample, size: int | Sequence[int], *, boxes_define_mask: bool = False
) -> Sample:
    """Resize a sample: image (bi/trilinear), masks (nearest), boxes and spacing (scaled).

    2D images are low-pass filtered when shrunk (``antialias=True``); volumes are not,
    as PyTorch has no antialiased trilinear mode. With ``boxes_define_mask`` the mask is
    redrawn from the scaled boxes, so that it stays their exact union.
    """
    spatial = tuple(int(n) for n in sample.image.shape[1:])
    target = _normalize_size(size, len(spatial))
    assert target is not None
    if target == spatial:
        return sample
    two_d = len(spatial) == 2
    shrink = any(t < s for t, s in zip(target, spatial))
    image = F.interpolate(
        sample.image[None],
        size=target,
        mode="bilinear" if two_d else "trilinear",
        align_corners=False,
        antialias=two_d and shrink,
    )[0]
    factors = [t / s for t, s in zip(target, spatial)]  # (d,) h, w
    fy, fx = factors[-2], factors[-1]
    boxes = []
    for box in sample.boxes:
        scaled = [box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy]
        if len(box) == 6:
            scaled += [box[4] * factors[0], box[5] * factors[0]]
        boxes.append(tuple(scaled))
    mask = _resize_mask(sample.mask, target)
    if boxes_define_mask and sample.mask is not None:
        depth = target[0] if not two_d else None
        mask = torch.from_numpy(boxes_to_mask(boxes, target[-2], target[-1], depth=depth))
    spacing = sample.meta.get("spacing")
    meta = {
        **sample.meta,
        "original_shape": sample.meta.get("original_shape", spatial),
        "spacing": (
            tuple(float(s) / f for s, f in zip(spacing, factors)) if spacing is not None else None
        ),
    }
    return replace(
        sample,
        image=image.contiguous(),
        mask=mask,
        boxes=tuple(boxes),
        token_mask=_resize_mask(sample.token_mask, target),
        meta=meta,
    )


# ---------------------------------------------------------------------------------------
# Splits


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, np.ndarray]:
    """Split indices into train/val/test with each class in the given proportions.

    Within each class the indices are shuffled by ``numpy.random.default_rng(seed)`` and
    cut at ``round(n * f_val)`` validation and ``round(n * f_test)`` test items; the rest
    train. Returns sorted index arrays under ``"train"``, ``"val"`` and ``"test"``.
    """
    values = [float(f) for f in fractions]
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values):
        raise DataError(f"fractions must be three non-negative numbers, got {fractions!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise DataError(f"fractions must sum to 1, got {fractions!r} (sum {sum(values)})")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        n = len(members)
        n_val = min(round(n * values[1]), n)
        n_test = min(round(n * values[2]), n - n_val)
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {
        name: np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64)
        for name, chunks in parts.items()
    }


# ---------------------------------------------------------------------------------------
# The dataset base class


class ImageDataset(torch.utils.data.Dataset):
    """Base of every loader: labels and splits up front, images loaded on access.

    Subclasses parse their label files when created (raising on any problem there, with
    the file and row) and implement :meth:`_load`, which reads one sample at its native
    size and raises ``ValueError`` naming the file and row when a file is bad. The base
    class resizes (``size``), checks the sample against the dataset and caches
    :meth:`tensors`.

    Attributes
    ----------
    name, classes, spatial_dims, in_channels:
        What the data is: ``classes[k]`` names label ``k``.
    ground_truth:
        ``"mask"``, ``"boxes"``, ``"mask+boxes"`` or ``"none"``.
    labels:
        ``(N,)`` int64 class indices, known without reading any image.
    splits:
        ``(N,)`` object array of ``"train"``/``"val"``/``"test"``, or None where the
        source defines no split (see :meth:`split_indices`).
    ids:
        Sample ids, in order.
    size:
        The spatial size images are resized to on load, or None for the native size.
    root:
        The directory or file the dataset was read from.
    """

    def __init__(
        self,
        *,
        name: str,
        classes: Sequence[str],
        spatial_dims: int,
        in_channels: int,
        ground_truth: str,
        labels: Sequence[int] | np.ndarray,
        ids: Sequence[str],
        splits: Sequence[str] | np.ndarray | None = None,
        size: int | Sequence[int] | None = None,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if ground_truth not in GROUND_TRUTH_KINDS:
            raise DataError(
                f"ground_truth must be one of {', '.join(GROUND_TRUTH_KINDS)}, got {ground_truth!r}"
            )
        self.name = str(name)
        self.classes = tuple(str(c) for c in classes)
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.ground_truth = ground_truth
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.ids = [str(i) for i in ids]
        self.splits = None if splits is None else np.asarray(splits, dtype=object)
        self.size = _normalize_size(size, self.spatial_dims)
        self.root = Path(root) if root is not None else None
        if len(self.ids) != len(self.labels):
            raise DataError(f"{len(self.ids)} ids but {len(self.labels)} labels")
        if self.splits is not None and len(self.splits) != len(self.labels):
            raise DataError(f"{len(self.splits)} split names but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(
                f"labels must lie in 0...{len(self.classes) - 1} for classes {self.classes}"
            )
        self._cache: TensorData | None = None

    # -- to implement ------------------------------------------------------------------

    def _load(self, index: int) -> Sample:
        """Read sample ``index`` at its native size (subclasses implement this)."""
        raise NotImplementedError

    # -- the Dataset protocol ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        i = self._position(index)
        sample = self._load(i)
        self._check_sample(sample, i)
        if self.size is not None:
            sample = resize_sample(
                sample, self.size, boxes_define_mask=self.ground_truth == "boxes"
            )
        return sample

    def __repr__(self) -> str:
        if not hasattr(self, "labels"):  # still being constructed
            return f"<{type(self).__name__} (opening)>"
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, classes={self.classes}, "
            f"spatial_dims={self.spatial_dims}, ground_truth={self.ground_truth!r}, "
            f"root={str(self.root) if self.root else None!r})"
        )

    def _position(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise InputTypeError(f"dataset index must be an integer, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        return i

    def _where(self, index: int, sample: Sample | None = None) -> str:
        """Where sample ``index`` comes from, for error messages: file and row."""
        meta = sample.meta if sample is not None else {}
        row, source = meta.get("row"), meta.get("source")
        if source and row is not None:
            where = f"{Path(source).name} row {row}"
        elif row is not None:
            where = f"sample {index}, row {row}"
        else:
            where = f"sample {index}"
        return f"{where} ({self.ids[index]})"

    def _check_sample(self, sample: Sample, index: int) -> None:
        image = sample.image
        if image.dtype != torch.float32 or image.ndim != self.spatial_dims + 1:
            raise DataError(
                f"{self._where(index, sample)}: image must be float32 (C, *spatial) with "
                f"{self.spatial_dims} spatial axes, got {tuple(image.shape)} {image.dtype}"
            )
        if image.shape[0] != self.in_channels:
            raise DataError(
                f"{self._where(index, sample)}: image has {image.shape[0]} channels, the "
                f"dataset {self.in_channels}"
            )
        if not torch.isfinite(image).all():
            raise DataError(f"{self._where(index, sample)}: image contains NaN or Inf values")
        spatial = tuple(image.shape[1:])
        for what, mask in (("mask", sample.mask), ("token mask", sample.token_mask)):
            if mask is not None and tuple(mask.shape) != spatial:
                raise DataError(
                    f"{self._where(index, sample)}: {what} has shape {tuple(mask.shape)} but "
                    f"the image has {spatial}"
                )

    # -- splits and views ------------------------------------------------------------------

    def split_indices(
        self, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
    ) -> dict[str, np.ndarray]:
        """Indices of the train, val and test samples.

        The source's own split where it has one (``seed`` and ``fractions`` are then
        ignored), else :func:`stratified_split` of the labels.
        """
        if self.splits is not None:
            return {name: np.flatnonzero(self.splits == name) for name in SPLITS}
        return stratified_split(self.labels, seed=seed, fractions=fractions)

    def _indices(self, split: str | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(split, str):
            if split not in SPLITS:
                raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
            return self.split_indices()[split]
        idx = np.asarray(split)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DataError(
                    f"a boolean selection needs {len(self)} entries, got shape {idx.shape}"
                )
            return np.flatnonzero(idx)
        if idx.size == 0:
            return np.zeros(0, np.int64)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise DataError(f"indices must be a 1D sequence of integers, got {split!r}")
        if idx.min() < -len(self) or idx.max() >= len(self):
            raise IndexError(f"indices out of range for a dataset of {len(self)} samples")
        return np.where(idx < 0, idx + len(self), idx).astype(np.int64)

    def subset(self, split: str | Sequence[int] | np.ndarray) -> ImageDataset:
        """A view of some samples: a split by name (see :meth:`split_indices`) or indices."""
        return _Subset(self, self._indices(split), split if isinstance(split, str) else None)

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of samples per split (``"all"`` where there is none) and class index."""
        groups = self.split_indices() if self.splits is not None else {"all": np.arange(len(self))}
        return {
            name: {str(k): int((self.labels[idx] == k).sum()) for k in range(len(self.classes))}
            for name, idx in groups.items()
        }

    # -- in memory ---------------------------------------------------------------------------

    def tensors(
        self,
        split: str | Sequence[int] | np.ndarray | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> TensorData:
        """All samples in memory, loaded once and cached; ``split`` selects some of them.

        ``progress(done, total)`` is called after each loaded sample of the first call.
        Loading stops at the first bad file with its error (file and row named). All
        images must have one shape; open the dataset with ``size=`` otherwise.
        """
        if self._cache is None:
            self._cache = self._load_all(progress)
        if split is None:
            return self._cache
        return self._cache.select(self._indices(split))

    def _load_all(self, progress: Callable[[int, int], None] | None) -> TensorData:
        n = len(self)
        if n == 0:
            raise DataError(f"dataset {self.name!r} has no samples")
        images = masks = tokens = None
        has_mask = torch.zeros(n, dtype=torch.bool)
        boxes: list[list[Box]] = []
        shape: tuple[int, ...] = ()
        for i in range(n):
            sample = self[i]
            if images is None:
                shape = tuple(sample.image.shape)
                images = torch.empty((n, *shape), dtype=torch.float32)
                masks = torch.zeros((n, 1, *shape[1:]), dtype=torch.float32)
            elif tuple(sample.image.shape) != shape:
                raise DataError(
                    f"{self._where(i, sample)}: image shape {tuple(sample.image.shape)} "
                    f"differs from the first image's {shape}; open the dataset with size= "
                    "to resize on load"
                )
            images[i] = sample.image
            if sample.mask is not None:
                masks[i, 0] = sample.mask
                has_mask[i] = True
            if sample.token_mask is not None:
                if tokens is None:
                    tokens = torch.zeros((n, 1, *shape[1:]), dtype=torch.float32)
                tokens[i, 0] = sample.token_mask
            boxes.append(list(sample.boxes))
            if progress is not None:
                progress(i + 1, n)
        assert images is not None and masks is not None
        return TensorData(
            images=images,
            labels=torch.as_tensor(self.labels.copy()),
            masks=masks,
            has_mask=has_mask,
            boxes=boxes,
            ids=list(self.ids),
            token_masks=tokens,
            indices=np.arange(n, dtype=np.int64),
        )


class _Subset(ImageDataset):
    """Some samples of another dataset; shares its files and, once loaded, its tensors."""

    def __init__(self, parent: ImageDataset, indices: np.ndarray, split: str | None) -> None:
        splits = parent.splits[indices] if parent.splits is not None else None
        if splits is None and split is not None:
            splits = np.full(len(indices), split, dtype=object)
        super().__init__(
            name=parent.name,
            classes=parent.classes,
            spatial_dims=parent.spatial_dims,
            in_channels=parent.in_channels,
            ground_truth=parent.ground_truth,
            labels=parent.labels[indices],
            ids=[parent.ids[i] for i in indices],
            splits=splits,
            size=None,  # the parent resizes
            root=parent.root,
        )
        self.size = parent.size
        self.parent = parent
        self.parent_indices = indices

    def __getitem__(self, index: int) -> Sample:
        return self.parent[int(self.parent_indices[self._position(index)])]

    def _load_all(self, progress: Callable[[int, int], None] | None) -> TensorData:
        if self.parent._cache is not None:
            data = self.parent._cache.select(self.parent_indices)
        else:
            data = super()._load_all(progress)
        return replace(data, indices=np.arange(len(self), dtype=np.int64))


# ---------------------------------------------------------------------------------------
# Opening by path or phantom name

_PHANTOM_PARAMS = ("n", "size", "seed", "shortcut", "difficulty", "template")


def _phantoms_module() -> Any:
    # Imported on use: generating phantoms pulls in code that reading data never needs.
    return importlib.import_module("trustmap.data.phantoms")


def dataset_cache_dir(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, **params: Any
) -> Path:
    """Where :func:`open_dataset` keeps the phantom ``name`` generated with ``params``.

    ``<root>/datasets/<name>-<hash>``, with ``<root>`` the ``cache_dir`` argument, else the
    ``TRUSTMAP_CACHE`` environment variable, else ``~/.cache/trustmap``; the hash covers
    the phantom parameters (``n``, ``size``, ``seed``, ``shortcut``, ``difficulty``,
    ``template``; seed 0 unless given) and the generator's ``GENERATOR_VERSION`` if the
    phantom package defines one.
    """
    unknown = sorted(set(params) - set(_PHANTOM_PARAMS))
    if unknown:
        raise InputTypeError(f"unknown phantom parameter(s) {', '.join(unknown)}")
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("TRUSTMAP_CACHE"):
        root = Path(os.environ["TRUSTMAP_CACHE"])
    else:
        root = Path.home() / ".cache" / "trustmap"
    key = {p: params.get(p) for p in _PHANTOM_PARAMS}
    key["seed"] = 0 if key["seed"] is None else key["seed"]
    key["name"] = name
    try:
        key["version"] = getattr(_phantoms_module(), "GENERATOR_VERSION", None)
    except ImportError:
        key["version"] = None
    text = json.dumps(key, sort_keys=True, default=lambda v: list(v))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return root.expanduser() / "datasets" / f"{name}-{digest}"


def _open_phantom(name: str, kwargs: dict[str, Any]) -> ImageDataset:
    from trustmap.data.loaders import FolderDataset

    module = _phantoms_module()
    params = {p: kwargs.pop(p) for p in _PHANTOM_PARAMS if kwargs.get(p) is not None}
    cache_dir = kwargs.pop("cache_dir", None)
    progress = kwargs.pop("progress", None)
    out = dataset_cache_dir(name, cache_dir=cache_dir, **params)
    if not (out / "dataset.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        options = {**params, "seed": params.get("seed", 0)}
        if progress is not None:
            options["progress"] = progress
        if out.exists():
            # A directory without a card is not a finished dataset (the writer renames a
            # complete one into place), so it may be replaced.
            options["overwrite"] = True
        try:
            module.make_dataset(name, out, **options)
        except Exception:
            # Another process may have written the same dataset meanwhile.
            if not (out / "dataset.json").is_file():
                raise
    return FolderDataset(out, **kwargs)


def open_dataset(path_or_name: str | os.PathLike[str], **kwargs: Any) -> ImageDataset:
    """Open a dataset directory or file, or a phantom dataset by name.

    A phantom name (``"cxr-pneumothorax"``, ``"cxr-pneumonia"``, ``"ct-nodule"``,
    ``"mri-brain-3d"``) is generated once with
    :func:`trustmap.data.phantoms.make_dataset` into :func:`dataset_cache_dir` and opened
    from there; ``n``, ``size``, ``seed``, ``shortcut``, ``difficulty``, ``template``,
    ``progress`` and ``cache_dir`` go to the generator, other keywords to
    :class:`~trustmap.data.loaders.FolderDataset`.

    A path is opened by :func:`trustmap.data.loaders.open_path`, which recognises the
    layout: ``dataset.json``/``manifest.csv`` (trustmap layout), ``train-rle.csv``
    (SIIM-ACR), ``stage_2_train_labels.csv`` (RSNA), a ``.npz`` file (MedMNIST),
    ``images/`` + ``masks/`` of NIfTI files (image/mask pairs); ``kind=`` forces one.
    Keywords go to the loader (``size=``, ``intensity=``, ...).

    Raises
    ------
    FileNotFoundError
        If the argument is neither an existing path nor a phantom name.
    ValueError
        For a layout that is not recognised, or bad data (file and row named).
    """
    from trustmap.data.loaders import open_path

    path = Path(path_or_name).expanduser()
    if path.exists():
        return open_path(path, **kwargs)
    name = str(path_or_name)
    try:
        phantoms = tuple(_phantoms_module().PHANTOMS)
    except ImportError:
        phantoms = ()
    if name in phantoms:
        return _open_phantom(name, dict(kwargs))
    known = f"; phantom datasets: {', '.join(phantoms)}" if phantoms else ""
    raise MissingFileError(f"{name!r} is neither an existing path nor a phantom dataset{known}")
