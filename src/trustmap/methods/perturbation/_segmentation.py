"""Superpixels (2D) and supervoxels (3D) for the segment-based perturbation methods.

LIME, KernelSHAP and Shapley sampling treat each segment as one player: it is either kept
or replaced by its "off" value. Segments come from scikit-image (SLIC, Felzenszwalb,
quickshift), from a regular grid, or from the user (``segments=``). Every sample gets a
label image relabelled to ``0..K_b - 1``; ``K_b`` may differ between samples.

The SLIC and Felzenszwalb calls are the ones XRAI uses (``gradient/_segments.py``), so
both families segment an image the same way for the same options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from skimage import segmentation as sk_segmentation

from trustmap.methods.gradient import _segments as xrai_segments

SEGMENTATIONS = ("slic", "felzenszwalb", "quickshift", "grid")

# Defaults per algorithm, on intensities rescaled per image: SLIC and Felzenszwalb as in
# XRAI ([0, 1] and [-1, 1]); quickshift on [0, 100], the range of the L channel its
# defaults (the `lime` package's kernel_size=4, max_dist=200, ratio=0.2) were set for.
# With compactness 0.1, SLIC returns 49 segments for n_segments=50 on a smooth 128 x 128
# image, the setting of the benchmark.
DEFAULTS: dict[str, dict[str, Any]] = {
    "slic": {"compactness": 0.1, "sigma": 1.0},
    "felzenszwalb": {"scale": 100.0, "sigma": 0.8, "min_size": 20},
    "quickshift": {"kernel_size": 4.0, "max_dist": 200.0, "ratio": 0.2, "sigma": 0.0},
    "grid": {},
}
QUICKSHIFT_RANGE = 100.0


@dataclass(frozen=True)
class Segmentation:
    """Segments of a batch.

    ``labels[b]`` is sample ``b``'s label per voxel, flattened (``(B, P)`` long, on the
    input's device), with values ``0..counts[b] - 1``; every label occurs.
    """

    labels: torch.Tensor
    counts: tuple[int, ...]

    @property
    def max_count(self) -> int:
        return max(self.counts)

    def spread(self, values: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """Each segment's value on its voxels: ``values`` ``(B, K_max)`` -> ``(B, 1, *s)``."""
        b = self.labels.shape[0]
        vals = values.to(self.labels.device)
        return vals.gather(1, self.labels).view(b, 1, *spatial)


# -- options --------------------------------------------------------------------------------
def check_options(
    method: object, n_segments: object, params: object, ndim: int
) -> tuple[str, int, dict[str, Any]]:
    """Validate the automatic-segmentation options before any forward pass.

    Returns ``(method, n_segments, params)`` with ``params`` the algorithm's defaults
    updated by the user's.
    """
    if not isinstance(method, str) or method not in SEGMENTATIONS:
        raise ValueError(f"segmentation must be one of {SEGMENTATIONS}, got {method!r}")
    if ndim == 3 and method in ("felzenszwalb", "quickshift"):
        raise ValueError(
            f"segmentation={method!r} works on 2D images only; use 'slic' (supervoxels) or "
            "'grid' for volumes, or pass your own segments="
        )
    if isinstance(n_segments, bool) or not isinstance(n_segments, int) or n_segments < 1:
        raise ValueError(f"n_segments must be a positive integer, got {n_segments!r}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise TypeError(f"segmentation_params must be a dict or None, got {type(params).__name__}")
    unknown = sorted(set(params) - set(DEFAULTS[method]))
    if unknown:
        raise ValueError(
            f"segmentation_params {unknown} are not options of {method!r}; it takes "
            f"{sorted(DEFAULTS[method])}"
        )
    merged = {**DEFAULTS[method], **params}
    for key, value in merged.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"segmentation_params[{key!r}] must be a finite non-negative number, got {value!r}"
            )
    if method == "slic" and merged["compactness"] <= 0:
        raise ValueError("segmentation_params['compactness'] must be positive")
    return method, n_segments, merged


# -- automatic segments -------------------------------------------------------------------------
def grid_labels(spatial: tuple[int, ...], n_segments: int) -> np.ndarray:
    """A regular grid of about ``n_segments`` cells: ``round(n ** (1 / d))`` cells per axis
    (at most the axis length), cut as evenly as integer sizes allow."""
    per_axis = max(1, round(n_segments ** (1.0 / len(spatial))))
    labels = np.zeros(spatial, dtype=np.int64)
    for axis, size in enumerate(spatial):
        cells = min(per_axis, size)
        index = (np.arange(size) * cells) // size
        shape = [1] * len(spatial)
        shape[axis] = size
        labels = labels * cells + index.reshape(shape)
    return labels


