"""Pieces every phantom shares: the case record, seeded streams, labels, splits, geometry.

Randomness
----------
Nothing here touches numpy's global generator. Every random draw comes from a stream
``np.random.default_rng(SeedSequence(seed, spawn_key=(stream, *key)))``: the image stream of
case ``i`` is keyed by ``(IMAGE, i)``, its shortcut token by ``(TOKEN, i)``, so a case can be
regenerated alone from ``(seed, i)`` and the image content does not change when a shortcut
token is added. Labels come in blocks of :data:`LABEL_BLOCK` consecutive indices with a fixed
number of positives per block, so the label of case ``i`` does not depend on how many cases
are generated either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

# Stream identifiers of the seeded generators (first element of the spawn key).
IMAGE, TOKEN, LABEL, SPLIT, BASE = range(5)

#: Labels are assigned in blocks of this many consecutive indices (see module docstring).
LABEL_BLOCK = 20

#: Named difficulty levels; a float works too (larger is harder, 1.0 is the default).
DIFFICULTY_LEVELS: dict[str, float] = {"easy": 0.6, "medium": 1.0, "default": 1.0, "hard": 1.5}

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class PhantomCase:
    """One generated example, in memory.

    Attributes
    ----------
    image
        ``(H, W)`` or ``(D, H, W)``: uint8 for radiographs, int16 Hounsfield units for CT,
        int16 for MRI (arbitrary units, z-scored by the loader).
    label
        0 (negative / benign) or 1 (positive / malignant).
    mask
        bool, same shape as ``image``: the lesion (all False for a negative radiograph).
    boxes
        Bounding boxes of the lesion's parts in pixels: ``(x, y, width, height)`` in 2D
        (x = column of the left edge, y = row of the top edge, RSNA style) and
        ``(x, y, width, height, z, depth)`` in 3D (z = first slice).
    token_mask
        bool mask of the shortcut token, or None without a shortcut.
    lesion_type
        Free text ("apical", "spiculated", "tumour", ...); "" for negatives.
    index
        The case's index, which with the seed determines it.
    token_agrees
        Whether the token sits in the corner of the case's own label (None: no token).
    concepts
        Concept masks for network dissection (Bau et al. 2017), bool, the image's shape:
        the phantom's anatomical concepts (:attr:`PhantomSpec.concepts`), ``lesion`` (the
        mask) and, with a shortcut token, ``marker`` (the token). Drawn from the same
        rendering as the image without any random draw of their own, so adding them
        changed no image.
    """

    image: np.ndarray
    label: int
    mask: np.ndarray
    boxes: list[tuple[int, ...]]
    token_mask: np.ndarray | None
    lesion_type: str
    index: int = 0
    token_agrees: bool | None = None
    concepts: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PhantomSpec:
    """What :mod:`trustmap.data.phantoms` needs to know about one phantom."""

    name: str
    spatial_dims: int
    modality: str
    default_n: int
    default_size: int
    min_size: int
    max_size: int
    prevalence: float
    ground_truth: str
    intensity: dict[str, Any]
    image_suffix: str
    classes: tuple[str, str]
    description: str
    #: ``context(seed, size, difficulty, template) -> object`` shared by all cases of a run.
    context: Callable[..., Any]
    #: ``render(context, rng, label) -> (image_float, mask, boxes, lesion_type, concepts)``
    #: with ``concepts`` a dict of bool masks named as in :attr:`concepts`.
    render: Callable[..., tuple[np.ndarray, np.ndarray, list, str, dict[str, np.ndarray]]]
    #: ``finish(context, image_float, token_mask) -> stored array`` (token burned in, cast).
    finish: Callable[..., np.ndarray]
    #: Token values ``(background, letter)`` in the float image's units.
    token_values: tuple[float, float]
    #: Pixel/voxel spacing in mm for a given size (None: unknown, e.g. radiographs).
    spacing: Callable[[tuple[int, ...]], tuple[float, ...] | None] = lambda size: None
    #: Anatomical concept masks the renderer emits (``lesion`` and ``marker`` come on top).
    concepts: tuple[str, ...] = ()
    extra_card: dict[str, Any] = field(default_factory=dict)


def stream(seed: int, kind: int, *key: int) -> np.random.Generator:
    """The seeded generator of stream ``kind`` for ``key`` (e.g. the case index)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(kind, *key)))


def label_of(seed: int, index: int, prevalence: float) -> int:
    """Label of case ``index``: each block of :data:`LABEL_BLOCK` holds a fixed number of
    positives at seeded positions, so prevalence is exact per block and independent of n."""
    block, pos = divmod(index, LABEL_BLOCK)
    k = round(prevalence * LABEL_BLOCK)
    order = stream(seed, LABEL, block).permutation(LABEL_BLOCK)
    return int(pos in set(order[:k].tolist()))


