"""Figures of the trust protocol, after Arun et al. 2021 (Arun et al., Radiology: AI 2021,
Figures 2, 3 and 4).

Each function draws one figure from ``results.json`` (and ``per_image.csv`` for the box
plots), writes it to ``path`` as a PNG, atomically, and returns the path. Figures are built
on :class:`matplotlib.figure.Figure` with the Agg canvas (never ``pyplot``), so no window
opens and nothing leaks between calls; matplotlib is imported only when a figure is drawn.

* :func:`utility_boxplot` -- Figure 2A: localization utility per method with the AVG and
  localizer baselines.
* :func:`randomization_curves` -- Figure 3A: SSIM to the trained map along cascading (and
  independent) randomization, with each method's randomization baseline.
* :func:`randomization_grid` -- Figure 3B: maps of one image along the cascade.
* :func:`repro_boxplot` -- Figure 4A: repeatability and reproducibility SSIM.
* :func:`repro_examples` -- Figure 4C: maps of one image from replicates A1, A2 and model B.
* :func:`faithfulness_plot` -- deletion and insertion AUCs (beyond the paper).

Verdict marks drawn over the boxes: ``✓`` pass, ``✗`` did not pass, ``?`` uncertain. A
method that lacks the data a figure needs (a criterion that was not run) is left out of
that figure; a figure with nothing to draw says so in its axes instead of failing.

3D maps and images are shown as their middle axial slice (``[D // 2]``), and the titles
say so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# The drawing helpers of the overlay module are reused so that every trustmap figure
# shows a map over its image the same way (robust grey limits, opacity growing with the
# map's value, atomic save).
from trustmap.viz.overlay import (
    SEQUENTIAL_CMAP,
    _as_float,
    _check_finite,
    _collapse,
    _draw,
    _finish,
    _new_figure,
    _Style,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

__all__ = [
    "CRITERIA",
    "VERDICT_MARKS",
    "faithfulness_plot",
    "randomization_curves",
    "randomization_grid",
    "repro_boxplot",
    "repro_examples",
    "utility_boxplot",
]

#: The four criteria of Arun et al. 2021, in the order of its tables.
CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")
#: Mark drawn above a method's box for each verdict.
VERDICT_MARKS = {"pass": "\u2713", "fail": "\u2717", "uncertain": "?"}
_VERDICT_COLOURS = {"pass": "#1a7f37", "fail": "#c62828", "uncertain": "#b26a00"}

#: Low baseline (AVG mask, SSIM 0.5) and high baseline (localizer), as in Arun et al. 2021.
LOW_COLOUR = "#9ecae1"
HIGH_COLOUR = "#08519c"
_MAP_ALPHA = 0.8
_MASK_COLOUR = "#00e5ff"

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------------------------
# box plots


def utility_boxplot(
    per_image: pd.DataFrame, results: Mapping[str, Any], path: PathLike, *, metric: str = "auprc"
) -> Path:
    """Figure 2A: per-image localization utility, one box per method and per baseline.

    Parameters
    ----------
    per_image:
        The tidy per-image table; rows with ``criterion == "utility"`` and
        ``metric == metric`` are drawn. Rows of method ``"AVG"`` and ``"localizer"`` are the
        low (light blue) and high (dark blue) baselines.
    results:
        ``results.json`` as a dict; gives the method order and the verdicts.
    path:
        Where to write the PNG.
    metric:
        ``"auprc"`` (the paper's Figure 2) or ``"auroc"``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if metric not in ("auprc", "auroc"):
        raise ValueError(f"metric must be 'auprc' or 'auroc', got {metric!r}")
    rows = _select(per_image, criterion="utility", metric=metric)
    methods = _method_order(results)
    groups = [("AVG", "AVG", LOW_COLOUR, None), ("localizer", "localizer", HIGH_COLOUR, None)]
    colours = _method_colours(methods)
    for name in methods:
        criterion = _criterion(results, name, "utility")
        verdict = None
        if criterion is not None:
            verdict = (criterion.get("auroc") or {}) if metric == "auroc" else criterion
            verdict = verdict.get("verdict")
        groups.append((name, name, colours[name], verdict))
    fig = _new_figure((max(6.0, 0.9 * len(groups) + 2.0), 4.8))
    ax = fig.add_subplot()
    _boxes(ax, rows, groups)
    ax.set_ylabel(metric.upper())
    ax.set_ylim(-0.02, 1.02)
    _box_legend(ax, low="AVG mask (low baseline)")
    _finish(fig, f"Localization utility ({metric.upper()}) per test image", path)
    return Path(path)


def repro_boxplot(per_image: pd.DataFrame, results: Mapping[str, Any], path: PathLike) -> Path:
    """Figure 4A: repeatability (A1 vs A2) and reproducibility (A vs B) SSIM per method.

    One panel per criterion, each with the localizer's high baseline as a dark blue box and
    the low baseline SSIM 0.5 as a light blue dashed line; verdict marks above the boxes.
    """
    low = float(_get(results, "baselines", "low_ssim", default=0.5) or 0.5)
    methods = _method_order(results)
    colours = _method_colours(methods)
    fig = _new_figure((max(9.0, 1.5 * len(methods) + 4.0), 4.8))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, criterion in zip(axes, ("repeatability", "reproducibility")):
        rows = _select(per_image, criterion=criterion, metric="ssim")
        groups = [("localizer", "localizer", HIGH_COLOUR, None)]
        for name in methods:
            entry = _criterion(results, name, criterion)
            groups.append((name, name, colours[name], entry.get("verdict") if entry else None))
        _boxes(ax, rows, groups)
        ax.axhline(low, color=LOW_COLOUR, linestyle="--", linewidth=1.5, zorder=0)
        ax.set_title(criterion.capitalize(), pad=18)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("SSIM")
    _box_legend(axes[1], low=f"LOW = {low:g}", low_is_line=True)
    _finish(fig, "Repeatability and reproducibility of the maps (SSIM per test image)", path)
    return Path(path)


def _select(per_image: pd.DataFrame | None, **equal: str) -> pd.DataFrame | None:
    if per_image is None or len(per_image) == 0:
        return None
    missing = {"method", "value", *equal} - set(per_image.columns)
    if missing:
        raise ValueError(f"per_image lacks the column(s) {sorted(missing)}")
    keep = np.ones(len(per_image), dtype=bool)
    for column, value in equal.items():
        keep &= (per_image[column] == value).to_numpy()
    return per_image[keep]


def _values(rows: pd.DataFrame | None, method: str) -> np.ndarray:
    if rows is None:
        return np.empty(0)
    values = rows.loc[rows["method"] == method, "value"].to_numpy(dtype=np.float64)
    # A null in the CSV (an empty mask counted as skipped) is no observation.
    return values[np.isfinite(values)]


def _boxes(ax: Axes, rows: pd.DataFrame | None, groups: list[tuple[str, str, str, Any]]) -> None:
    """Draw one box per group with data; median solid, mean dashed; verdict mark above."""
    data, labels, colours, verdicts = [], [], [], []
    for method, label, colour, verdict in groups:
        values = _values(rows, method)
        if values.size:
            data.append(values)
            labels.append(label)
            colours.append(colour)
            verdicts.append(verdict)
    if not data:
        _no_data(ax)
        return
    positions = np.arange(1, len(data) + 1)
    parts = ax.boxplot(
        data,
        positions=positions,
        widths=0.6,
        patch_artist=True,
        showmeans=True,
        meanline=True,
        medianprops={"color": "black", "linestyle": "-", "linewidth": 1.5},
        meanprops={"color": "black", "linestyle": "--", "linewidth": 1.2},
        flierprops={"marker": ".", "markersize": 3, "alpha": 0.5},
    )
    for patch, colour in zip(parts["boxes"], colours):
        patch.set_facecolor(colour)
        patch.set_alpha(0.85)
    ax.set_xticks(positions, labels, rotation=30, ha="right")
    ax.set_xlim(0.4, len(data) + 0.6)
    # Marks sit just above the axes (x in data, y in axes fraction) so they never cover
    # a whisker, whatever the scores.
    for x, verdict in zip(positions, verdicts):
        if verdict in VERDICT_MARKS:
            ax.text(
                x,
                1.01,
                VERDICT_MARKS[verdict],
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=13,
                color=_VERDICT_COLOURS[verdict],
            )


def _box_legend(ax: Axes, *, low: str, low_is_line: bool = False) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    low_handle = (
        Line2D([], [], color=LOW_COLOUR, linestyle="--", linewidth=1.5)
        if low_is_line
        else Patch(facecolor=LOW_COLOUR)
    )
    handles = [
        low_handle,
        Patch(facecolor=HIGH_COLOUR),
        Line2D([], [], color="black", linestyle="-"),
        Line2D([], [], color="black", linestyle="--"),
    ]
    names = [low, "localizer (high baseline)", "median", "mean"]
    marks = "   ".join(f"{m} {v}" for v, m in VERDICT_MARKS.items())
    # Outside the axes, right of them, so it never hides a box.
    ax.legend(
        handles,
        names,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title=marks,
        title_fontsize=7,
    )


# ---------------------------------------------------------------------------------------
# curves and bars


def randomization_curves(results: Mapping[str, Any], path: PathLike) -> Path:
    """Figure 3A: mean SSIM to the trained map at each randomization stage, per method.

    Left panel: cascading randomization, ``"orig"`` (SSIM 1 by definition) then the stages
    from the logits down. Right panel: independent randomization, one block at a time. Each
    method's randomization baseline (mean SSIM of random pairs of different images) is a
    dotted line in the method's colour; a map has degraded when its curve ends below it.
    """
    methods = _method_order(results)
    colours = _method_colours(methods)
    fig = _new_figure((12.0, 4.8))
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("stages", "Cascading randomization"), ("independent", "Independent randomization"))
    for ax, (key, title) in zip(axes, panels):
        curves = {}
        for name in methods:
            entry = _criterion(results, name, "randomization")
            stages = (entry or {}).get(key) or []
            points = [(str(s.get("name")), _number(s.get("mean"))) for s in stages]
            if any(v is not None for _, v in points):
                curves[name] = [("orig", 1.0), *points]
        order = _ordered_union([[n for n, _ in c] for c in curves.values()])
        where = {n: i for i, n in enumerate(order)}
        for name, points in curves.items():
            x = [where[n] for n, v in points if v is not None]
            y = [v for _, v in points if v is not None]
            ax.plot(x, y, marker="o", markersize=3, color=colours[name], label=name)
            base = _randomization_baseline(results, name)
            if base is not None:
                ax.axhline(base, color=colours[name], linestyle=":", linewidth=1.2)
        if curves:
            ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
        else:
            _no_data(ax)
        ax.set_title(title)
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_xlabel("stage (top-down)")
    axes[1].set_xlabel("randomized block")
    axes[0].set_ylabel("mean SSIM to the trained map")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="lower left", title="dotted: baseline", title_fontsize=7)
    _finish(fig, "Sensitivity of the maps to the model's weights", path)
    return Path(path)


