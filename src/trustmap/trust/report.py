"""The trust report: one self-contained HTML file from ``results.json`` and the figures.

The report computes nothing: it reads the results of the trust protocol (schema in the
protocol's documentation) and lays them out as Arun et al. 2021 does (Arun et al., Radiology: AI
2021, Tables 2, 3 and 4), after a one-screen summary of the verdicts. Figures are embedded as base64
data URIs and the style sheet is inline, so the file can be mailed or archived alone; it
needs no JavaScript and fetches nothing.

Conventions, as in Arun et al. 2021
----------------------------
* Means are given as ``mean ± sd`` with two decimals.
* P values drop the leading zero: ``<.001``, ``.004``, ``.02``, ``.23``; ``NA`` where no
  test applies (the baselines' own rows) or none could be computed.
* Verdict marks follow a p value: ``†`` did not pass, ``‡`` passed, ``§`` uncertain (the
  alternative hypotheses for pass or did not pass could not be shown). Against the low
  baselines (AVG, randomization baseline, SSIM 0.5) the mark is the criterion's verdict;
  against the localizer's high baseline it says whether the method was significantly
  below it (†), above it (‡) or neither (§), which informs but does not set the verdict.
* A statistic that could not be computed (null in ``results.json``) is shown as ``—``, with
  the reason from its ``note`` in the cell's tooltip.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmap.core.atomic import write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FIGURE_ALIASES", "FIGURE_CAPTIONS", "format_mean_sd", "format_p", "write_report"]

CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")
_CRITERION_HEADERS = {
    "utility": "Utility<br><small>AUPRC vs AVG mask</small>",
    "randomization": "Randomization<br><small>SSIM vs random pairs</small>",
    "repeatability": "Repeatability<br><small>SSIM A1 vs A2, vs 0.5</small>",
    "reproducibility": "Reproducibility<br><small>SSIM A vs B, vs 0.5</small>",
}
_VERDICT_WORDS = {
    "pass": "pass",
    "fail": "did not pass",
    "uncertain": "uncertain",
    None: "not run",
}
#: Arun et al.'s (2021) footnote marks.
_MARKS = {"fail": "\u2020", "pass": "\u2021", "uncertain": "\u00a7"}
_DASH = "\u2014"

#: Captions of the figures, by the name of the function in :mod:`trustmap.trust.figures`
#: that draws them; figures are shown in this order, others after them. A key of
#: ``figures`` given to :func:`write_report` takes the caption of the longest of these
#: names, or of the aliases in :data:`FIGURE_ALIASES`, that it starts with: ``"utility"``
#: and ``"utility_boxplot_auroc"`` both take ``"utility_boxplot"``'s, with ``"auroc"``
#: added.
FIGURE_CAPTIONS = {
    "utility_boxplot": (
        "Localization utility per test image (after Arun et al. 2021, Figure 2A). One box per "
        "method, with the AVG mask (low baseline, light blue) and the localizer (high "
        "baseline, dark blue); solid line median, dashed line mean. Above each box: "
        "\u2713 pass, \u2717 did not pass, ? uncertain against AVG."
    ),
    "randomization_curves": (
        "Sensitivity to the model's weights (after Arun et al. 2021, Figure 3A). Mean SSIM between "
        "the trained model's map and the map after cascading randomization from the logits "
        "down (left) and after randomizing one block at a time (right). Dotted lines in each "
        "method's colour are its randomization baseline (mean SSIM of random pairs of "
        "different images); a map has degraded when it ends below its baseline."
    ),
    "randomization_grid": (
        "Example maps of one test image along cascading randomization (after Arun et al. 2021, "
        "Figure 3B): the image, the trained model's map, then one map per randomized stage; "
        "the ground-truth mask is outlined."
    ),
    "repro_boxplot": (
        "Repeatability (two replicates of architecture A) and reproducibility (A vs "
        "architecture B) SSIM per test image (after Arun et al. 2021, Figure 4A), with the low "
        "baseline SSIM 0.5 (light blue dashed line) and two localizers trained with "
        "different seeds (high baseline, dark blue box)."
    ),
    "repro_examples": (
        "Example maps of one test image from replicate 1 and replicate 2 of architecture A "
        "and from architecture B (after Arun et al. 2021, Figure 4C); the ground-truth mask is "
        "outlined."
    ),
    "faithfulness_plot": (
        "Faithfulness beyond Arun et al. 2021: area under the deletion curve (most salient pixels "
        "removed first; lower is better) and the insertion curve (added first; higher is "
        "better), mean \u00b1 sd over test images."
    ),
}
#: Other names of the figures (key prefixes) -> the drawing function's name.
FIGURE_ALIASES = {
    "utility": "utility_boxplot",
    "randomization": "randomization_curves",
    "randomization_curve": "randomization_curves",
    "cascade": "randomization_grid",
    "repro": "repro_boxplot",
    "repeatability": "repro_boxplot",
    "reproducibility": "repro_boxplot",
    "repro_example": "repro_examples",
    "repeatability_example": "repro_examples",
    "reproducibility_example": "repro_examples",
    "faithfulness": "faithfulness_plot",
    **{name: name for name in FIGURE_CAPTIONS},
}
_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 72em; padding: 0 1em; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #c8c8c8; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f1f3f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.baseline td { background: #f7f9fc; font-style: italic; }
.statement { font-size: 1.3em; font-weight: 600; padding: 0.5em 0.8em; border-radius: 4px;
             display: inline-block; margin: 0.4em 0; }
.statement.none { background: #fde8e8; border: 1px solid #c62828; }
.statement.some { background: #e6f4ea; border: 1px solid #1a7f37; }
td.v-pass { background: #d8f0de; }
td.v-fail { background: #f9d6d5; }
td.v-uncertain { background: #fff1c7; }
td.v-none { background: #ececec; color: #555; }
.facts { margin: 0.3em 0; padding-left: 1.2em; }
.note, .foot { color: #444; font-size: 0.88em; }
.warning { color: #8a1c1c; font-weight: 600; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #333; max-width: 60em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { background: #f1f3f5; padding: 0 0.2em; }
[title] { text-decoration-style: dotted; }
"""


