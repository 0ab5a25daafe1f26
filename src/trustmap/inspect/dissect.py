"""Network dissection (Bau et al. 2017) and the DeepMiner table (Wu et al. 2018; Huff et
al. 2021, section 4.2).

Network dissection labels each unit (channel) of a layer with the concept its activation
matches best. Per unit ``k``, the threshold ``T_k`` is the top-``quantile`` value of its
activations over the whole dataset (``P(a_k > T_k) = 0.005`` in Bau et al.); each
activation map is upsampled bilinearly to the concept masks' resolution and thresholded,
``M_k = up(a_k) > T_k``, and scored against every concept ``c`` by the dataset-wide

    IoU_{k,c} = sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|.

A unit is labelled with its best concept when that IoU reaches ``iou_threshold`` (0.04
in Bau et al.). The model runs once over the data (activations cached at the layer's
resolution, which is small), the thresholds come from one top-k per unit, and the
intersections are accumulated over the fired pixels only, for all units at once, and
only for the (image, unit) pairs whose map can exceed the threshold at all (bilinear
interpolation never exceeds the largest neighbouring activation): no loop over units or
images.

DeepMiner ranks the units that most influence the class score and shows them with their
concept and example crops; here the influence of unit ``k`` is the mean over images of
``sum_s dS_c/dA_{k,s} * A_{k,s}`` (gradient times activation, one backward pass per
batch).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustmap.errors import DataError, InputError, MissingFileError
from trustmap.inspect.activations import (
    as_images,
    extract,
    iter_activations,
    require_spatial,
)

__all__ = [
    "ConceptMasks",
    "Dissection",
    "InfluenceRow",
    "InfluenceTable",
    "concept_masks",
    "dissect",
    "influential_units",
    "load_concepts",
]


@dataclass(frozen=True)
class ConceptMasks:
    """Concept masks of a dataset: ``masks`` ``(N, C, *spatial)`` bool for the concepts
    ``names``, aligned with the dataset's images."""

    names: tuple[str, ...]
    masks: torch.Tensor
    source: str = ""

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @functools.cached_property
    def codes(self) -> tuple[torch.Tensor, ...]:
        """The masks packed 8 concepts to a byte: per group of 8, ``(N * S,)`` uint8 with
        bit ``j`` set where concept ``8 g + j`` is present."""
        flat = self.masks.flatten(2)  # (N, C, S)
        out = []
        for first in range(0, flat.shape[1], 8):
            code = torch.zeros(flat.shape[0], flat.shape[2], dtype=torch.uint8)
            for bit, c in enumerate(range(first, min(first + 8, flat.shape[1]))):
                code |= flat[:, c].to(torch.uint8) << bit
            out.append(code.flatten())
        return tuple(out)

    @functools.cached_property
    def area(self) -> torch.Tensor:
        """Pixels of each concept summed over all images ``(C,)``, float64."""
        return torch.count_nonzero(self.masks.flatten(2), dim=(0, 2)).double()


# _HAS_BIT[j]: the byte values (0-255) with bit j set.
_HAS_BIT = [torch.tensor([v for v in range(256) if v >> j & 1]) for j in range(8)]


def concept_masks(masks: Mapping[str, Any], *, source: str = "arrays") -> ConceptMasks:
    """Concept masks from arrays: ``{name: (N, *spatial)}`` (bool, or 0/1 values)."""
    if not isinstance(masks, Mapping) or not masks:
        raise InputError("concept masks must be a non-empty mapping {name: (N, *spatial) array}")
    names, stack, shape = [], [], None
    for name, value in masks.items():
        t = torch.as_tensor(np.asarray(value))
        if shape is None:
            shape = tuple(t.shape)
        if tuple(t.shape) != shape:
            raise InputError(
                f"concept {name!r} has shape {tuple(t.shape)}, the first concept {shape}; all "
                "concept masks must have the images' (N, *spatial) shape"
            )
        if t.dtype != torch.bool:
            if not bool(((t == 0) | (t == 1)).all()):
                raise InputError(f"concept {name!r} must be boolean or hold only 0 and 1")
            t = t.bool()
        names.append(str(name))
        stack.append(t)
    return ConceptMasks(names=tuple(names), masks=torch.stack(stack, 1), source=source)