def faithfulness_plot(results: Mapping[str, Any], path: PathLike) -> Path:
    """Deletion and insertion AUC per method (mean ± sd) as grouped bars.

    Deletion removes the most salient pixels first (lower AUC is more faithful); insertion
    adds them first (higher is more faithful). Methods without faithfulness data are left out.
    """
    names, deletion, insertion = [], [], []
    for name in _method_order(results):
        entry = _criterion(results, name, "faithfulness") or {}
        d = entry.get("deletion_auc") or {}
        i = entry.get("insertion_auc") or {}
        if _number(d.get("mean")) is None and _number(i.get("mean")) is None:
            continue
        names.append(name)
        deletion.append((_number(d.get("mean")), _number(d.get("sd"))))
        insertion.append((_number(i.get("mean")), _number(i.get("sd"))))
    fig = _new_figure((max(6.0, 0.9 * len(names) + 2.5), 4.6))
    ax = fig.add_subplot()
    if not names:
        _no_data(ax)
    else:
        x = np.arange(len(names), dtype=np.float64)
        width = 0.38
        bars = (
            (deletion, -width / 2, "#d6604d", "deletion AUC (lower is better)"),
            (insertion, width / 2, "#4393c3", "insertion AUC (higher is better)"),
        )
        for pairs, shift, colour, label in bars:
            mean = np.array([m if m is not None else np.nan for m, _ in pairs])
            sd = np.array([s if s is not None else 0.0 for _, s in pairs])
            shown = np.isfinite(mean)
            ax.bar(
                x[shown] + shift,
                mean[shown],
                width,
                yerr=sd[shown],
                capsize=3,
                color=colour,
                label=label,
            )
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel("AUC of the normalized score curve")
        ax.legend(fontsize=8)
    _finish(fig, "Faithfulness: deletion and insertion AUC (mean ± sd)", path)
    return Path(path)