# ---------------------------------------------------------------------------------------
# number formatting


def format_p(p: float | None) -> str:
    """A p value in the style of Arun et al. (2021): ``"<.001"``, ``".004"``, ``".02"``,
    ``".23"``, ``"NA"``.

    Values below .01 keep three decimals (the paper writes ``P = .004``), others two; the
    leading zero is dropped as p cannot exceed 1. None (and NaN, which results should never
    hold) gives ``"NA"``.

    Raises
    ------
    ValueError
        If ``p`` is a number outside [0, 1].
    """
    value = _number(p)
    if value is None:
        return "NA"
    if not -1e-9 <= value <= 1.0 + 1e-9:  # a tolerance for floating-point round-off
        raise ValueError(f"a p value must lie in [0, 1], got {p!r}")
    if value < 0.001:
        return "<.001"
    text = f"{value:.3f}" if value < 0.01 else f"{value:.2f}"
    if text.startswith("1"):
        return ">.99"
    return text.removeprefix("0")


def format_mean_sd(mean: float | None, sd: float | None) -> str:
    """``"0.15 ± 0.18"`` (two decimals); the mean alone without sd; ``"—"`` without mean."""
    m = _number(mean)
    if m is None:
        return _DASH
    s = _number(sd)
    return f"{m:.2f}" if s is None else f"{m:.2f} \u00b1 {s:.2f}"


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _format_seconds(seconds: float | None) -> str:
    s = _number(seconds)
    if s is None:
        return _DASH
    if s < 60:
        return f"{s:.1f} s"
    minutes, rest = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ---------------------------------------------------------------------------------------
# the report