def load_concepts(
    dataset: Any,
    *,
    names: Sequence[str] | None = None,
    folder: str | os.PathLike[str] | None = None,
    size: int | Sequence[int] | None = None,
) -> ConceptMasks:
    """The concept masks of a dataset folder, aligned with its images.

    ``folder`` (default ``<dataset root>/concepts``, which the phantoms write) holds one
    folder per concept and in it one mask per image, named by the image's id (``00042.png``
    or ``.nii.gz``/``.npy``); a missing file is an empty mask. Masks are resized (nearest) to
    ``size`` (default: the dataset's image size), so they line up with the images the model
    sees. A mask whose shape differs from its image's raises a ValueError naming the file.

    Parameters
    ----------
    dataset
        An :class:`~trustmap.data.ImageDataset` with a ``root`` (or a dataset directory).
    names
        The concepts to load (default: every folder, sorted; for a phantom, in the order of
        its card).
    """
    from trustmap.data import open_dataset
    from trustmap.data.io import load

    ds = open_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    root = getattr(ds, "root", None)
    base = Path(folder) if folder is not None else (Path(root) / "concepts" if root else None)
    if base is None or not base.is_dir():
        raise MissingFileError(
            f"no concept folder {base}: pass folder= with one sub-folder of masks per concept "
            "(phantom datasets write <dataset>/concepts)"
        )
    available = sorted(p.name for p in base.iterdir() if p.is_dir())
    if names is None:
        card = Path(root) / "dataset.json" if root else None
        names = available
        if card is not None and card.is_file():
            import json

            listed = (json.loads(card.read_text()).get("concepts") or {}).get("names")
            if listed and folder is None:
                names = [n for n in listed if n in available]
    names = list(names)
    if not names:
        raise InputError(f"the concept folder {base} has no concept sub-folders")
    for name in names:
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(f"no concept {name!r} in {base}{hint} (concepts: {available})")
    images = as_images(ds)
    native = tuple(images.shape[2:])
    resizes = getattr(ds, "size", None) is not None
    ids = sample_ids = list(ds.ids)
    out = torch.zeros((len(ids), len(names), *native), dtype=torch.bool)
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    for c, name in enumerate(names):
        for path in (base / name).iterdir():
            stem = path.name.split(".")[0]
            i = position.get(stem)
            if i is None:
                continue
            mask = np.squeeze(np.asarray(load(path).array))
            if mask.shape != native:
                if resizes and mask.ndim == len(native):
                    # The dataset resizes its images on load: resize the masks alike.
                    mask = _resize_masks(torch.from_numpy(mask > 0)[None, None], native)[0, 0]
                    mask = mask.numpy()
                else:
                    raise DataError(
                        f"concept mask {path} has shape {mask.shape} but its image "
                        f"{sample_ids[i]!r} has {native}; a concept mask must have its "
                        "image's shape"
                    )
            out[i, c] = torch.from_numpy(mask > 0)
    if size is not None:
        target = (size,) * len(native) if isinstance(size, int) else tuple(size)
        out = _resize_masks(out, target)
    return ConceptMasks(names=tuple(names), masks=out, source=str(base))