def auto_labels(image: np.ndarray, method: str, n_segments: int, params: dict) -> np.ndarray:
    """Label image ``(*spatial)`` of one sample ``image`` ``(C, *spatial)``."""
    spatial = image.shape[1:]
    if method == "grid":
        return grid_labels(tuple(spatial), n_segments)
    channels_last = np.moveaxis(image.astype(np.float64), 0, -1)
    if method == "slic":
        (labels,) = xrai_segments.slic_labels(
            channels_last, [n_segments], params["compactness"], params["sigma"]
        )
        return labels
    if method == "felzenszwalb":
        (labels,) = xrai_segments.felzenszwalb_labels(
            channels_last, [params["scale"]], params["sigma"], int(params["min_size"]), None
        )
        return labels
    scaled = xrai_segments.normalize(channels_last, 0.0, QUICKSHIFT_RANGE)
    return sk_segmentation.quickshift(
        scaled,
        ratio=params["ratio"],
        kernel_size=params["kernel_size"],
        max_dist=params["max_dist"],
        sigma=params["sigma"],
        convert2lab=False,
        rng=0,  # quickshift breaks ties with random noise; fixed so labels are repeatable
        channel_axis=-1,
    )


# -- user segments ------------------------------------------------------------------------------
def user_labels(segments: object, b: int, spatial: tuple[int, ...]) -> np.ndarray:
    """A user's integer label map as ``(B, *spatial)``, validated.

    Accepts a tensor or numpy array of integers (or booleans) of shape ``(*spatial)``
    (shared by the batch) or ``(B, *spatial)``.
    """
    if isinstance(segments, torch.Tensor):
        labels = segments.detach().cpu().numpy()
    elif isinstance(segments, np.ndarray):
        labels = segments
    else:
        raise TypeError(
            "segments must be an integer label tensor of shape (*spatial) or (B, *spatial), "
            f"got {type(segments).__name__}"
        )
    if labels.dtype.kind not in "biu":
        raise TypeError(f"segments must hold integer labels, got dtype {labels.dtype}")
    if labels.shape == spatial:
        return np.broadcast_to(labels, (b, *spatial))
    if labels.shape == (b, *spatial):
        return labels
    raise ValueError(
        f"segments has shape {tuple(labels.shape)}; expected {spatial} or {(b, *spatial)} "
        "to match the input's spatial size"
    )


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels ``0..K - 1`` in ascending order of the original values."""
    _, inverse = np.unique(labels.reshape(-1), return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return inverse, int(inverse.max()) + 1


def segment_batch(
    x: torch.Tensor,
    *,
    segments: object = None,
    method: str = "slic",
    n_segments: int = 50,
    params: dict[str, Any] | None = None,
) -> Segmentation:
    """The segments of every sample of ``x`` ``(B, C, *spatial)``.

    ``segments`` (a user label map, validated by :func:`user_labels`) wins over the
    automatic options, which are assumed checked by :func:`check_options`.
    """
    b, _, *spatial = x.shape
    if segments is not None:
        raw = user_labels(segments, b, tuple(spatial))
        per_sample = [_relabel(raw[i]) for i in range(b)]
    else:
        image = x.detach().to("cpu", torch.float64).numpy()
        per_sample = [
            _relabel(auto_labels(image[i], method, n_segments, params or {})) for i in range(b)
        ]
    labels = torch.from_numpy(np.stack([lab for lab, _ in per_sample])).to(x.device)
    return Segmentation(labels=labels, counts=tuple(k for _, k in per_sample))


def prepare(
    x: torch.Tensor, segments: object, method: object, n_segments: object, params: object
) -> Segmentation:
    """Validate the segmentation options (or the user's segments) and segment ``x``."""
    if segments is not None:
        return segment_batch(x, segments=segments)
    m, n, p = check_options(method, n_segments, params, x.ndim - 2)
    return segment_batch(x, method=m, n_segments=n, params=p)


def segment_means(x: torch.Tensor, seg: Segmentation) -> torch.Tensor:
    """Each voxel replaced by its segment's mean, per channel: ``(B, C, *spatial)``.

    The "off" value of LIME's image explainer (Ribeiro et al. 2016; the `lime` package's
    ``hide_color=None``).
    """
    b, c, *spatial = x.shape
    k = seg.max_count
    flat = x.reshape(b, c, -1)
    index = seg.labels.unsqueeze(1).expand(b, c, -1)
    sums = torch.zeros((b, c, k), dtype=x.dtype, device=x.device).scatter_add_(2, index, flat)
    counts = torch.zeros((b, 1, k), dtype=x.dtype, device=x.device)
    counts.scatter_add_(2, seg.labels.unsqueeze(1), torch.ones_like(flat[:, :1]))
    means = sums / counts.clamp_min(1)
    return means.gather(2, index).view(b, c, *spatial)