# ---------------------------------------------------------------------------------------
# example maps


def randomization_grid(
    image: Any,
    maps: Mapping[str, Any],
    stage_names: Sequence[str],
    path: PathLike,
    *,
    mask: Any | None = None,
) -> Path:
    """Figure 3B: one image's maps along cascading randomization, one row per method.

    Parameters
    ----------
    image:
        The image, ``(*spatial)``, ``(C, *spatial)`` or ``(1, C, *spatial)``.
    maps:
        ``{method: array (S + 1, *spatial)}``: index 0 is the trained model's map, index
        ``s`` the map after cascading randomization down to ``stage_names[s - 1]``. A method
        whose value is None is left out.
    stage_names:
        The ``S`` stage names, top-down.
    path:
        Where to write the PNG.
    mask:
        Optional ground-truth mask ``(*spatial)``, outlined on every panel.

    Columns are the image, the trained map and one per stage; all maps share one colour
    scale (their common range, [0, 1] for post-processed maps).
    """
    stage_names = [str(s) for s in stage_names]
    rows = {name: _as_float(m, f"maps[{name!r}]") for name, m in maps.items() if m is not None}
    spatial = None
    for name, stack in rows.items():
        if stack.shape[0] != len(stage_names) + 1 or stack.ndim not in (3, 4):
            raise ValueError(
                f"maps[{name!r}] must be (S + 1, *spatial) with S = {len(stage_names)} stages "
                f"and 2 or 3 spatial axes, got shape {stack.shape}"
            )
        _check_finite(stack, f"maps[{name!r}]")
        if spatial is not None and stack.shape[1:] != spatial:
            raise ValueError(f"maps[{name!r}] has spatial shape {stack.shape[1:]}, not {spatial}")
        spatial = stack.shape[1:]
    columns = ["image", "trained", *stage_names]
    if not rows:
        fig = _new_figure((6.0, 3.0))
        _no_data(fig.add_subplot())
        _finish(fig, "Maps under cascading randomization", path)
        return Path(path)
    img, outline, note = _image_and_mask(image, mask, spatial)
    slices = {name: [_slice(m) for m in stack] for name, stack in rows.items()}
    style = _shared_style([s for stack in slices.values() for s in stack])
    size = 1.7
    fig = _grid_figure((size * len(columns) + 1.0, size * len(rows) + 0.8))
    axes = np.atleast_2d(fig.subplots(len(rows), len(columns), squeeze=False))
    mappable = None
    for r, (name, stack) in enumerate(slices.items()):
        _image_panel(axes[r, 0], img, outline)
        for c, section in enumerate(stack, start=1):
            mappable = _map_panel(axes[r, c], img, section, outline, style)
        axes[r, 0].set_ylabel(name, fontsize=9)
    for c, column in enumerate(columns):
        axes[0, c].set_title(column, fontsize=8)
    _grid_colorbar(fig, mappable)
    _finish(fig, f"Maps under cascading randomization, trained to fully randomized{note}", path)
    return Path(path)