def _resize_masks(masks: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(masks.shape[2:]) == tuple(size):
        return masks
    n, c = masks.shape[:2]
    flat = masks.reshape(n * c, 1, *masks.shape[2:]).float()
    # "nearest-exact" samples at pixel centres, as the training resizes lesion masks.
    return F.interpolate(flat, size=size, mode="nearest-exact").reshape(n, c, *size) > 0.5


@dataclass(frozen=True)
class Dissection:
    """Result of :func:`dissect` for one layer.

    ``iou`` ``(U, C)`` for ``U`` units and the ``C`` concepts ``concepts``; ``labels[k]``
    the best concept of unit ``k`` if its IoU reaches ``iou_threshold``, else None;
    ``thresholds`` the ``T_k``; ``top_images[k]`` the images where unit ``k`` peaks
    highest (most first).
    """

    layer: str
    concepts: tuple[str, ...]
    iou: np.ndarray
    thresholds: np.ndarray
    labels: tuple[str | None, ...]
    best_iou: np.ndarray
    quantile: float
    iou_threshold: float
    n_images: int
    resolution: tuple[int, ...]
    top_images: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def units(self) -> int:
        return int(self.iou.shape[0])

    def units_for(self, concept: str) -> np.ndarray:
        """Units labelled ``concept``, highest IoU first."""
        idx = np.array([k for k, lab in enumerate(self.labels) if lab == concept], dtype=int)
        return idx[np.argsort(-self.best_iou[idx], kind="stable")] if idx.size else idx

    def counts(self) -> dict[str, int]:
        return {c: int(sum(lab == c for lab in self.labels)) for c in self.concepts}

    def to_dict(self) -> dict[str, Any]:
        best = {
            c: (
                {
                    "unit": int(np.argmax(self.iou[:, j])),
                    "iou": float(self.iou[:, j].max()),
                }
                if self.units
                else None
            )
            for j, c in enumerate(self.concepts)
        }
        return {
            "layer": self.layer,
            "concepts": list(self.concepts),
            "units": self.units,
            "quantile": self.quantile,
            "iou_threshold": self.iou_threshold,
            "n_images": self.n_images,
            "resolution": list(self.resolution),
            "labelled_units": self.counts(),
            "best_unit_per_concept": best,
            "unit_labels": [
                {
                    "unit": k,
                    "label": self.labels[k],
                    "iou": float(self.best_iou[k]),
                    "threshold": float(self.thresholds[k]),
                    "iou_per_concept": {
                        c: float(self.iou[k, j]) for j, c in enumerate(self.concepts)
                    },
                }
                for k in range(self.units)
            ],
            "seconds": self.seconds,
        }


def _linear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of linear interpolation as ``F.interpolate(...,
    align_corners=False)`` computes it: output ``i`` reads source ``max((i + 0.5) n_in /
    n_out - 0.5, 0)`` between samples ``lo = floor(.)`` and ``min(lo + 1, n_in - 1)``."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    w.index_put_((rows, lo), 1 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w


def _contract(blocks: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Apply ``weights[a]`` ``(out_a, in_a)`` along spatial axis ``a`` of ``(K, *in)``."""
    out = blocks @ weights[-1].T
    k = out.shape[0]
    for axis in range(len(weights) - 2, -1, -1):
        lead = out.shape[1 : axis + 1]
        rest = out.shape[axis + 2 :]
        flat = out.reshape(k, *lead, out.shape[axis + 1], -1)
        out = (weights[axis] @ flat).reshape(k, *lead, weights[axis].shape[0], *rest)
    return out


def _fired_pixels(
    maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels where the bilinear (trilinear) upsampling of each map ``(P, *s)`` to
    ``size`` exceeds its threshold, as ``(map index, flat pixel index)``; the values are
    those of ``F.interpolate(..., align_corners=False)`` up to rounding.

    With an integer scale factor ``f`` per axis the output is a grid of cells of ``f``
    pixels per axis between neighbouring samples (the edges, which repeat the border
    sample, too): every pixel of a cell is the same fixed combination of the cell's
    ``2^d`` corner samples, so all the pixels of many cells are one matrix product
    ``(cells, 2^d) @ (2^d, f^d)``. A pixel is a convex combination of its corners, so only
    cells with a corner above the threshold can fire, and only those are interpolated.
    Other scale factors upsample every map whole.
    """
    _, *shape = maps.shape
    shape = tuple(shape)
    rank = len(shape)
    if any(n_out % n_in for n_in, n_out in zip(shape, size)):
        return _fired_dense(maps, thresholds, size)
    factors = [n_out // n_in for n_in, n_out in zip(shape, size)]
    # Cell c (-1 .. n-1 per axis) covers outputs c f + o .. (c + 1) f + o - 1 with
    # o = ceil((f - 1) / 2); its corners are samples c and c + 1 of the map padded by one
    # replicated sample at each end, and output j of the cell has weight frac_j on c + 1.
    offsets = [math.ceil((f - 1) / 2) for f in factors]
    axis_weights = []
    for f, o in zip(factors, offsets):
        frac = (torch.arange(f, dtype=torch.float64) + o + 0.5) / f - 0.5
        axis_weights.append(torch.stack([1 - frac, frac], 0))  # (2, f)
    # (2^d, f^d): weight of each corner (bits: upper sample per axis) on each cell pixel.
    weights = axis_weights[0]
    for w in axis_weights[1:]:
        weights = (weights[:, None, :, None] * w[None, :, None, :]).reshape(
            weights.shape[0] * 2, -1
        )
    weights = weights.to(maps.dtype)
    padded = F.pad(maps[:, None], [1, 1] * rank, mode="replicate")[:, 0]
    corner_max = padded
    for axis in range(1, rank + 1):
        n = corner_max.shape[axis]
        corner_max = torch.maximum(
            corner_max.narrow(axis, 0, n - 1), corner_max.narrow(axis, 1, n - 1)
        )
    active = corner_max > thresholds.view(-1, *([1] * rank))
    which, cell = torch.nonzero(active.flatten(1), as_tuple=True)
    # Flat offsets of the 2^d corners of a cell in the flattened padded map.
    padded_shape = padded.shape[1:]
    pad_strides = [math.prod(padded_shape[a + 1 :]) for a in range(rank)]
    cell_grid = corner_max.shape[1:]
    cell_strides = [math.prod(cell_grid[a + 1 :]) for a in range(rank)]
    base = torch.zeros_like(cell)
    rest = cell
    for a in range(rank):
        coord = torch.div(rest, cell_strides[a], rounding_mode="floor")
        rest = rest - coord * cell_strides[a]
        base += coord * pad_strides[a]
    corner_offsets = torch.tensor(
        [
            sum(((bits >> (rank - 1 - a)) & 1) * pad_strides[a] for a in range(rank))
            for bits in range(2**rank)
        ]
    )
    flat_padded = padded.reshape(padded.shape[0], -1)
    corners = flat_padded[which[:, None], base[:, None] + corner_offsets]  # (cells, 2^d)
    # Within a cell the upsampled map is multilinear in the pixel's fractions, so its
    # largest value is at one of the cell's 2^d extreme pixels: keep the cells where one
    # of those fires (exactly the cells with a pixel above the threshold).
    extreme_pixels = torch.tensor(
        [
            sum(
                (factors[a] - 1 if (e >> (rank - 1 - a)) & 1 else 0) * math.prod(factors[a + 1 :])
                for a in range(rank)
            )
            for e in range(2**rank)
        ]
    )
    peak = (corners @ weights[:, extreme_pixels]).amax(1)
    keep = peak > thresholds[which]
    which, cell, corners = which[keep], cell[keep], corners[keep]
    # The flat output pixel of each (cell, pixel of the cell), -1 outside the output.
    table = _cell_pixel_table(tuple(cell_grid), tuple(factors), tuple(offsets), tuple(size))
    found_map, found_pixel = [], []
    chunk = max(1, 2**21 // weights.shape[1])
    for start in range(0, len(which), chunk):
        w_idx = which[start : start + chunk]
        values = corners[start : start + chunk] @ weights  # (cells, f^d)
        hit_cell, hit_pixel = torch.nonzero(values > thresholds[w_idx, None], as_tuple=True)
        pixel = table[cell[start + hit_cell], hit_pixel]
        inside = pixel >= 0
        found_map.append(w_idx[hit_cell[inside]])
        found_pixel.append(pixel[inside])
    if not found_map:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(found_map), torch.cat(found_pixel)


@functools.lru_cache(maxsize=16)
def _cell_pixel_table(
    cell_grid: tuple[int, ...],
    factors: tuple[int, ...] | list[int],
    offsets: tuple[int, ...] | list[int],
    size: tuple[int, ...],
) -> torch.Tensor:
    """``(cells, f^d)``: the flat output index of each pixel of each cell (cells and their
    pixels in row-major order), -1 where the pixel lies outside the output."""
    rank = len(cell_grid)
    grids = torch.meshgrid(*[torch.arange(n) for n in cell_grid], indexing="ij")
    within = torch.meshgrid(*[torch.arange(f) for f in factors], indexing="ij")
    flat = torch.zeros(math.prod(cell_grid), math.prod(factors), dtype=torch.long)
    inside = torch.ones_like(flat, dtype=torch.bool)
    for a in range(rank):
        coord = (grids[a].reshape(-1, 1) - 1) * factors[a] + offsets[a] + within[a].reshape(1, -1)
        inside &= (coord >= 0) & (coord < size[a])
        flat = flat * size[a] + coord
    return torch.where(inside, flat, torch.full_like(flat, -1))


def _fired_dense(
    maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fired_pixels` by upsampling every map whole (any scale factor)."""
    shape = tuple(maps.shape[1:])
    weights = [_linear_weights(a, b).to(maps.dtype) for a, b in zip(shape, size)]
    chunk = max(1, 2**22 // math.prod(size))
    found_map, found_pixel = [], []
    for start in range(0, maps.shape[0], chunk):
        up = _contract(maps[start : start + chunk], weights).flatten(1)
        part, pixel = torch.nonzero(up > thresholds[start : start + chunk, None], as_tuple=True)
        found_map.append(part + start)
        found_pixel.append(pixel)
    if not found_map:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(found_map), torch.cat(found_pixel)


def _as_concepts(concepts: ConceptMasks | Mapping[str, Any], n: int) -> ConceptMasks:
    cm = concepts if isinstance(concepts, ConceptMasks) else concept_masks(concepts)
    if cm.masks.shape[0] != n:
        raise InputError(
            f"the concept masks cover {cm.masks.shape[0]} images but the data has {n}; they "
            "must be aligned one to one"
        )
    if cm.masks.dtype != torch.bool:
        raise InputError("concept masks must be boolean")
    return cm


def dissect(
    model: nn.Module,
    data: Any,
    concepts: ConceptMasks | Mapping[str, Any],
    *,
    layer: str,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    batch_size: int = 64,
    n_top: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Dissection:
    """Network dissection of every unit of ``layer`` against ``concepts`` (see module).

    Parameters
    ----------
    data
        Images ``(N, C, *spatial)``, a TensorData or an ImageDataset.
    concepts
        :class:`ConceptMasks` aligned with ``data`` (:func:`load_concepts`), or
        ``{name: (N, *spatial)}`` arrays. Their spatial size is the resolution the
        activations are upsampled to (the images' size, or any other).
    quantile
        Share of each unit's activations above its threshold (0.005 in Bau et al.).
    iou_threshold
        Minimum IoU for a unit to be labelled with its best concept (0.04 in Bau et al.).
    n_top
        Images kept per unit in ``top_images``.

    Raises
    ------
    ValueError
        A layer that does not exist (closest names suggested), a layer without spatial
        output, concept masks not aligned with the data, an empty concept, or a
        ``quantile`` outside (0, 1).
    """
    images = as_images(data)
    n = images.shape[0]
    cm = _as_concepts(concepts, n)
    if not 0 < quantile < 1:
        raise InputError(f"quantile must lie in (0, 1), got {quantile!r}")
    if not 0 <= iou_threshold <= 1:
        raise InputError(f"iou_threshold must lie in [0, 1], got {iou_threshold!r}")
    resolution = tuple(cm.masks.shape[2:])
    if len(resolution) != images.ndim - 2:
        raise InputError(
            f"concept masks have {len(resolution)} spatial axes but the images {images.ndim - 2}"
        )
    area = cm.area
    empty = [name for name, a in zip(cm.names, area) if a == 0]
    if empty:
        raise InputError(f"concept(s) {empty} are empty on every image; remove them")
    started = time.perf_counter()
    # The only pass over the data, up to the layer: activations at its (small) resolution.
    acts = extract(model, images, [layer], batch_size=batch_size, outputs=False, progress=progress)[
        layer
    ]
    require_spatial(layer, acts, images, "network dissection")
    passed = time.perf_counter()
    units = acts.shape[1]
    per_unit = acts.transpose(0, 1).reshape(units, -1)
    k = max(1, math.ceil(quantile * per_unit.shape[1]))
    thresholds = per_unit.topk(k, dim=1).values[:, -1].contiguous()
    peaks = acts.flatten(2).amax(2)  # (N, U)
    inter = torch.zeros(units, len(cm.names), dtype=torch.float64)
    unit_area = torch.zeros(units, dtype=torch.float64)
    candidates = peaks > thresholds[None]
    b_idx, u_idx = torch.nonzero(candidates, as_tuple=True)
    pair, pixel = _fired_pixels(acts[b_idx, u_idx], thresholds[u_idx], resolution)
    # Every fired pixel (few: a unit is above its threshold at a small share of the
    # positions) adds its image's concept labels at that pixel to its unit's row.
    unit = u_idx[pair]
    unit_area += torch.bincount(unit, minlength=units).double()
    # Each pixel's concepts are packed into one byte per 8 concepts: one gather and one
    # histogram of (unit, byte) per group instead of a gather per concept.
    where = b_idx[pair] * math.prod(resolution) + pixel
    for group, codes in enumerate(cm.codes):
        hist = torch.bincount(unit * 256 + codes[where].long(), minlength=units * 256)
        hist = hist.view(units, 256).double()
        first = 8 * group
        for bit in range(min(8, len(cm.names) - first)):
            inter[:, first + bit] = hist[:, _HAS_BIT[bit]].sum(1)
    union = unit_area[:, None] + area[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter)).numpy()
    best = iou.argmax(1) if len(cm.names) else np.zeros(units, int)
    best_iou = iou[np.arange(units), best]
    labels = tuple(
        cm.names[best[u]] if best_iou[u] >= iou_threshold and best_iou[u] > 0 else None
        for u in range(units)
    )
    top = torch.argsort(peaks, dim=0, descending=True)[: min(n_top, n)].T.numpy()
    done = time.perf_counter()
    return Dissection(
        layer=layer,
        concepts=cm.names,
        iou=iou,
        thresholds=thresholds.numpy(),
        labels=labels,
        best_iou=best_iou,
        quantile=float(quantile),
        iou_threshold=float(iou_threshold),
        n_images=n,
        resolution=resolution,
        top_images=top,
        seconds={"forward": passed - started, "iou": done - passed, "total": done - started},
    )


@dataclass(frozen=True)
class InfluenceRow:
    """One influential unit: its ``influence`` on the class score (mean gradient x
    activation), its dissection ``concept`` and ``iou`` (None without dissection), the
    ``images`` where it peaks highest and a ``crops`` ``(n, C, *crop)`` around each peak."""

    unit: int
    influence: float
    concept: str | None
    iou: float | None
    images: np.ndarray
    crops: np.ndarray


@dataclass(frozen=True)
class InfluenceTable:
    """The DeepMiner-like table: units of ``layer`` ranked by influence on ``target``."""

    layer: str
    target: int
    rows: tuple[InfluenceRow, ...]
    influence: np.ndarray
    n_images: int

    def to_dict(self, ids: Sequence[str] | None = None) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "target": self.target,
            "n_images": self.n_images,
            "rows": [
                {
                    "rank": r + 1,
                    "unit": row.unit,
                    "influence": row.influence,
                    "concept": row.concept,
                    "iou": row.iou,
                    "images": [ids[i] if ids is not None else int(i) for i in row.images],
                }
                for r, row in enumerate(self.rows)
            ],
        }


def influential_units(
    model: nn.Module,
    data: Any,
    *,
    layer: str,
    target: int = 1,
    dissection: Dissection | None = None,
    top: int = 10,
    n_examples: int = 4,
    crop: int = 32,
    batch_size: int = 32,
    indices: Sequence[int] | np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> InfluenceTable:
    """Units of ``layer`` ranked by their influence on the score of class ``target``
    (mean over the images of ``sum_s dS/dA_s * A_s``), with their dissection label and
    example crops (``crop`` pixels per axis around each of the ``n_examples`` highest
    peaks). ``indices`` restricts the images (e.g. the positives)."""
    images = as_images(data)
    if dissection is not None and dissection.layer != layer:
        raise InputError(f"the dissection is of layer {dissection.layer!r}, not {layer!r}")
    total: torch.Tensor | None = None
    peaks: list[torch.Tensor] = []
    where: list[torch.Tensor] = []
    order: list[np.ndarray] = []
    count = 0
    for batch in iter_activations(
        model, images, [layer], batch_size=batch_size, indices=indices, grad=True,
        progress=progress,
    ):  # fmt: skip
        act = batch.activations[layer]
        require_spatial(layer, act, images, "ranking units by influence")
        out = batch.outputs.reshape(batch.outputs.shape[0], -1)
        if not 0 <= target < out.shape[1]:
            raise InputError(f"target {target} is not an output of this model ({out.shape[1]})")
        (grad,) = torch.autograd.grad(out[:, target].sum(), act)
        contrib = (grad * act).detach().flatten(2).sum(2)  # (B, U)
        total = contrib.sum(0) if total is None else total + contrib.sum(0)
        flat = act.detach().flatten(2)
        value, pos = flat.max(2)
        peaks.append(value.cpu())
        where.append(pos.cpu())
        order.append(batch.index)
        count += act.shape[0]
    assert total is not None
    influence = (total / count).cpu().numpy().astype(np.float64)
    peak = torch.cat(peaks)
    position = torch.cat(where)
    index = np.concatenate(order)
    layer_shape = tuple(act.shape[2:])
    rank = np.argsort(-influence, kind="stable")[: min(top, len(influence))]
    rows = []
    for unit in rank:
        best = torch.argsort(peak[:, unit], descending=True)[:n_examples].numpy()
        crops = np.stack(
            [_crop(images[index[b]], int(position[b, unit]), layer_shape, crop) for b in best]
        )
        concept = iou = None
        if dissection is not None:
            concept = dissection.labels[unit]
            iou = float(dissection.best_iou[unit])
        rows.append(
            InfluenceRow(
                unit=int(unit),
                influence=float(influence[unit]),
                concept=concept,
                iou=iou,
                images=index[best],
                crops=crops,
            )
        )
    return InfluenceTable(
        layer=layer, target=int(target), rows=tuple(rows), influence=influence, n_images=count
    )


def _crop(
    image: torch.Tensor, flat_pos: int, layer_shape: tuple[int, ...], size: int
) -> np.ndarray:
    """A ``size``-wide window of ``image`` ``(C, *S)`` centred on the input position of
    the layer position ``flat_pos`` (clamped inside the image)."""
    spatial = tuple(image.shape[1:])
    coords = np.unravel_index(flat_pos, layer_shape)
    slices = [slice(None)]
    for c, n_layer, n_img in zip(coords, layer_shape, spatial):
        centre = (c + 0.5) * n_img / n_layer
        side = min(size, n_img)
        lo = int(np.clip(round(centre - side / 2), 0, n_img - side))
        slices.append(slice(lo, lo + side))
    return image[tuple(slices)].to(torch.float32).numpy()
