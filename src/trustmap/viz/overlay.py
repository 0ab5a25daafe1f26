"""Attribution maps drawn over their images: 2D overlays, 3D three-plane montages, grids.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``, so nothing touches global plotting state and no display is needed; matplotlib
is imported only when a figure is drawn.

Colour conventions
------------------
* Signed maps (positive and negative evidence) use a diverging colormap centred at zero,
  red positive and blue negative, with symmetric limits ``+-percentile(|map|)``.
* Unsigned maps use a perceptually uniform sequential colormap with limits
  ``[min(map), percentile(map)]``.

Clipping at a high percentile rather than the maximum keeps one extreme voxel from
washing out the rest of the map. The map's opacity grows from zero to ``alpha`` with
its magnitude, so the image shows through where the map says nothing.

Shapes
------
Images and maps may be ``(*spatial)``, ``(C, *spatial)`` or ``(1, C, *spatial)`` with
``spatial`` 2D ``(H, W)`` or 3D ``(D, H, W)``; the image is averaged and the map summed
over ``C``. Unless ``spatial_dims`` says otherwise, a 2D image (or a colour
:class:`~trustmap.data.io.LoadedImage`) means 2D, and a map whose third-last axis has
more than 4 entries is taken as a volume, so ``(3, H, W)`` is an RGB map and
``(1, 64, H, W)`` a single-channel volume. Pass ``spatial_dims`` for volumes of at most
4 slices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trustmap.core.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["DIVERGING_CMAP", "SEQUENTIAL_CMAP", "grid", "max_slices", "montage", "overlay"]

#: Colormap for signed maps: blue negative, white zero, red positive.
DIVERGING_CMAP = "bwr"
#: Colormap for unsigned maps: perceptually uniform, readable in greyscale print.
SEQUENTIAL_CMAP = "inferno"

ArrayLike = Any  # numpy array, torch tensor or LoadedImage


def overlay(
    image: ArrayLike | None,
    attribution: ArrayLike,
    path: str | os.PathLike[str] | None = None,
    *,
    signed: bool | None = None,
    alpha: float = 0.5,
    title: str | None = None,
    cmap: str | None = None,
    percentile: float = 99.0,
    spatial_dims: int | None = None,
    spacing: Sequence[float] | None = None,
    bare: bool = False,
) -> Figure:
    """Draw ``attribution`` over ``image`` with a colour bar; volumes go to :func:`montage`.

    Parameters
    ----------
    image:
        Greyscale or colour image, or None to draw the map alone. See the module
        docstring for the shapes accepted.
    attribution:
        The map, on the image's spatial grid.
    path:
        If given, the figure is also saved there atomically (format from the suffix,
        usually ``.png``).
    signed:
        Whether to draw the map as signed; None decides from the data (True when it has
        both positive and negative values).
    alpha:
        Opacity of the map where its magnitude reaches the colour limit.
    title:
        Figure title; ``"constant map"`` is added when the map has a single value.
    cmap:
        Colormap name; default :data:`DIVERGING_CMAP` or :data:`SEQUENTIAL_CMAP`.
    percentile:
        Percentile (0-100] of the map, or of its magnitude when signed, that sets the
        upper colour limit.
    spatial_dims:
        2 or 3 to override the shape inference.
    spacing:
        Voxel size per spatial axis, for the aspect ratio (a ``LoadedImage`` brings its own).
    bare:
        Draw the picture alone: no colour bar, no title, no text (a blinded reader study
        must not show scales or notes that tell methods apart).

    Returns
    -------
    matplotlib.figure.Figure
    """
    img, attr, spacing = _prepare(image, attribution, spatial_dims, spacing)
    if attr.ndim == 3:
        return montage(
            img,
            attr,
            path,
            signed=signed,
            alpha=alpha,
            title=title,
            cmap=cmap,
            percentile=percentile,
            spacing=spacing,
            bare=bare,
        )
    style = _Style.of(attr, signed, alpha, cmap, percentile)
    fig = _new_figure((4.0, 4.0) if bare else (5.5, 5.0))
    ax = fig.add_subplot()
    mappable = _draw(ax, img, attr, style, aspect=spacing[0] / spacing[1])
    if bare:
        ax.set_axis_off()
    else:
        fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04, label=style.label)
    _finish(fig, None if bare else style.title(title), path)
    return fig


def montage(
    volume: ArrayLike | None,
    attribution: ArrayLike,
    path: str | os.PathLike[str] | None = None,
    *,
    signed: bool | None = None,
    alpha: float = 0.5,
    title: str | None = None,
    cmap: str | None = None,
    percentile: float = 99.0,
    spacing: Sequence[float] | None = None,
    at: Sequence[int] | None = None,
    bare: bool = False,
) -> Figure:
    """Axial, coronal and sagittal planes of a 3D map over its volume, with one colour bar.

    The planes pass through ``at = (d, h, w)``, by default :func:`max_slices` of the map
    (its voxel of largest magnitude): axial ``[d, :, :]``, coronal ``[:, h, :]``, sagittal
    ``[:, :, w]``. Coronal and sagittal panels put slice 0 at the bottom, which is the
    patient's feet for slices sorted along an axial normal (DICOM series, RAS NIfTI).
    The colour limits come from the whole volume, so the three panels share one scale.

    Other parameters are as for :func:`overlay`; ``spacing`` is ``(D, H, W)`` voxel size
    for the aspect ratios. ``bare`` leaves out the colour bar, the titles and the plane
    names.
    """
    img, attr, spacing = _prepare(volume, attribution, 3, spacing)
    if at is None:
        d, h, w = max_slices(attr)
    else:
        if len(at) != 3 or not all(0 <= int(i) < n for i, n in zip(at, attr.shape)):
            raise ValueError(f"at must be a (d, h, w) index inside {attr.shape}, got {at!r}")
        d, h, w = (int(i) for i in at)
    style = _Style.of(attr, signed, alpha, cmap, percentile)
    sd, sh, sw = spacing
    planes = [
        (f"axial d={d}", np.s_[d, :, :], sh / sw, "upper"),
        (f"coronal h={h}", np.s_[:, h, :], sd / sw, "lower"),
        (f"sagittal w={w}", np.s_[:, :, w], sd / sh, "lower"),
    ]
    fig = _new_figure((12.0, 4.4))
    axes = fig.subplots(1, 3)
    mappable = None
    for ax, (name, index, aspect, origin) in zip(axes, planes):
        under = img[index] if img is not None else None
        mappable = _draw(ax, under, attr[index], style, aspect=aspect, origin=origin)
        if bare:
            ax.set_axis_off()
        else:
            ax.set_title(name)
    if not bare:
        fig.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.02, label=style.label)
    _finish(fig, None if bare else style.title(title), path)
    return fig


def grid(
    images: ArrayLike | Sequence[ArrayLike] | None,
    maps: Sequence[ArrayLike],
    titles: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    signed: bool | None = None,
    alpha: float = 0.5,
    cmap: str | None = None,
    percentile: float = 99.0,
    spatial_dims: int | None = None,
    ncols: int | None = None,
    title: str | None = None,
) -> Figure:
    """Several maps side by side, e.g. one per method, each with its own colour bar.

    ``images`` is one image shared by all maps, or a list with one image per map. Each
    panel has its own colour limits and signed/unsigned choice, since methods differ in
    scale. A 3D map is shown on its axial slice through :func:`max_slices`.
    """
    maps = list(maps)
    if not maps:
        raise ValueError("grid needs at least one map")
    per_map = isinstance(images, list | tuple)
    if per_map and len(images) != len(maps):
        raise ValueError(f"got {len(images)} images for {len(maps)} maps")
    if titles is not None and len(titles) != len(maps):
        raise ValueError(f"got {len(titles)} titles for {len(maps)} maps")
    if ncols is None:
        ncols = min(len(maps), 4)
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
    nrows = math.ceil(len(maps) / ncols)
    fig = _new_figure((4.2 * ncols, 4.0 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for k, attribution in enumerate(maps):
        image = images[k] if per_map else images
        img, attr, spacing = _prepare(image, attribution, spatial_dims, None)
        name = titles[k] if titles is not None else f"map {k}"
        aspect = spacing[-2] / spacing[-1]
        if attr.ndim == 3:
            d = max_slices(attr)[0]
            img, attr = (img[d] if img is not None else None), attr[d]
            name = f"{name} (d={d})"
        style = _Style.of(attr, signed, alpha, cmap, percentile)
        mappable = _draw(axes[k], img, attr, style, aspect=aspect)
        axes[k].set_title(style.title(name), fontsize=10)
        fig.colorbar(mappable, ax=axes[k], fraction=0.046, pad=0.04)
    for ax in axes[len(maps) :]:
        ax.set_axis_off()
    _finish(fig, title, path)
    return fig


def max_slices(map3d: ArrayLike) -> tuple[int, int, int]:
    """Index ``(d, h, w)`` of the voxel of largest ``|map|`` (the first one on ties)."""
    attr = _as_float(map3d, "map3d")
    if attr.ndim != 3:
        raise ValueError(f"map3d must be (D, H, W), got shape {attr.shape}")
    _check_finite(attr, "map3d")
    d, h, w = np.unravel_index(int(np.argmax(np.abs(attr))), attr.shape)
    return int(d), int(h), int(w)


# ---------------------------------------------------------------------------------------
# preparation


def _as_float(value: ArrayLike, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    elif hasattr(value, "array") and hasattr(value, "is_color"):
        value = value.array
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array or tensor, got dtype {array.dtype}")
    return array.astype(np.float64)


def _check_finite(array: np.ndarray, name: str) -> None:
    bad = int(array.size - np.isfinite(array).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or Inf values")


def _collapse(array: np.ndarray, spatial_ndim: int, name: str, reduce: str) -> np.ndarray:
    """``(*spatial)``, ``(C, *spatial)`` or ``(1, C, *spatial)`` -> ``(*spatial)``."""
    lead = array.shape[: array.ndim - spatial_ndim]
    if len(lead) > 2 or (len(lead) == 2 and lead[0] != 1):
        raise ValueError(
            f"{name} has shape {array.shape}: expected (*spatial), (C, *spatial) or "
            f"(1, C, *spatial) with {spatial_ndim} spatial axes; pass one sample"
        )
    flat = array.reshape(-1, *array.shape[array.ndim - spatial_ndim :])
    return flat.sum(axis=0) if reduce == "sum" else flat.mean(axis=0)


def _infer_spatial_dims(image: ArrayLike | None, attr: np.ndarray) -> int:
    if getattr(image, "is_color", False):
        return 2
    if image is not None and np.ndim(getattr(image, "array", image)) == 2:
        return 2
    if hasattr(image, "array") and np.ndim(image.array) == 3:
        return 3  # a greyscale LoadedImage with three axes is a volume
    return 3 if attr.ndim >= 3 and attr.shape[-3] > 4 else 2


def _prepare(
    image: ArrayLike | None,
    attribution: ArrayLike,
    spatial_dims: int | None,
    spacing: Sequence[float] | None,
) -> tuple[np.ndarray | None, np.ndarray, tuple[float, ...]]:
    """Return the image (or None) and map as ``(*spatial)`` float64 arrays, and the spacing."""
    attr = _as_float(attribution, "attribution")
    if attr.ndim < 2:
        raise ValueError(f"attribution must have at least 2 axes, got shape {attr.shape}")
    if spatial_dims is None:
        spatial_dims = _infer_spatial_dims(image, attr)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if attr.ndim < spatial_dims:
        raise ValueError(f"attribution of shape {attr.shape} has fewer than {spatial_dims} axes")
    attr = _collapse(attr, spatial_dims, "attribution", "sum")
    _check_finite(attr, "attribution")
    img = None
    if image is not None:
        img = _as_float(image, "image")
        if img.shape[-spatial_dims:] != attr.shape:
            raise ValueError(
                f"image shape {img.shape} and attribution spatial shape {attr.shape} differ"
            )
        img = _collapse(img, spatial_dims, "image", "mean")
        _check_finite(img, "image")
    if spacing is None:
        spacing = getattr(image, "spacing", None) or (1.0,) * spatial_dims
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != spatial_dims or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must hold {spatial_dims} positive numbers, got {spacing}")
    return img, attr, spacing


class _Style:
    """Colour limits, colormap and opacity rule for one map (computed, never mutated)."""

    def __init__(
        self, signed: bool, vmin: float, vmax: float, cmap: str, alpha: float, constant: bool
    ) -> None:
        self.signed, self.vmin, self.vmax = signed, vmin, vmax
        self.cmap, self.alpha, self.constant = cmap, alpha, constant

    @classmethod
    def of(
        cls,
        attr: np.ndarray,
        signed: bool | None,
        alpha: float,
        cmap: str | None,
        percentile: float,
    ) -> _Style:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        low, high = float(attr.min()), float(attr.max())
        constant = low == high
        if signed is None:
            signed = low < 0.0 < high
        if constant:
            # No scale to estimate; any limits around the value avoid 0/0 in the norm.
            half = 0.5 * max(abs(low), 1.0)
            vmin, vmax = (-2 * half, 2 * half) if signed else (low - half, low + half)
        elif signed:
            vmax = float(np.percentile(np.abs(attr), percentile))
            if vmax <= 0.0:  # mostly zero: the percentile misses the few non-zero voxels
                vmax = float(np.abs(attr).max())
            vmin = -vmax
        else:
            vmin, vmax = low, float(np.percentile(attr, percentile))
            if vmax <= vmin:
                vmax = high
        default = DIVERGING_CMAP if signed else SEQUENTIAL_CMAP
        return cls(bool(signed), vmin, vmax, cmap or default, alpha, constant)

    @property
    def label(self) -> str:
        return "attribution (signed)" if self.signed else "attribution"

    def opacity(self, attr: np.ndarray) -> np.ndarray:
        if self.constant:
            # A constant map says nothing about where; show the image, let the title tell.
            return np.zeros_like(attr)
        if self.signed:
            weight = np.abs(attr) / self.vmax
        else:
            weight = (attr - self.vmin) / (self.vmax - self.vmin)
        return self.alpha * np.clip(weight, 0.0, 1.0)

    def title(self, title: str | None) -> str | None:
        if not self.constant:
            return title
        return f"{title} (constant map)" if title else "constant map"


# ---------------------------------------------------------------------------------------
# drawing


def _new_figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw(
    ax: Axes,
    image: np.ndarray | None,
    attr: np.ndarray,
    style: _Style,
    *,
    aspect: float = 1.0,
    origin: str = "upper",
) -> Any:
    """Grey image, then the map on top; returns the map's AxesImage for the colour bar."""
    if image is not None:
        # Robust grey limits: a few saturated pixels (metal, labels) should not flatten
        # the anatomy.
        low, high = np.percentile(image, [0.5, 99.5])
        if high <= low:
            low, high = low - 0.5, high + 0.5
        ax.imshow(
            image,
            cmap="gray",
            vmin=low,
            vmax=high,
            aspect=aspect,
            origin=origin,
            interpolation="nearest",
        )
    mappable = ax.imshow(
        attr,
        cmap=style.cmap,
        vmin=style.vmin,
        vmax=style.vmax,
        alpha=style.opacity(attr) if image is not None else None,
        aspect=aspect,
        origin=origin,
        interpolation="nearest",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return mappable


def _finish(fig: Figure, title: str | None, path: str | os.PathLike[str] | None) -> None:
    if title:
        fig.suptitle(title)
    if path is not None:
        target = Path(path)
        fmt = target.suffix.lower().lstrip(".") or "png"
        with atomic_path(target) as temp:
            fig.savefig(temp, format=fmt, dpi=100)