def _grid_figure(size: tuple[float, float]) -> Any:
    """A figure for a grid of image panels with a fixed layout: constrained layout spends
    seconds solving for dozens of panels whose sizes are all equal anyway."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.06, right=0.9, bottom=0.02, top=0.9, wspace=0.04, hspace=0.08)
    return fig


def _grid_colorbar(fig: Any, mappable: Any) -> None:
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7), label="<colorbar>")
    fig.colorbar(mappable, cax=cax, label="map")


def repro_examples(
    image: Any,
    maps: Mapping[str, Mapping[str, Any] | None],
    path: PathLike,
    *,
    mask: Any | None = None,
) -> Path:
    """Figure 4C: one image's maps from replicates A1 and A2 and from model B, per method.

    ``maps[method] = {"A1": map, "A2": map, "B": map}`` with maps ``(*spatial)``. Columns
    are methods; rows "A replicate 1", "A replicate 2" (repeatability) and "B"
    (reproducibility). A missing entry leaves its panel empty; a method whose value is None
    is left out. The mask, if given, is outlined on every panel.
    """
    keys = (("A1", "A replicate 1"), ("A2", "A replicate 2"), ("B", "B"))
    columns: dict[str, dict[str, np.ndarray]] = {}
    spatial = None
    for name, entry in maps.items():
        if entry is None:
            continue
        column = {}
        for key, _ in keys:
            if entry.get(key) is None:
                continue
            array = _as_float(entry[key], f"maps[{name!r}][{key!r}]")
            if array.ndim not in (2, 3):
                raise ValueError(
                    f"maps[{name!r}][{key!r}] must be (*spatial) with 2 or 3 axes, "
                    f"got shape {array.shape}"
                )
            _check_finite(array, f"maps[{name!r}][{key!r}]")
            if spatial is not None and array.shape != spatial:
                raise ValueError(
                    f"maps[{name!r}][{key!r}] has shape {array.shape}, other maps {spatial}"
                )
            spatial = array.shape
            column[key] = array
        if column:
            columns[name] = column
    title = "Repeatability (A1 vs A2) and reproducibility (A vs B): example maps"
    if not columns:
        fig = _new_figure((6.0, 3.0))
        _no_data(fig.add_subplot())
        _finish(fig, title, path)
        return Path(path)
    img, outline, note = _image_and_mask(image, mask, spatial)
    slices = {n: {k: _slice(a) for k, a in c.items()} for n, c in columns.items()}
    style = _shared_style([s for c in slices.values() for s in c.values()])
    size = 2.0
    fig = _grid_figure((size * len(columns) + 1.2, size * len(keys) + 0.8))
    axes = np.atleast_2d(fig.subplots(len(keys), len(columns), squeeze=False))
    mappable = None
    for c, (name, column) in enumerate(slices.items()):
        axes[0, c].set_title(name, fontsize=9)
        for r, (key, _) in enumerate(keys):
            if key in column:
                mappable = _map_panel(axes[r, c], img, column[key], outline, style)
            else:
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
                axes[r, c].text(0.5, 0.5, "not run", ha="center", va="center", fontsize=8)
    for r, (_, label) in enumerate(keys):
        axes[r, 0].set_ylabel(label, fontsize=9)
    if mappable is not None:
        _grid_colorbar(fig, mappable)
    _finish(fig, f"{title}{note}", path)
    return Path(path)


def _image_and_mask(
    image: Any, mask: Any | None, spatial: tuple[int, ...]
) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The image and mask as displayed 2D slices, and the title note for volumes."""
    ndim = len(spatial)
    img = None
    if image is not None:
        img = _as_float(image, "image")
        if img.shape[-ndim:] != tuple(spatial):
            raise ValueError(f"image shape {img.shape} and map spatial shape {spatial} differ")
        img = _collapse(img, ndim, "image", "mean")
        _check_finite(img, "image")
        img = _slice(img)
    outline = None
    if mask is not None:
        outline = _as_float(mask, "mask")
        if outline.shape != tuple(spatial):
            raise ValueError(f"mask shape {outline.shape} and map spatial shape {spatial} differ")
        outline = _slice(outline)
    note = f" (middle axial slice d={spatial[0] // 2} of {spatial[0]})" if ndim == 3 else ""
    return img, outline, note


