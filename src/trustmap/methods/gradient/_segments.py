"""Segments for XRAI and the greedy region merge over them.

The merge keeps, for every segment, the attribution sum and the pixel count of its part
not yet covered; adding a region only touches the segments that share its newly covered
pixels, so a whole image costs ``O(memberships + steps * n_segments)`` instead of
re-scanning every mask over the whole image at every step.

Segments are held as a sparse membership matrix (segments x pixels, as CSR and CSC).
Dilating a label image by a disk or ball is done on bitsets: every pixel carries one bit
per label, and OR-ing shifted copies over the footprint gives, for every pixel, the set
of labels whose dilated segment covers it, in about ``3 * radius`` array operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage import segmentation
from skimage.morphology import ball, disk
from skimage.transform import resize as sk_resize

# PAIR saliency's XRAI defaults (Kapishnikov et al. 2019): Felzenszwalb scales, smoothing,
# minimum segment size in pixels of the 224 x 224 segmentation grid, dilation radius.
FELZENSZWALB_SCALES = (50.0, 100.0, 150.0, 250.0, 500.0, 1200.0)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_MIN_SIZE = 150
PAIR_GRID = (224, 224)
DILATION_2D = 5
# 3D: SLIC supervoxel counts, from about half the volume's edge per supervoxel to a
# seventh, and a ball radius of 2 voxels (PAIR's 5 px is about 2 % of a 224 px edge).
SLIC_SEGMENTS = (8, 27, 125, 343)
DILATION_3D = 2
SLIC_COMPACTNESS = 0.1

_WORD = 64


@dataclass(frozen=True)
class Membership:
    """Which pixels each segment holds, indexed both ways (CSR and CSC arrays).

    Pixels of segment ``m``: ``seg_pix[seg_ptr[m]:seg_ptr[m + 1]]`` (in no particular
    order). Segments that contain pixel ``p``: ``pix_seg[pix_ptr[p]:pix_ptr[p + 1]]``.
    """

    n_segments: int
    n_pixels: int
    seg_ptr: np.ndarray
    seg_pix: np.ndarray
    pix_ptr: np.ndarray
    pix_seg: np.ndarray

    @classmethod
    def from_pairs(
        cls, seg: np.ndarray, pix: np.ndarray, n_segments: int, n_pixels: int
    ) -> Membership:
        """From ``(segment, pixel)`` index pairs, each pair given once."""
        seg = np.asarray(seg, dtype=np.int64)
        pix = np.asarray(pix, dtype=np.int64)
        # Stable argsorts: a radix sort for 16-bit segment ids, and a merge of the few
        # ascending runs the pixel ids come in; no full comparison sort of the pairs.
        small = np.int16 if n_segments <= np.iinfo(np.int16).max else np.int64
        by_seg = np.argsort(seg.astype(small), kind="stable")
        by_pix = np.argsort(pix, kind="stable")
        return cls(
            n_segments=n_segments,
            n_pixels=n_pixels,
            seg_ptr=_pointers(seg, n_segments),
            seg_pix=pix[by_seg],
            pix_ptr=_pointers(pix, n_pixels),
            pix_seg=seg[by_pix],
        )


def _pointers(ids: np.ndarray, n: int) -> np.ndarray:
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(ids, minlength=n), out=ptr[1:])
    return ptr


# -- segmentations --------------------------------------------------------------------------
def normalize(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max rescale of the whole image (all channels together) to ``[lo, hi]``.

    A constant image maps to ``lo`` everywhere instead of dividing by zero.
    """
    vmin, vmax = float(image.min()), float(image.max())
    if vmax == vmin:
        return np.full(image.shape, lo, dtype=np.float64)
    return (image - vmin) / (vmax - vmin) * (hi - lo) + lo