def write_report(
    results: Mapping[str, Any],
    figures: Mapping[str, str | os.PathLike[str]],
    path: str | os.PathLike[str],
    *,
    per_image: pd.DataFrame | None = None,
    title: str = "trustmap trust report",
) -> Path:
    """Write the trust report as one self-contained HTML file and return its path.

    Parameters
    ----------
    results:
        ``results.json`` of the trust protocol, as a dict. Missing parts (a criterion that
        was not run, absent timings) are shown as such, never guessed.
    figures:
        ``{name: path}`` of the figures to embed (PNG, JPEG, GIF or SVG); names are those of
        the functions in :mod:`trustmap.trust.figures` that drew them (see
        :data:`FIGURE_CAPTIONS`), which choose the caption. A missing file is reported in
        the page in place of its figure.
    path:
        Where to write the HTML, atomically.
    per_image:
        The per-image table, if at hand; only counts are taken from it (images per
        criterion).
    title:
        Page title.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a mapping (results.json), got {type(results).__name__}")
    from trustmap.trust import readable

    methods = [str(m) for m in (results.get("methods") or {})]
    figures = dict(figures)
    gallery = figures.pop("case_gallery", None)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}{_READABLE_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        readable.plain_language(results),
        _summary(results, methods, per_image),
        readable.effect_table(results, per_image),
        readable.data_section(results),
        readable.gallery_section(
            _data_uri(gallery) if gallery else None,
            results.get("explainability_failure_images") or {},
        ),
        _table_utility_randomization(results, methods),
        _table_auroc(results, methods),
        _table_randomized_utility(results, methods),
        _table_repro(results, methods),
        _table_faithfulness(results, methods),
        _figures(figures),
        _timings(results),
        _appendix(results),
        _reproduce(results),
        "</body></html>",
    ]
    return write_text_atomic(path, "\n".join(parts) + "\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _get(tree: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return default
        tree = tree[key]
    return tree


def _criterion(results: Mapping[str, Any], method: str, criterion: str) -> Mapping | None:
    entry = _get(results, "methods", method, criterion)
    return entry if isinstance(entry, Mapping) else None


def _verdict(results: Mapping[str, Any], method: str, criterion: str) -> str | None:
    verdict = _get(_criterion(results, method, criterion), "verdict")
    if verdict is None:
        verdict = _get(results, "summary", "verdicts", method, criterion)
    return verdict if verdict in _MARKS else None


def _alpha(results: Mapping[str, Any]) -> float:
    alpha = _number(_get(results, "config", "alpha"))
    return alpha if alpha is not None and 0.0 < alpha < 1.0 else 0.05


def _note(entry: Any) -> str | None:
    note = _get(entry, "note")
    return str(note) if note else None


def _cell(text: str, *, note: str | None = None, numeric: bool = True, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if numeric else "", cls) if c)
    attrs = f' class="{classes}"' if classes else ""
    if note:
        attrs += f' title="{_e(note)}"'
    return f"<td{attrs}>{text}</td>"


def _stat_cell(entry: Any, *, missing: str = "not run") -> str:
    """``mean ± sd`` of a ``{"mean", "sd", "n", "note"}`` entry; ``—`` with a tooltip if null."""
    if not isinstance(entry, Mapping):
        return _cell(_DASH, note=missing)
    mean = _number(entry.get("mean"))
    if mean is None:
        return _cell(_DASH, note=_note(entry) or "not computed")
    n, pairs = entry.get("n"), entry.get("n_pairs")
    tip = _note(entry)
    if tip is None and isinstance(n, int) and not isinstance(n, bool):
        tip = f"n = {n}"
    elif tip is None and isinstance(pairs, int) and not isinstance(pairs, bool):
        tip = f"{pairs} random pairs"
    return _cell(_e(format_mean_sd(mean, entry.get("sd"))), note=tip)


def _p_cell(p: Any, mark_for: str | None, *, note: str | None = None) -> str:
    """A p value with its verdict mark (``mark_for`` is a verdict, or None for no mark)."""
    text = format_p(p)
    if text != "NA" and mark_for in _MARKS:
        text += f" {_MARKS[mark_for]}"
    return _cell(_e(text), note=note)


def _high_mark(method_mean: Any, high: Mapping | None, alpha: float) -> str | None:
    """Mark against a high baseline: significantly below (†), above (‡), or neither (§)."""
    p, m = _number(_get(high, "p_value")), _number(method_mean)
    base = _number(_get(high, "mean"))
    if p is None:
        return None
    if p >= alpha:
        return "uncertain"
    if m is None or base is None:
        return None
    return "fail" if m < base else "pass"


def _na_cells(count: int) -> str:
    return "".join(_cell("NA") for _ in range(count))


def _footnote_marks() -> str:
    return (
        '<p class="foot">\u2020 Did not pass the test. \u2021 Passed the test. '
        "\u00a7 The alternative hypotheses for pass or did not pass could not be shown "
        "(not significant). Against the localizer the mark tells whether the method was "
        "significantly below (\u2020) or above (\u2021) this high baseline; it does not set "
        "the verdict. Two-sided tests; hover over a value for n or for why it is missing.</p>"
    )


# ---------------------------------------------------------------------------------------
# sections


def _summary(results: Mapping[str, Any], methods: list[str], per_image: Any) -> str:
    verdicts = {m: {c: _verdict(results, m, c) for c in CRITERIA} for m in methods}
    passing = [m for m in methods if all(v == "pass" for v in verdicts[m].values())]
    if passing:
        statement = (
            f'<p class="statement some">Passed all four criteria: {_e(", ".join(passing))}.</p>'
        )
    else:
        statement = '<p class="statement none">No method passed all four criteria.</p>'
    out = ['<section id="summary"><h2>Summary</h2>', statement]
    recorded = _get(results, "summary", "passes_all")
    if isinstance(recorded, list) and sorted(map(str, recorded)) != sorted(passing):
        out.append(
            '<p class="warning">results.json lists as passing all criteria: '
            f"{_e(', '.join(map(str, recorded)) or 'none')}, which disagrees with the verdicts "
            "below; the verdicts are shown as recorded.</p>"
        )
    not_run = [m for m in methods if any(v is None for v in verdicts[m].values())]
    if not_run:
        out.append(
            f'<p class="note">Not every criterion was run for: {_e(", ".join(not_run))}; '
            "a method passes all four only with a pass on each.</p>"
        )
    # The verdict matrix: words and marks carry the meaning, colour only helps.
    rows = ["<table><tr><th>Method</th>"]
    rows += [f"<th>{_CRITERION_HEADERS[c]}</th>" for c in CRITERIA]
    rows.append("</tr>")
    for m in methods:
        cells = []
        for c in CRITERIA:
            v = verdicts[m][c]
            word = _VERDICT_WORDS[v] + (f" {_MARKS[v]}" if v in _MARKS else "")
            cells.append(_cell(_e(word), numeric=False, cls=f"v-{v or 'none'}"))
        rows.append(f"<tr><td>{_e(m)}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    out.append("".join(rows) if methods else '<p class="note">No method in the results.</p>')
    out.append(_facts(results, methods, per_image))
    out.append("</section>")
    return "\n".join(out)


def _facts(results: Mapping[str, Any], methods: list[str], per_image: Any) -> str:
    config = results.get("config") if isinstance(results.get("config"), Mapping) else {}
    items = []
    dataset = results.get("dataset", config.get("dataset"))
    if dataset is not None:
        from trustmap.trust.readable import describe_data

        items.append(f"<li>Data: {describe_data(dataset)}</li>")
    counts = _image_counts(per_image)
    if counts:
        text = ", ".join(f"{_e(c)} {n}" for c, n in counts.items())
        items.append(f"<li>Test images per criterion: {text}</li>")
    else:
        n = max((_get(_criterion(results, m, "utility"), "n") or 0 for m in methods), default=0)
        if isinstance(n, int) and n:
            items.append(f"<li>Positive test images scored for utility: {n}</li>")
    total = _total_seconds(results.get("timings"))
    runs = results.get("run_time") if isinstance(results.get("run_time"), Mapping) else {}
    if runs.get("runs", 1) > 1:
        items.append(
            f"<li>Total time: {_e(_format_seconds(runs.get('all_runs')))} over "
            f"{_e(runs.get('runs'))} runs (this resumed run: "
            f"{_e(_format_seconds(runs.get('this_run', total)))})</li>"
        )
    else:
        items.append(f"<li>Total time: {_e(_format_seconds(total))}</li>")
    items.append(
        f"<li>Each verdict is a two-sided test at the {_alpha(results):g} level over all test "
        "images (details in the appendix).</li>"
    )
    notes = results.get("notes")
    if isinstance(notes, (list, tuple)):
        items.extend(f"<li>{_e(note)}</li>" for note in notes if str(note).startswith("WARNING"))
    out = [f'<ul class="facts">{"".join(items)}</ul>']
    models = results.get("models")
    if isinstance(models, Mapping) and models:
        rows = ["<table><tr><th>Model</th><th>Architecture</th><th>Seed</th><th>Test AUC</th></tr>"]
        for role, info in models.items():
            info = info if isinstance(info, Mapping) else {}
            auc = _number(info.get("test_auc"))
            auc_cell = (
                _cell(f"{auc:.3f}")
                if auc is not None
                else _cell(_DASH, note=_note(info) or "no test AUC recorded")
            )
            seed = info.get("seed")
            rows.append(
                f"<tr><td>{_e(role)}</td><td>{_e(info.get('arch', _DASH))}</td>"
                f"{_cell(_e(seed) if seed is not None else _DASH)}{auc_cell}</tr>"
            )
        rows.append("</table>")
        out.append("".join(rows))
    return "\n".join(out)


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{_e(k)}: {_e(v)}" for k, v in value.items())
    return _e(value)


def _image_counts(per_image: Any) -> dict[str, int]:
    if per_image is None or len(per_image) == 0:
        return {}
    if not {"criterion", "image"} <= set(per_image.columns):
        return {}
    counts = per_image.groupby("criterion", sort=False)["image"].nunique()
    return {str(k): int(v) for k, v in counts.items()}


def _table_utility_randomization(results: Mapping[str, Any], methods: list[str]) -> str:
    alpha = _alpha(results)
    out = [
        '<section id="table3"><h2>Utility and randomization (Arun et al. 2021, Table 3)</h2>',
        "<table><tr><th rowspan=2>Method</th><th colspan=3>Utility</th>"
        "<th colspan=3>Randomization (SSIM)</th></tr>"
        "<tr><th>AUPRC</th><th>P value (AVG)</th><th>P value (localizer)</th>"
        "<th>Baseline</th><th>Fully randomized</th><th>P value</th></tr>",
    ]
    for name, key in (("AVG", "avg_mask"), ("localizer", "localizer")):
        entry = _get(results, "baselines", key, "auprc")
        out.append(
            f'<tr class="baseline"><td>{_e(name)}</td>{_stat_cell(entry)}{_na_cells(5)}</tr>'
        )
    skipped = {}
    for m in methods:
        util = _criterion(results, m, "utility")
        rand = _criterion(results, m, "randomization")
        cells = [_stat_cell(util)]
        if util is None:
            cells.append(_cell(_DASH, note="not run") * 2)
        else:
            cells.append(
                _p_cell(util.get("p_value"), _verdict(results, m, "utility"), note=_note(util))
            )
            high = util.get("high_baseline")
            cells.append(
                _p_cell(
                    _get(high, "p_value"),
                    _high_mark(util.get("mean"), high, alpha),
                    note=_note(high),
                )
            )
            if isinstance(util.get("n_skipped_empty"), int) and util["n_skipped_empty"]:
                skipped[m] = util["n_skipped_empty"]
        if rand is None:
            cells.append(_cell(_DASH, note="not run") * 3)
        else:
            base = rand.get("baseline")
            if _number(_get(base, "mean")) is None:
                base = _get(results, "baselines", "randomization", m)
            cells += [
                _stat_cell(base),
                _stat_cell(rand),
                _p_cell(
                    rand.get("p_value"), _verdict(results, m, "randomization"), note=_note(rand)
                ),
            ]
        out.append(f"<tr><td>{_e(m)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    out.append(
        '<p class="foot">Data are mean \u00b1 sd over test images. Utility: AUPRC of the map '
        "against the ground-truth mask per positive test image; P value (AVG) against the "
        "average training mask (pass: significantly higher), P value (localizer) against "
        "the trained localizer. Randomization: SSIM between the trained model's map and the "
        "fully randomized model's map, against the method's randomization baseline (mean "
        "SSIM of random pairs of different images; pass: significantly lower).</p>"
    )
    if skipped:
        text = ", ".join(f"{_e(m)} {n}" for m, n in skipped.items())
        out.append(f'<p class="foot">Images skipped for an empty mask: {text}.</p>')
    out.append(_footnote_marks())
    out.append("</section>")
    return "\n".join(out)


def _table_auroc(results: Mapping[str, Any], methods: list[str]) -> str:
    alpha = _alpha(results)
    out = [
        '<section id="table2"><h2>Utility as AUROC (Arun et al. 2021, Table 2)</h2>',
        "<table><tr><th>Method</th><th>AUROC</th><th>P value (AVG)</th>"
        "<th>P value (localizer)</th></tr>",
    ]
    for name, key in (("AVG", "avg_mask"), ("localizer", "localizer")):
        entry = _get(results, "baselines", key, "auroc")
        out.append(
            f'<tr class="baseline"><td>{_e(name)}</td>{_stat_cell(entry)}{_na_cells(2)}</tr>'
        )
    for m in methods:
        auroc = _get(_criterion(results, m, "utility"), "auroc")
        if not isinstance(auroc, Mapping):
            cells = _stat_cell(None) + _cell(_DASH, note="not run") * 2
        else:
            verdict = auroc.get("verdict") if auroc.get("verdict") in _MARKS else None
            high = auroc.get("high_baseline")
            cells = (
                _stat_cell(auroc)
                + _p_cell(auroc.get("p_value"), verdict, note=_note(auroc))
                + _p_cell(_get(high, "p_value"), _high_mark(auroc.get("mean"), high, alpha))
            )
        out.append(f"<tr><td>{_e(m)}</td>{cells}</tr>")
    out.append("</table>")
    out.append(_footnote_marks())
    out.append("</section>")
    return "\n".join(out)


def _table_randomized_utility(results: Mapping[str, Any], methods: list[str]) -> str:
    rows = []
    for m in methods:
        util = _criterion(results, m, "utility")
        randomized = _get(util, "randomized")
        if not isinstance(randomized, Mapping):
            continue
        rows.append(
            f"<tr><td>{_e(m)}</td>{_stat_cell(util)}{_stat_cell(randomized)}"
            f"{_p_cell(randomized.get('p_value'), None, note=_note(randomized))}</tr>"
        )
    if not rows:
        return ""
    return "\n".join(
        [
            '<section id="randomized-utility"><h2>Utility of maps from the fully randomized '
            "model</h2>",
            "<table><tr><th>Method</th><th>AUPRC, trained</th><th>AUPRC, fully randomized</th>"
            "<th>P value</th></tr>",
            *rows,
            "</table>",
            '<p class="foot">A map that explains the trained model should localize better than '
            "the map of the same model with all weights randomized (Arun et al. 2021, "
            "Results).</p>",
            "</section>",
        ]
    )


def _table_repro(results: Mapping[str, Any], methods: list[str]) -> str:
    alpha = _alpha(results)
    low = _number(_get(results, "baselines", "low_ssim"))
    low = 0.5 if low is None else low
    out = [
        '<section id="table4"><h2>Repeatability and reproducibility '
        "(Arun et al. 2021, Table 4)</h2>",
        "<table><tr><th rowspan=2>Method</th><th colspan=3>Repeatability</th>"
        "<th colspan=3>Reproducibility</th></tr>"
        "<tr><th>SSIM</th><th>P value (localizer)</th><th>P value (LOW)</th>"
        "<th>SSIM</th><th>P value (localizer)</th><th>P value (LOW)</th></tr>",
    ]
    rep_high = _get(results, "baselines", "repeatability_high")
    pro_high = _get(results, "baselines", "reproducibility_high")
    out.append(
        f'<tr class="baseline"><td>localizer</td>{_stat_cell(rep_high)}{_na_cells(2)}'
        f"{_stat_cell(pro_high)}{_na_cells(2)}</tr>"
    )
    low_cell = _cell(_e(f"{low:g}"))
    out.append(
        f'<tr class="baseline"><td>LOW</td>{low_cell}{_na_cells(2)}{low_cell}{_na_cells(2)}</tr>'
    )
    for m in methods:
        cells = []
        for criterion in ("repeatability", "reproducibility"):
            entry = _criterion(results, m, criterion)
            if entry is None:
                cells.append(_stat_cell(None) + _cell(_DASH, note="not run") * 2)
                continue
            high = entry.get("high_baseline")
            cells.append(
                _stat_cell(entry)
                + _p_cell(
                    _get(high, "p_value"),
                    _high_mark(entry.get("mean"), high, alpha),
                    note=_note(high),
                )
                + _p_cell(entry.get("p_value"), _verdict(results, m, criterion), note=_note(entry))
            )
        out.append(f"<tr><td>{_e(m)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    out.append(
        '<p class="foot">Data are mean \u00b1 sd over test images. Repeatability: SSIM between '
        "the maps of two replicates of architecture A trained with different seeds; "
        "reproducibility: SSIM between the maps of A and of architecture B. P value (LOW) "
        f"against the low baseline SSIM {low:g} (pass: significantly higher); P value "
        "(localizer) against the same SSIM for two localizers trained with different seeds."
        "</p>"
    )
    out.append(_footnote_marks())
    out.append("</section>")
    return "\n".join(out)


def _table_faithfulness(results: Mapping[str, Any], methods: list[str]) -> str:
    out = [
        '<section id="faithfulness"><h2>Faithfulness (beyond Arun et al. 2021)</h2>',
        "<table><tr><th>Method</th><th>Deletion AUC</th><th>Insertion AUC</th>"
        "<th>Completeness gap</th><th>Sensitivity-n (n: r)</th>"
        "<th>Explainability failures</th></tr>",
    ]
    for m in methods:
        entry = _criterion(results, m, "faithfulness")
        if entry is None:
            out.append(f"<tr><td>{_e(m)}</td>{_cell(_DASH, note='not run') * 5}</tr>")
            continue
        gap = entry.get("completeness_gap")
        gap_cell = (
            _stat_cell(gap)
            if isinstance(gap, Mapping)
            else _cell(_DASH, note="completeness does not apply to this method")
        )
        out.append(
            f"<tr><td>{_e(m)}</td>{_stat_cell(entry.get('deletion_auc'))}"
            f"{_stat_cell(entry.get('insertion_auc'))}{gap_cell}"
            f"{_sensitivity_cell(entry.get('sensitivity_n'))}"
            f"{_failures_cell(entry.get('explainability_failures'))}</tr>"
        )
    out.append("</table>")
    out.append(
        '<p class="foot">Deletion / insertion AUC: area under the model score as the most '
        "salient pixels are removed / added first (lower / higher is more faithful). "
        "Completeness gap: |sum of the attribution \u2212 (f(x) \u2212 f(baseline))|, for "
        "methods where completeness holds by design. Sensitivity-n: correlation between the "
        "attribution summed over n random pixels and the score change when they are removed. "
        "Explainability failures: correct positive predictions whose map localizes worse than "
        "the AVG mask (Borys et al. 2023, section 3).</p>"
    )
    out.append("</section>")
    return "\n".join(out)


def _sensitivity_cell(entry: Any) -> str:
    ns, rs = _get(entry, "n"), _get(entry, "correlation")
    if not isinstance(ns, list) or not isinstance(rs, list) or not ns:
        return _cell(_DASH, note=_note(entry) or "not computed")
    pairs = []
    for n, r in zip(ns, rs):
        value = _number(r)
        pairs.append(f"{_e(n)}: {value:.2f}" if value is not None else f"{_e(n)}: {_DASH}")
    return _cell(", ".join(pairs), numeric=False)


def _failures_cell(entry: Any) -> str:
    count, total = _get(entry, "count"), _get(entry, "n_correct_positive")
    if not isinstance(count, int) or isinstance(count, bool):
        return _cell(_DASH, note=_note(entry) or "not computed")
    suffix = f" of {_e(total)}" if isinstance(total, int) and not isinstance(total, bool) else ""
    return _cell(f"{count}{suffix}")


def _figure_key(name: str) -> tuple[str | None, str]:
    """The caption's key for a figure name, and what the name adds to it (``"auroc"``)."""
    matches = [alias for alias in FIGURE_ALIASES if name.startswith(alias)]
    if not matches:
        return None, ""
    alias = max(matches, key=len)
    rest = name[len(alias) :]
    rest = "" if rest == "s" else rest.strip("_")  # the plural of an alias adds nothing
    return FIGURE_ALIASES[alias], rest.replace("_", " ")


