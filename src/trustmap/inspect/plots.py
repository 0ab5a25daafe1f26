"""Figures of model inspection. Each function only reads a result of
:mod:`trustmap.inspect`, draws it on an Agg :class:`matplotlib.figure.Figure` (never
``pyplot``; matplotlib is imported when a figure is drawn), writes it to ``path`` as a
PNG atomically when a path is given, and returns the figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from trustmap.viz.overlay import _draw, _finish, _new_figure, _Style

__all__ = [
    "plot_activation_maps",
    "plot_attention",
    "plot_cohort",
    "plot_dissection",
    "plot_feature_maps",
    "plot_filter_comparison",
    "plot_filters",
    "plot_influence",
    "plot_maximization",
    "plot_outliers",
    "plot_projection",
    "plot_unit_rates",
]

PathLike = str | os.PathLike[str] | None

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


def _grid_axes(fig: Any, n: int, cols: int) -> list[Any]:
    rows = max(1, math.ceil(n / cols))
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.set_axis_off()
    return axes


def _grey(ax: Any, image: np.ndarray, **kw: Any) -> Any:
    return ax.imshow(image, cmap="gray", interpolation="nearest", **kw)


def _plane(volume: np.ndarray) -> np.ndarray:
    """A 2D view: the array itself, or the axial slice of a volume through its maximum."""
    if volume.ndim == 3:
        z = int(np.unravel_index(np.argmax(volume), volume.shape)[0])
        return volume[z]
    return volume


def plot_filters(filters: Any, path: PathLike = None, *, max_filters: int = 64) -> Any:
    """First-layer kernels as a grid (input channel 0; 3D: axial, coronal, sagittal)."""
    planes = filters.planes[:max_filters, 0]  # (K, views, k, k)
    k, views = planes.shape[:2]
    fig = _new_figure((min(12.0, 1.0 + 0.9 * 8 * views / 3 + 2), 1.2 + 1.0 * math.ceil(k / 8)))
    axes = _grid_axes(fig, k * views, 8 * views if views > 1 else 8)
    lim = float(np.abs(planes).max()) or 1.0
    for i in range(k):
        for v in range(views):
            ax = axes[i * views + v]
            ax.imshow(planes[i, v], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            if v == 0:
                ax.set_title(f"{i}", fontsize=7)
    what = " (axial, coronal, sagittal)" if views > 1 else ""
    _finish(fig, f"Filters of {filters.layer}{what}", path)
    return fig


def plot_filter_comparison(comparison: Any, path: PathLike = None) -> Any:
    """Per filter: the norms in both checkpoints and the cosine similarity between them."""
    fig = _new_figure((10.0, 3.6))
    left, right = fig.subplots(1, 2)
    k = np.arange(len(comparison.cosine))
    width = 0.4
    left.bar(k - width / 2, comparison.norm_a, width, label=comparison.label_a, color="#999999")
    left.bar(k + width / 2, comparison.norm_b, width, label=comparison.label_b, color="#1f77b4")
    left.set_xlabel("filter")
    left.set_ylabel("weight norm")
    left.legend(fontsize=8)
    right.bar(k, comparison.cosine, color="#2ca02c")
    right.set_ylim(min(0.0, float(comparison.cosine.min()) - 0.05), 1.02)
    right.axhline(1.0, color="k", lw=0.5)
    right.set_xlabel("filter")
    right.set_ylabel(f"cosine({comparison.label_a}, {comparison.label_b})")
    _finish(
        fig,
        f"{comparison.layer}: {comparison.label_b} against {comparison.label_a} "
        f"(mean cosine {comparison.mean_cosine:.3f})",
        path,
    )
    return fig


def plot_unit_rates(rates: Any, path: PathLike = None) -> Any:
    """Dead and saturated shares of units per layer."""
    fig = _new_figure((max(6.0, 1.2 * len(rates.layers) + 2), 3.8))
    ax = fig.add_subplot()
    x = np.arange(len(rates.layers))
    dead = [layer.dead_rate for layer in rates.layers]
    sat = [layer.saturated_rate for layer in rates.layers]
    ax.bar(x - 0.2, dead, 0.4, label="dead (never active)", color="#d62728")
    ax.bar(
        x + 0.2,
        sat,
        0.4,
        label=f"saturated (active >= {rates.saturated_share:.0%})",
        color="#ff7f0e",
    )
    ax.set_xticks(x, [layer.layer for layer in rates.layers], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of units")
    ax.set_ylim(0, max(0.05, max(dead + sat) * 1.2))
    ax.legend(fontsize=8)
    _finish(fig, f"Dead and saturated units over {rates.n_images} images", path)
    return fig


def plot_feature_maps(
    maps: Any, image: np.ndarray | None = None, path: PathLike = None, *, max_maps: int = 64
) -> Any:
    """Montage of the channels of one layer (3D: each channel's slice through its maximum)."""
    planes = maps.planes[:max_maps]
    n = len(planes) + (image is not None)
    fig = _new_figure((12.0, 1.5 + 1.4 * math.ceil(n / 10)))
    axes = _grid_axes(fig, n, 10)
    offset = 0
    if image is not None:
        _grey(axes[0], _plane(image))
        axes[0].set_title("image", fontsize=7)
        offset = 1
    for k, plane in enumerate(planes):
        ax = axes[k + offset]
        ax.imshow(plane, cmap="magma", interpolation="nearest")
        note = f" z={maps.slices[k]}" if maps.slices is not None else ""
        ax.set_title(f"{k}{note}", fontsize=7)
    _finish(fig, f"Feature maps of {maps.layer}", path)
    return fig


def _overlays(images: np.ndarray, maps: np.ndarray, title: str, path: PathLike) -> Any:
    """Images ``(B, C, *s)`` with ``maps`` ``(B, 1, *s)`` over them (3D: the slice through
    each map's maximum)."""
    n = len(images)
    fig = _new_figure((3.0 * n, 3.2))
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, img, m in zip(axes, images, maps):
        volume = m[0]
        if volume.ndim == 3:
            z = int(np.unravel_index(np.argmax(volume), volume.shape)[0])
            plane, under = volume[z], img[0][z]
        else:
            plane, under = volume, img[0]
        _draw(ax, under, plane, _Style.of(plane, False, 0.5, None, 99.0))
        ax.set_axis_off()
    _finish(fig, title, path)
    return fig


def plot_activation_maps(
    images: np.ndarray, maps: np.ndarray, layer: str, path: PathLike = None
) -> Any:
    """Images ``(B, C, *s)`` with a layer's activation maps ``(B, 1, *s)`` over them."""
    return _overlays(images, maps, f"Mean activation of {layer}, upsampled to the input", path)


def plot_projection(projection: Any, embedding: Any, path: PathLike = None) -> Any:
    """The 2D projection coloured by label, prediction, error and split."""
    coords = projection.coords
    panels: list[tuple[str, np.ndarray | None]] = [
        ("label", embedding.labels),
        ("prediction", embedding.predictions),
        ("error", None if embedding.errors is None else embedding.errors.astype(int)),
        ("split", embedding.splits),
    ]
    panels = [(name, values) for name, values in panels if values is not None]
    fig = _new_figure((4.2 * len(panels), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, values) in zip(axes, panels):
        cats = list(dict.fromkeys(values.tolist()))
        if name == "error":
            names = {0: "correct", 1: "error"}
        elif name in ("label", "prediction") and embedding.classes:
            names = {i: c for i, c in enumerate(embedding.classes)}
        else:
            names = {}
        for j, cat in enumerate(sorted(cats, key=str)):
            sel = values == cat
            colour = _COLOURS[j % len(_COLOURS)]
            if name == "error":
                colour = "#d62728" if cat else "#c7c7c7"
            label = f"{names.get(cat, cat)} ({int(sel.sum())})"
            ax.scatter(
                coords[sel, 0], coords[sel, 1], s=6, color=colour, label=label, alpha=0.8,
                linewidths=0,
            )  # fmt: skip
        ax.set_title(f"by {name}", fontsize=9)
        ax.legend(fontsize=7, markerscale=2)
        ax.set_xticks([])
        ax.set_yticks([])
    _finish(
        fig,
        f"{projection.method.upper()} of {embedding.layer} (trustworthiness "
        f"{projection.trustworthiness:.3f} at k={projection.n_neighbors})",
        path,
    )
    return fig


def plot_outliers(outliers: Any, path: PathLike = None, *, highlight: Sequence[int] = ()) -> Any:
    """Histogram of kNN outlier scores with the flagging threshold (and marked cases)."""
    fig = _new_figure((7.0, 3.6))
    ax = fig.add_subplot()
    ax.hist(outliers.scores, bins=60, color="#7f7f7f")
    ax.axvline(outliers.threshold, color="#d62728", label=f"{outliers.quantile:.0%} of reference")
    for i in highlight:
        ax.axvline(outliers.scores[i], color="#1f77b4", lw=0.8)
    ax.set_xlabel(f"mean distance to the {outliers.k} nearest reference cases")
    ax.set_ylabel("cases")
    ax.legend(fontsize=8)
    _finish(fig, f"kNN outlier scores ({int(outliers.flagged.sum())} flagged)", path)
    return fig


def plot_dissection(dissection: Any, path: PathLike = None, *, top: int = 24) -> Any:
    """IoU of the best units with every concept, and the number of units per label."""
    iou = dissection.iou
    order = np.argsort(-dissection.best_iou, kind="stable")[:top]
    fig = _new_figure((12.0, 4.6))
    left, right = fig.subplots(1, 2, width_ratios=[2.2, 1])
    im = left.imshow(iou[order].T, aspect="auto", cmap="viridis", vmin=0)
    left.set_yticks(range(len(dissection.concepts)), dissection.concepts, fontsize=8)
    left.set_xticks(range(len(order)), [str(u) for u in order], fontsize=7, rotation=90)
    left.set_xlabel("unit (highest IoU first)")
    fig.colorbar(im, ax=left, label="IoU")
    counts = dissection.counts()
    right.barh(list(counts), list(counts.values()), color="#1f77b4")
    right.set_xlabel(f"units labelled (IoU >= {dissection.iou_threshold})")
    right.tick_params(axis="y", labelsize=8)
    _finish(
        fig,
        f"Network dissection of {dissection.layer} ({dissection.units} units, "
        f"{dissection.n_images} images)",
        path,
    )
    return fig


def plot_influence(table: Any, path: PathLike = None) -> Any:
    """The DeepMiner-like table: per influential unit, its crops, influence and concept."""
    rows = table.rows
    n_ex = max((len(r.crops) for r in rows), default=1)
    fig = _new_figure((2.0 + 1.6 * n_ex, 0.6 + 1.5 * max(1, len(rows))))
    if not rows:
        _finish(fig, "no unit to rank", path)
        return fig
    axes = fig.subplots(len(rows), n_ex, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_ex):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(row.crops):
                _grey(ax, _plane(row.crops[c][0]))
        label = row.concept or "-"
        iou = f" IoU {row.iou:.2f}" if row.iou is not None else ""
        axes[r, 0].set_title(
            f"#{r + 1} unit {row.unit}: influence {row.influence:.3g}, {label}{iou}",
            fontsize=8,
            loc="left",
        )
    _finish(fig, f"Units of {table.layer} ranked by influence on class {table.target}", path)
    return fig


def plot_maximization(results: Sequence[Any], labels: Sequence[str], path: PathLike = None) -> Any:
    """Per result: the image, its change from the start, and the target score (solid) and
    regularized objective (dashed) at every step."""
    n = len(results)
    fig = _new_figure((3.4 * n, 9.6))
    axes = fig.subplots(3, n, squeeze=False)
    for i, (res, label) in enumerate(zip(results, labels)):
        _grey(axes[0, i], _plane(res.image[0]))
        axes[0, i].set_title(label, fontsize=9)
        change = _plane(res.change[0])
        lim = float(np.abs(change).max()) or 1.0
        axes[1, i].imshow(change, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[1, i].set_title("change from start (red brighter)", fontsize=8)
        axes[0, i].set_axis_off()
        axes[1, i].set_axis_off()
        ax = axes[2, i]
        ax.plot(res.score, color=_COLOURS[0], label="target")
        ax.plot(res.curve, color=_COLOURS[1], ls="--", label="objective")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    _finish(fig, "Activation maximization", path)
    return fig


def plot_attention(images: np.ndarray, maps: np.ndarray, path: PathLike = None) -> Any:
    """Images with the model's attention maps over them."""
    return _overlays(images, maps, "Attention maps (1 = uniform attention)", path)


def plot_cohort(cohort: Any, path: PathLike = None, *, template: np.ndarray | None = None) -> Any:
    """The cohort map (3D: three orthogonal planes through its maximum)."""
    mean = cohort.mean
    title = f"Mean {cohort.method} map over {cohort.n} images of class {cohort.class_index}"
    if mean.ndim == 3:
        from trustmap.viz.overlay import montage

        return montage(template, mean, path, signed=False, title=title)
    fig = _new_figure((5.0, 4.6))
    ax = fig.add_subplot()
    _draw(ax, template, mean, _Style.of(mean, False, 0.6, None, 99.0))
    ax.set_axis_off()
    _finish(fig, title, path)
    return fig