def felzenszwalb_labels(
    image: np.ndarray,
    scales: Sequence[float],
    sigma: float,
    min_size: int,
    grid: tuple[int, int] | None,
) -> list[np.ndarray]:
    """Felzenszwalb-Huttenlocher label images of ``image`` ``(H, W, C)``, one per scale.

    As in PAIR's XRAI: values rescaled to [-1, 1]; if ``grid`` is given the image is
    resampled to it (cubic spline, anti-aliased) for segmentation and the labels are
    brought back to ``(H, W)`` by nearest neighbour.
    """
    shape = image.shape[:2]
    im = normalize(image.astype(np.float64), -1.0, 1.0)
    if grid is not None:
        im = sk_resize(im, grid, order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    labels = []
    for scale in scales:
        seg = segmentation.felzenszwalb(im, scale=scale, sigma=sigma, min_size=min_size)
        if grid is not None:
            seg = sk_resize(
                seg, shape, order=0, preserve_range=True, mode="constant", anti_aliasing=False
            ).astype(np.int64)
        labels.append(seg)
    return labels


def slic_labels(
    volume: np.ndarray, n_segments: Sequence[int], compactness: float, sigma: float
) -> list[np.ndarray]:
    """SLIC supervoxel label volumes of ``volume`` ``(D, H, W, C)``, one per count.

    Intensities are rescaled to [0, 1] over the whole volume so that ``compactness``
    means the same for CT in Hounsfield units and for normalised MR.
    """
    vol = normalize(volume.astype(np.float64), 0.0, 1.0)
    multichannel = vol.shape[-1] > 1
    if not multichannel:
        vol = vol[..., 0]
    return [
        segmentation.slic(
            vol,
            n_segments=int(n),
            compactness=compactness,
            sigma=sigma,
            start_label=0,
            convert2lab=False,
            channel_axis=-1 if multichannel else None,
        )
        for n in n_segments
    ]


# -- membership -----------------------------------------------------------------------------
def footprint(ndim: int, radius: int) -> np.ndarray:
    """The disk (2D) or ball (3D) of ``radius`` pixels PAIR dilates segments with."""
    return (disk(radius) if ndim == 2 else ball(radius)).astype(bool)


def _shift_or(out: np.ndarray, src: np.ndarray, offset: Sequence[int]) -> None:
    """``out[p] |= src[p + offset]`` where ``p + offset`` is inside, over the last axes.

    Pixels outside contribute nothing. That equals skimage's reflect-mode dilation for a
    disk or ball: the mirror of an outside neighbour is itself within the footprint.
    """
    dst_sl: list[slice] = [slice(None)] * (out.ndim - len(offset))
    src_sl: list[slice] = list(dst_sl)
    for d, n in zip(offset, out.shape[out.ndim - len(offset) :]):
        if abs(d) >= n:
            return
        dst_sl.append(slice(max(0, -d), n - max(0, d)))
        src_sl.append(slice(max(0, d), n - max(0, -d)))
    out[tuple(dst_sl)] |= src[tuple(src_sl)]


def _dilate_bits(bits: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """OR-dilation of a bitset image ``(*spatial)`` by a disk/ball footprint.

    Rows of a disk or ball along the last axis are contiguous and centred, so the OR
    over a row of half-width ``w`` is built incrementally (``H_w``) and each row of the
    footprint then costs one shifted OR.
    """
    r = fp.shape[0] // 2
    lead = np.argwhere(fp[..., r]) - r  # leading offsets whose row is not empty
    half = {tuple(t): int(fp[tuple(t + r)].sum()) // 2 for t in lead}
    out = np.zeros_like(bits)
    row = bits.copy()
    for w in range(r + 1):
        if w > 0:
            _shift_or(row, bits, (0,) * (bits.ndim - 1) + (w,))
            _shift_or(row, bits, (0,) * (bits.ndim - 1) + (-w,))
        for t, hw in half.items():
            if hw == w:
                _shift_or(out, row, (*t, 0))
    return out


def label_pairs(labels: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(segment, pixel)`` pairs of the dilated segments of one label image.

    Segments are the labels ``min..max`` in order (PAIR's order; absent labels give empty
    segments, which the merge drops). Returns ``(seg, pix, n_labels)``.
    """
    flat = labels.reshape(-1).astype(np.int64)
    flat = flat - flat.min()
    n_labels = int(flat.max()) + 1
    n_pix = flat.size
    pix_all = np.arange(n_pix, dtype=np.int64)
    if radius == 0 or n_labels == 1:
        return flat, pix_all, n_labels
    fp = footprint(labels.ndim, radius)
    segs, pixs = [flat], [pix_all]
    word_of, bit_of = flat // _WORD, (flat % _WORD).astype(np.uint64)
    own_bit = np.left_shift(np.uint64(1), bit_of)
    for k in range(math.ceil(n_labels / _WORD)):
        bits = np.where(word_of == k, own_bit, np.uint64(0))
        grown = _dilate_bits(bits.reshape(labels.shape), fp).reshape(-1)
        grown &= ~bits  # the own label is already listed
        pix = np.flatnonzero(grown)
        vals = grown[pix]
        # A pixel near a boundary sees only a few labels: peel off the lowest set bit
        # until none is left (as many rounds as the most labels any pixel sees).
        while pix.size:
            low = vals & (~vals + np.uint64(1))
            bit = np.frexp(low.astype(np.float64))[1].astype(np.int64) - 1
            segs.append(bit + k * _WORD)
            pixs.append(pix)
            vals ^= low
            keep = vals != 0
            pix, vals = pix[keep], vals[keep]
    return np.concatenate(segs), np.concatenate(pixs), n_labels


def dilated_membership(label_images: Sequence[np.ndarray], radius: int) -> Membership:
    """Membership of every label of every image, each segment dilated by ``radius``."""
    segs, pixs, base = [], [], 0
    for labels in label_images:
        seg, pix, n = label_pairs(labels, radius)
        segs.append(seg + base)
        pixs.append(pix)
        base += n
    n_pix = int(label_images[0].size)
    return Membership.from_pairs(np.concatenate(segs), np.concatenate(pixs), base, n_pix)


def label_map_membership(labels: np.ndarray) -> Membership:
    """One undilated segment per distinct value of a user label map, in ascending order."""
    _, inverse = np.unique(labels.reshape(-1), return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    n = int(inverse.max()) + 1
    return Membership.from_pairs(inverse, np.arange(inverse.size), n, inverse.size)


def mask_membership(masks: np.ndarray) -> Membership:
    """Membership of a stack of boolean masks ``(K, *spatial)``, undilated, in order."""
    k = masks.shape[0]
    seg, pix = np.nonzero(masks.reshape(k, -1))
    return Membership.from_pairs(seg, pix, k, int(np.prod(masks.shape[1:])))


# -- the greedy merge -------------------------------------------------------------------------
def _gather_ranges(ptr: np.ndarray, items: np.ndarray, which: np.ndarray) -> tuple:
    """``items[ptr[i]:ptr[i+1]]`` for every ``i`` in ``which``, concatenated, and lengths."""
    starts = ptr[which]
    lengths = ptr[which + 1] - starts
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return items[offsets + np.arange(total)], lengths


def greedy_regions(
    attr: np.ndarray,
    members: Membership,
    *,
    area_threshold: float,
    min_pixel_diff: int,
) -> np.ndarray:
    """XRAI's full greedy region selection over ``attr`` (flat, float64).

    Repeatedly adds the segment whose not-yet-covered part has the highest mean
    attribution ("gain density"); segments adding fewer than ``min_pixel_diff`` new
    pixels are dropped; stops once the covered fraction exceeds ``area_threshold`` or no
    segment is left. Each pixel gets the gain of the step that first covered it; pixels
    never covered get their own mean attribution. Ties go to the earlier segment, and
    the gain written is the mean recomputed over the new pixels, as in PAIR.
    """
    n_seg, n_pix = members.n_segments, members.n_pixels
    seg_ptr, seg_pix = members.seg_ptr, members.seg_pix
    seg_ids = np.repeat(np.arange(n_seg), np.diff(seg_ptr))
    sums = np.bincount(seg_ids, weights=attr[seg_pix], minlength=n_seg)
    counts = np.diff(seg_ptr).astype(np.int64)
    alive = np.ones(n_seg, dtype=bool)
    covered = np.zeros(n_pix, dtype=bool)
    out = np.zeros(n_pix, dtype=np.float64)
    n_covered = 0
    # Incremental sums drift by rounding; candidates within this of the best are
    # re-ranked by their exact mean so that ties resolve like a fresh computation.
    tol = 1e-8 * float(np.abs(attr).max(initial=0.0)) + 1e-300
    gain = np.empty(n_seg, dtype=np.float64)

    def new_pixels(m: int) -> np.ndarray:
        # Ascending, i.e. row-major: the mean then sums in a boolean mask's order.
        pix = seg_pix[seg_ptr[m] : seg_ptr[m + 1]]
        return np.sort(pix[~covered[pix]])

    while n_covered / n_pix <= area_threshold:
        alive &= counts >= min_pixel_diff
        if not alive.any():
            break
        gain.fill(-np.inf)
        np.divide(sums, counts, out=gain, where=alive)
        top = gain.max()
        cands = np.flatnonzero(gain >= top - tol)
        if cands.size == 1:
            best, new = int(cands[0]), new_pixels(int(cands[0]))
            value = attr[new].mean()
        else:
            best, new, value = -1, None, -np.inf
            for m in cands:
                pix = new_pixels(int(m))
                mean = attr[pix].mean()
                if mean > value:
                    best, new, value = int(m), pix, mean
        out[new] = value
        covered[new] = True
        n_covered += new.size
        alive[best] = False
        hit, lengths = _gather_ranges(members.pix_ptr, members.pix_seg, new)
        sums -= np.bincount(hit, weights=np.repeat(attr[new], lengths), minlength=n_seg)
        counts -= np.bincount(hit, minlength=n_seg)
    rest = ~covered
    if rest.any():
        out[rest] = attr[rest].mean()
    return out