def _figures(figures: Mapping[str, str | os.PathLike[str]]) -> str:
    order = list(FIGURE_CAPTIONS)

    def rank(item: tuple[str, Any]) -> int:
        key = _figure_key(str(item[0]))[0]
        return order.index(key) if key is not None else len(order)

    out = ['<section id="figures"><h2>Figures</h2>']
    for number, (name, file) in enumerate(sorted(figures.items(), key=rank), start=1):
        key, rest = _figure_key(str(name))
        caption = _e(FIGURE_CAPTIONS[key]) if key else f"{_e(name)}."
        if key and rest:
            caption += f" ({_e(rest)})"
        file = Path(file)
        mime = _MIME.get(file.suffix.lower())
        if mime is None:
            out.append(f'<p class="warning">Figure {_e(name)}: unsupported format {_e(file)}.</p>')
            continue
        try:
            data = base64.b64encode(file.read_bytes()).decode("ascii")
        except OSError as error:
            out.append(
                f'<p class="warning">Figure {_e(name)} could not be read from {_e(file)}: '
                f"{_e(error.strerror or error)}.</p>"
            )
            continue
        out.append(
            f'<figure><img src="data:{mime};base64,{data}" alt="{_e(name)}">'
            f"<figcaption><b>Figure {number}.</b> {caption}</figcaption></figure>"
        )
    if not figures:
        out.append('<p class="note">No figures were drawn.</p>')
    out.append("</section>")
    return "\n".join(out)