def labels_for(seed: int, n: int, prevalence: float) -> np.ndarray:
    """Labels of cases ``0..n-1`` (int64)."""
    k = round(prevalence * LABEL_BLOCK)
    out = np.zeros(math.ceil(n / LABEL_BLOCK) * LABEL_BLOCK, dtype=np.int64)
    for block in range(len(out) // LABEL_BLOCK):
        order = stream(seed, LABEL, block).permutation(LABEL_BLOCK)
        out[block * LABEL_BLOCK + order[:k]] = 1
    return out[:n]


def split_counts(m: int) -> tuple[int, int, int] | None:
    """(train, val, test) sizes for ``m`` cases of one class, or None if too few."""
    n_val = max(1, round(SPLIT_FRACTIONS[1] * m))
    n_test = max(1, round(SPLIT_FRACTIONS[2] * m))
    n_train = m - n_val - n_test
    if n_train < 1:
        return None
    return n_train, n_val, n_test


def assign_splits(seed: int, labels: np.ndarray) -> np.ndarray:
    """Seeded 80/10/10 split, stratified by class; every split holds every class.

    Raises
    ------
    ValueError
        If a class has fewer than three cases.
    """
    splits = np.empty(len(labels), dtype=object)
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        counts = split_counts(len(idx))
        if counts is None:
            raise ValueError(
                f"n={len(labels)} is too small: class {cls} has {len(idx)} cases, and every "
                "split (train/val/test) needs at least one case of each class"
            )
        n_train, n_val, _ = counts
        perm = idx[stream(seed, SPLIT, cls).permutation(len(idx))]
        splits[perm[:n_train]] = "train"
        splits[perm[n_train : n_train + n_val]] = "val"
        splits[perm[n_train + n_val :]] = "test"
    return splits


def min_n(prevalence: float) -> int:
    """Smallest n whose 80/10/10 split holds both classes in every split (any seed)."""
    n = 1
    while True:
        # The number of positives among the first n indices depends on the seed within
        # a partial block; the bound uses the worst case.
        full, rest = divmod(n, LABEL_BLOCK)
        k = round(prevalence * LABEL_BLOCK)
        pos_lo = full * k + max(0, rest - (LABEL_BLOCK - k))
        neg_lo = full * (LABEL_BLOCK - k) + max(0, rest - k)
        if split_counts(pos_lo) and split_counts(neg_lo):
            return n
        n += 1


def resolve_difficulty(difficulty: float | str | None) -> float:
    """Difficulty as a positive float (None: 1.0); named levels in DIFFICULTY_LEVELS."""
    if difficulty is None:
        return 1.0
    if isinstance(difficulty, str):
        key = difficulty.strip().lower()
        if key in DIFFICULTY_LEVELS:
            return DIFFICULTY_LEVELS[key]
        try:
            difficulty = float(key)
        except ValueError:
            raise ValueError(
                f"difficulty {difficulty!r} is not a number or one of {sorted(DIFFICULTY_LEVELS)}"
            ) from None
    if isinstance(difficulty, bool) or not isinstance(difficulty, int | float):
        raise ValueError(f"difficulty must be a number or a level name, got {difficulty!r}")
    value = float(difficulty)
    if not math.isfinite(value) or not 0.2 <= value <= 5.0:
        raise ValueError(f"difficulty must lie in [0.2, 5] (1.0 = default), got {difficulty!r}")
    return value


def resolve_shortcut(shortcut: float | None) -> float | None:
    """Check the shortcut agreement probability (None: no token)."""
    if shortcut is None:
        return None
    if isinstance(shortcut, bool) or not isinstance(shortcut, int | float):
        raise ValueError(f"shortcut must be a probability in [0, 1] or None, got {shortcut!r}")
    value = float(shortcut)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"shortcut must be a probability in [0, 1], got {shortcut!r}")
    return value