def _slice(array: np.ndarray) -> np.ndarray:
    """A 2D array as it is; the middle axial slice of a 3D one."""
    return array[array.shape[0] // 2] if array.ndim == 3 else array


def _shared_style(sections: list[np.ndarray]) -> _Style:
    # One colour scale for the whole figure, so that a degraded map looks degraded next to
    # the trained one: [0, 1] for post-processed maps, else the common range of all panels.
    stack = np.stack(sections)
    if stack.min() >= 0.0 and stack.max() <= 1.0:
        return _Style(False, 0.0, 1.0, SEQUENTIAL_CMAP, _MAP_ALPHA, False)
    return _Style.of(stack, False, _MAP_ALPHA, SEQUENTIAL_CMAP, 100.0)


def _image_panel(ax: Axes, img: np.ndarray | None, outline: np.ndarray | None) -> None:
    if img is not None:
        low, high = np.percentile(img, [0.5, 99.5])
        ax.imshow(img, cmap="gray", vmin=low, vmax=high if high > low else low + 1.0)
    _outline(ax, outline)
    ax.set_xticks([])
    ax.set_yticks([])


def _map_panel(
    ax: Axes,
    img: np.ndarray | None,
    section: np.ndarray,
    outline: np.ndarray | None,
    style: _Style,
) -> Any:
    mappable = _draw(ax, img, section, style)
    _outline(ax, outline)
    if float(section.min()) == float(section.max()):
        ax.set_xlabel("constant map", fontsize=7)
    return mappable


def _outline(ax: Axes, outline: np.ndarray | None) -> None:
    # An empty or full mask has no boundary; contour would only warn.
    if outline is not None and float(outline.min()) < 0.5 <= float(outline.max()):
        ax.contour(outline, levels=[0.5], colors=_MASK_COLOUR, linewidths=0.8)


# ---------------------------------------------------------------------------------------
# reading results


def _get(tree: Mapping[str, Any] | None, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return default
        tree = tree[key]
    return tree


def _method_order(results: Mapping[str, Any]) -> list[str]:
    return [str(name) for name in (results.get("methods") or {})]


def _criterion(results: Mapping[str, Any], method: str, criterion: str) -> dict | None:
    entry = _get(results, "methods", method, criterion)
    return entry if isinstance(entry, Mapping) else None


def _number(value: Any) -> float | None:
    """A finite float, or None for null (and for NaN, which results.json should not hold)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _randomization_baseline(results: Mapping[str, Any], method: str) -> float | None:
    base = _number(_get(results, "methods", method, "randomization", "baseline", "mean"))
    if base is None:
        base = _number(_get(results, "baselines", "randomization", method, "mean"))
    return base


def _method_colours(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    # Blues are the baselines' colours, so methods take the other tab20 hues.
    palette = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (0, 1)]
    # Dark shade of each hue first, then the light ones: 18 distinct colours.
    return {name: palette[(2 * k) % 18 + (k // 9) % 2] for k, name in enumerate(methods)}


def _ordered_union(sequences: list[list[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for sequence in sequences:
        for item in sequence:
            seen.setdefault(item, None)
    return list(seen)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