def _total_seconds(timings: Any) -> float | None:
    if not isinstance(timings, Mapping):
        return None
    total = _number(timings.get("total"))
    if total is None:
        stages = [_number(v) for k, v in timings.items() if k != "total"]
        stages = [v for v in stages if v is not None]
        total = sum(stages) if stages else None
    return total


def _timings(results: Mapping[str, Any]) -> str:
    timings = results.get("timings")
    out = ['<section id="timings"><h2>Time per stage</h2>']
    if not isinstance(timings, Mapping) or not timings:
        out.append('<p class="note">No timings recorded.</p></section>')
        return "\n".join(out)
    total = _total_seconds(timings)
    out.append("<table><tr><th>Stage</th><th>Seconds</th><th>Share of total</th></tr>")
    for stage, seconds in timings.items():
        if stage == "total":
            continue
        s = _number(seconds)
        share = f"{100.0 * s / total:.1f} %" if s is not None and total else _DASH
        out.append(
            f"<tr><td>{_e(stage)}</td>{_cell(f'{s:.1f}' if s is not None else _DASH)}"
            f"{_cell(share)}</tr>"
        )
    out.append(
        f"<tr><th>total</th>{_cell(f'{total:.1f}' if total is not None else _DASH)}"
        f"{_cell('100 %' if total else _DASH)}</tr></table></section>"
    )
    return "\n".join(out)