def resolve_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def resolve_size(spec: PhantomSpec, size: int | Sequence[int] | None) -> tuple[int, ...]:
    """``size`` as a shape tuple of ``spec.spatial_dims`` ints within the phantom's bounds."""
    dims = spec.spatial_dims
    if size is None:
        return (spec.default_size,) * dims
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        shape = (int(size),) * dims
    else:
        try:
            shape = tuple(int(s) for s in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or {dims} ints, got {size!r}") from None
        if len(shape) != dims:
            raise ValueError(f"{spec.name} is {dims}D: size needs {dims} ints, got {size!r}")
    for s in shape:
        if s < spec.min_size:
            raise ValueError(
                f"size {size!r} is too small for {spec.name}: at least {spec.min_size} per axis"
            )
        if s > spec.max_size:
            raise ValueError(
                f"size {size!r} is too large for {spec.name}: at most {spec.max_size} per axis"
            )
    return shape


# ---------------------------------------------------------------------------------------
# Geometry helpers (vectorised; no per-pixel Python loops)


def fill_polygon(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside the closed polygon (even-odd rule), as bool (H, W).

    A scanline fill: each edge toggles the parity from the first pixel centre right of
    its crossing with a row, and a cumulative sum along the row gives inside/outside.
    Cost O(rows x edges + H x W), unlike a point-in-polygon test per pixel.
    """
    h, w = shape
    y0, x0 = rows, cols
    y1, x1 = np.roll(rows, -1), np.roll(cols, -1)
    r = np.arange(h, dtype=np.float64)[:, None]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Half-open [lo, hi) so a vertex on a row is counted once.
    hit = (r >= lo) & (r < hi)
    ri, ei = np.nonzero(hit)
    dy = y1[ei] - y0[ei]
    x = x0[ei] + (ri - y0[ei]) * (x1[ei] - x0[ei]) / dy
    col = np.clip(np.floor(x).astype(np.int64) + 1, 0, w)
    toggles = np.bincount(ri * (w + 1) + col, minlength=h * (w + 1)).reshape(h, w + 1)
    return (np.cumsum(toggles[:, :w], axis=1) & 1).astype(bool)


def chaikin(points: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon ``(N, 2)``."""
    p = points
    for _ in range(iterations):
        q = np.roll(p, -1, axis=0)
        p = np.stack([0.75 * p + 0.25 * q, 0.25 * p + 0.75 * q], axis=1).reshape(-1, 2)
    return p


def splat(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Bilinearly deposit point ``weights`` at (row, col) positions into a float32 image."""
    h, w = shape
    r0 = np.floor(rows).astype(np.int64)
    c0 = np.floor(cols).astype(np.int64)
    fr, fc = rows - r0, cols - c0
    rr = np.concatenate([r0, r0, r0 + 1, r0 + 1])
    cc = np.concatenate([c0, c0 + 1, c0, c0 + 1])
    wt = np.concatenate([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc]) * np.tile(
        weights, 4
    )
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    out = np.bincount(rr[ok] * w + cc[ok], weights=wt[ok], minlength=h * w)
    return out.reshape(h, w).astype(np.float32)


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float, *, dtype=np.float32
) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(dtype), sigma, mode="wrap")
    return field_ / max(float(field_.std()), 1e-6)


def cosine_field(
    rng: np.random.Generator, shape: tuple[int, ...], order: int, amplitude: float
) -> np.ndarray:
    """A smooth random field: a sum of low-order cosine modes per axis (separable basis).

    Orders up to ``order`` per axis; coefficients N(0, amplitude / (1 + |k|)) so the
    field is dominated by its lowest frequencies.
    """
    coef_shape = (order + 1,) * len(shape)
    k = np.indices(coef_shape).sum(axis=0)
    coef = rng.standard_normal(coef_shape) * amplitude / (1.0 + k)
    out = coef
    for n in shape:
        t = (np.arange(n) + 0.5) / n
        basis = np.cos(np.pi * np.arange(order + 1)[:, None] * t[None, :])  # (order+1, n)
        # Contracts the leading coefficient axis and appends the spatial one, so after
        # every axis the result has ``shape`` in order.
        out = np.tensordot(out, basis, axes=([0], [0]))
    return out.astype(np.float32)


def bbox(mask: np.ndarray) -> tuple[int, ...] | None:
    """Bounding box of a non-empty mask: ``(x, y, w, h)`` in 2D, ``(x, y, w, h, z, d)`` in 3D."""
    if not mask.any():
        return None
    spans = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        spans.append((int(hits[0]), int(hits[-1] - hits[0] + 1)))
    if mask.ndim == 2:
        (y, h), (x, w) = spans
        return (x, y, w, h)
    (z, d), (y, h), (x, w) = spans
    return (x, y, w, h, z, d)


def component_boxes(mask: np.ndarray, min_size: int = 1) -> list[tuple[int, ...]]:
    """One bounding box per connected component of ``mask`` (components of fewer than
    ``min_size`` pixels are dropped), ordered by position."""
    labelled, _ = ndimage.label(mask)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labelled), start=1):
        if sl is None:
            continue
        comp = labelled[sl] == i
        if comp.sum() < min_size:
            continue
        starts = [s.start for s in sl]
        stops = [s.stop for s in sl]
        if mask.ndim == 2:
            boxes.append((starts[1], starts[0], stops[1] - starts[1], stops[0] - starts[0]))
        else:
            boxes.append(
                (
                    starts[2],
                    starts[1],
                    stops[2] - starts[2],
                    stops[1] - starts[1],
                    starts[0],
                    stops[0] - starts[0],
                )
            )
    return sorted(boxes)