_READABLE_CSS = """
.plain { border: 2px solid #3b6ea5; border-radius: 6px; padding: .2em 1em .6em;
  background: #f3f7fc; max-width: 60em; }
#gallery img { max-width: 100%; }
"""


def _data_uri(file: str | os.PathLike[str]) -> str | None:
    path = Path(file)
    mime = _MIME.get(path.suffix.lower())
    try:
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


def _appendix(results: Mapping[str, Any]) -> str:
    """What developers and reviewers need and readers do not: the statistics in detail,
    every note, the dataset record with its paths, the cache counts."""
    alpha = _alpha(results)
    items = [
        "<li>Statistics: linear mixed-effects model (method fixed, image random intercept; "
        f"statsmodels), two-sided, alpha {alpha:g}; Tukey HSD post hoc.</li>"
    ]
    notes = results.get("notes")
    if isinstance(notes, (list, tuple)):
        items.extend(f"<li>{_e(n)}</li>" for n in notes if not str(n).startswith("WARNING"))
    dataset = results.get("dataset")
    if dataset is not None:
        items.append(f"<li>Dataset record: {_describe(dataset)}</li>")
    cache = results.get("cache")
    if isinstance(cache, Mapping):
        items.append(f"<li>Cache: {_describe(cache)}</li>")
    runs = results.get("run_time")
    if isinstance(runs, Mapping):
        items.append(f"<li>Run time record: {_describe(runs)}</li>")
    return f'<section id="appendix"><h2>Appendix</h2><ul>{"".join(items)}</ul></section>'


def _reproduce(results: Mapping[str, Any]) -> str:
    config = results.get("config")
    versions = results.get("versions")
    out = [
        '<section id="reproduce"><h2>Configuration and versions</h2>',
        "<p>To reproduce this run, save the configuration below to a file (JSON is valid "
        "YAML, so <code>trust.yaml</code> will do) and run "
        "<code>trustmap trust --config &lt;file&gt;</code>. "
        '<code>results["config"]</code> in <code>results.json</code> holds everything the run '
        "used, including seeds.</p>",
    ]
    if isinstance(versions, Mapping) and versions:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in versions.items())
        out.append(f"<table><tr><th>Package</th><th>Version</th></tr>{rows}</table>")
    text = json.dumps(_finite(config), indent=2, ensure_ascii=False, default=str)
    out.append(f"<pre>{_e(text)}</pre>")
    out.append("</section>")
    return "\n".join(out)


def _finite(value: Any) -> Any:
    """The config with non-finite floats as null, so the JSON shown is valid and loadable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
