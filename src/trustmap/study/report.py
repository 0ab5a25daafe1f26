"""``analyze_study``: load and de-blind a study, analyse it, write the report.

Outputs in ``out``: ``report.html`` (self-contained: tables in the form of Katzmann et
al. 2021's Tables 2-4, their Figures 7-9, reliability, KMO, the variant and order
checks, the mixed models; or the reader-performance tables), ``analysis.json``,
``answers.csv`` (the de-randomized answers), ``table2_raw.csv``, ``table3_z.csv``,
``table4_rank.csv`` and the figures as PNG. With ``simulate``, the study's layout is
filled with simulated readers in a copy (``simulated_study.sqlite``; the real answers are
never touched), that copy is analysed, and ``power.json`` holds the Monte-Carlo power.
Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trustmap.core.atomic import write_bytes_atomic, write_text_atomic
from trustmap.study.analysis import (
    PCAResult,
    RatingAnalysis,
    ReaderPerformanceAnalysis,
    analyze_ratings,
    analyze_reader_performance,
    ratings_frame,
    readings_frame,
)
from trustmap.study.server import rows_to_csv
from trustmap.study.simulate import SimulationSpec, power, simulate_ratings
from trustmap.study.store import Study, read_admin_key, study_path, transaction
from trustmap.trust.report import format_p

__all__ = ["StudyResult", "analyze_study", "write_report"]

_DASH = "\u2014"
_CLASS_COLOURS = ["#1f5fbf", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00"]


@dataclass(frozen=True)
class StudyResult:
    """What :func:`analyze_study` wrote and computed."""

    out: Path
    design: str
    analysis: RatingAnalysis | ReaderPerformanceAnalysis
    files: dict[str, Path]
    power: dict[str, Any] | None
    simulated: bool


# ---------------------------------------------------------------------------------------
# simulation into a copy


def fill_simulated(study: Study, admin_key: str, spec: SimulationSpec, seed: int) -> int:
    """Replace every answer of ``study`` (a copy!) by simulated ratings; returns the count."""
    if study.meta["design"] != "rating":
        raise ValueError("--simulate needs a rating study (the reader-performance design has none)")
    frame = design_of(study, admin_key)
    values = simulate_ratings(frame, spec, scale=_scale(study), seed=seed)
    now = time.time()
    con = study.con
    with transaction(con):
        con.execute("DELETE FROM answers")
        con.execute("DELETE FROM answer_log")
        con.executemany(
            "INSERT INTO answers (item_id, reader_id, value, time_ms, updated_at, revision) "
            "VALUES (?, ?, ?, NULL, ?, 1)",
            [(i, int(r), int(v), now) for i, r, v in zip(frame["item"], frame["reader"], values)],
        )
    return len(values)


def design_of(study: Study, admin_key: str) -> pd.DataFrame:
    """Every rating panel of the study (answered or not), de-blinded."""
    key = study.blinding_key(admin_key)
    rows = study.con.execute(
        """
        SELECT q.reader_id, r.variant, q.seq, q.case_id, c.label, q.criterion, i.item_id,
               i.slot, i.image_id
        FROM items i JOIN questions q ON q.question_id = i.question_id
        JOIN readers r ON r.reader_id = q.reader_id JOIN cases c ON c.case_id = q.case_id
        WHERE i.field = 'rating' ORDER BY q.reader_id, q.seq, i.slot
        """
    ).fetchall()
    cols = ["reader", "variant", "seq", "case", "label", "criterion", "item", "slot", "image"]
    df = pd.DataFrame(rows, columns=cols)
    df["method"] = df["image"].map(key)
    df["n_questions"] = df.groupby("reader")["seq"].transform("max") + 1
    return df


def _scale(study: Study) -> str:
    sc = study.meta["scale"]
    return f"{sc['low']},{sc['high']}"


# ---------------------------------------------------------------------------------------
# the driver


def analyze_study(
    study_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    admin_key: str | None = None,
    simulate: SimulationSpec | None = None,
    n_sim: int = 0,
    seed: int = 0,
    n_boot: int = 2000,
    alpha: float = 0.05,
) -> StudyResult:
    """De-blind, analyse and report a study (see the module docstring).

    ``simulate`` fills a copy of the study with simulated readers (:mod:`.simulate`) and
    analyses that; ``n_sim`` > 0 adds a power estimate over that many simulated studies.

    Raises
    ------
    ValueError
        A wrong or missing admin key, a study without answers, bad simulation settings.
    """
    from trustmap.study.create import copy_study

    study = Study.open(study_dir)
    key = read_admin_key(study_path(study_dir), admin_key)
    study.cipher(key)  # a wrong key fails here, before anything is written
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    power_result = None
    if simulate is not None:
        simulate.validate()
        sim_path = copy_study(study.path, out / "simulated_study.sqlite")
        files["simulated_study"] = sim_path
        study = Study.open(sim_path)
        fill_simulated(study, key, simulate, seed)
        if n_sim > 0:
            power_result = power(
                design_of(study, key), simulate, n_sim=n_sim, scale=_scale(study), seed=seed + 1
            )
    rows = study.export(key)
    files["answers"] = write_text_atomic(out / "answers.csv", rows_to_csv(rows))
    meta = study.meta
    if meta["design"] == "rating":
        df = ratings_frame(rows)
        criteria = [c["name"] for c in meta["criteria"]]
        result: Any = analyze_ratings(
            df,
            methods=meta["methods"],
            criteria=[c for c in criteria if c in set(df["criterion"])],
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
            n_expected=study.con.execute(
                "SELECT COUNT(*) FROM items WHERE field = 'rating'"
            ).fetchone()[0],
        )
        for name, table in (("table2_raw", result.raw), ("table3_z", result.z)):
            files[name] = write_text_atomic(out / f"{name}.csv", _table_csv(table))
        files["table4_rank"] = write_text_atomic(out / "table4_rank.csv", _table_csv(result.rank))
        figures = rating_figures(result, meta)
    else:
        df = readings_frame(rows, ["image", "prediction", *(f"map:{m}" for m in meta["methods"])])
        result = analyze_reader_performance(df, list(df["arm"].cat.categories), seed=seed)
        figures = {"reader_performance": reader_performance_figure(result)}
    for name, png in figures.items():
        files[name] = write_bytes_atomic(out / f"{name}.png", png)
    doc = {
        "design": meta["design"],
        "title": meta.get("title"),
        "simulated": simulate is not None,
        "study": {
            k: v for k, v in meta.items() if k not in ("admin_key_hash", "key_salt", "blinding_key")
        },
        "analysis": result.to_dict(),
        "power": power_result,
    }
    files["analysis"] = write_text_atomic(out / "analysis.json", json.dumps(doc, indent=2))
    if power_result is not None:
        files["power"] = write_text_atomic(out / "power.json", json.dumps(power_result, indent=2))
    files["report"] = write_report(
        out / "report.html", result, meta, figures, power_result, simulate
    )
    return StudyResult(out, meta["design"], result, files, power_result, simulate is not None)


def _table_csv(table: Any) -> str:
    rows = []
    for method in table.methods:
        for crit in table.criteria:
            cell = table.cells[crit][method]
            rows.append(
                {
                    "method": method,
                    "criterion": crit,
                    **{k: cell.get(k) for k in ("mean", "low", "high", "t", "df", "p", "p_paired")},
                    "stars": cell.get("stars", ""),
                    "best": cell["best"],
                }
            )
    return rows_to_csv(rows)


# ---------------------------------------------------------------------------------------
# figures


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _bars(ax: Any, cells: dict[str, dict[str, float]], methods: Sequence[str], **kw: Any) -> None:
    means = [cells[m]["mean"] for m in methods]
    err = np.array(
        [
            [cells[m]["mean"] - cells[m]["low"] for m in methods],
            [cells[m]["high"] - cells[m]["mean"] for m in methods],
        ]
    )
    ax.bar(kw.pop("x"), means, yerr=np.clip(err, 0, None), capsize=3, **kw)


def rating_figures(res: RatingAnalysis, meta: dict[str, Any]) -> dict[str, bytes]:
    """Figures 7 (z-adjusted means per criterion and method, overall and by class), 8
    (dendrogram of the criteria's correlations) and 9 (Phi per method; its L1-normalized
    eigenvector), as PNG bytes."""
    labels = {c["name"]: c["label"] for c in meta.get("criteria", [])}
    methods, criteria = res.methods, res.criteria
    out: dict[str, bytes] = {}
    fig = _figure((4.2 * len(criteria), 6.4))
    axes = fig.subplots(2, len(criteria), squeeze=False)
    x = np.arange(len(methods))
    classes = list(res.by_class)
    width = 0.8 / max(len(classes), 1)
    for j, crit in enumerate(criteria):
        ax = axes[0, j]
        _bars(ax, res.z.cells[crit], methods, x=x, color="#7a8799")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{labels.get(crit, crit)}: all cases")
        ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("z-adjusted score")
        ax = axes[1, j]
        for k, cls in enumerate(classes):
            _bars(
                ax,
                res.by_class[cls][crit],
                methods,
                x=x - 0.4 + width * (k + 0.5),
                width=width,
                color=_CLASS_COLOURS[k % len(_CLASS_COLOURS)],
                label=cls,
            )
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{labels.get(crit, crit)}: by class")
        ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
        if j == 0:
            ax.legend(fontsize=8)
    out["figure7_scores"] = _png(fig)
    if res.linkage is not None:
        from scipy.cluster.hierarchy import dendrogram

        fig = _figure((5.5, 3.6))
        ax = fig.add_subplot()
        dendrogram(
            np.asarray(res.linkage),
            labels=[labels.get(c, c) for c in criteria],
            ax=ax,
            color_threshold=0,
            above_threshold_color="#1f5fbf",
        )
        ax.set_ylabel("1 - Pearson r")
        ax.set_title("Inter-criteria correlations (average linkage)")
        out["figure8_dendrogram"] = _png(fig)
    if isinstance(res.pca, PCAResult) and res.phi is not None:
        fig = _figure((9.5, 3.8))
        ax1, ax2 = fig.subplots(1, 2)
        _bars(ax1, res.phi, methods, x=np.arange(len(methods)), color="#7a8799")
        ax1.axhline(0, color="black", lw=0.6)
        ax1.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax1.set_title(f"(a) general factor \u03a6 ({100 * res.pca.explained:.1f}% of variance)")
        vec = res.pca.l1_eigenvector
        ax2.bar(range(len(criteria)), [vec[c] for c in criteria], color="#1f5fbf")
        ax2.set_xticks(range(len(criteria)), [labels.get(c, c) for c in criteria], fontsize=8)
        ax2.set_title("(b) L1-normalized eigenvector")
        out["figure9_phi"] = _png(fig)
    return out


def reader_performance_figure(res: ReaderPerformanceAnalysis) -> bytes:
    """Accuracy, confidence and reading time per arm with 95% CIs."""
    fig = _figure((12, 3.6))
    axes = fig.subplots(1, 3)
    x = np.arange(len(res.arms))
    for ax, (col, title) in zip(
        axes,
        (("correct", "accuracy"), ("confidence", "confidence"), ("time_ms", "reading time (ms)")),
    ):
        cells = {a: res.table[a][col] for a in res.arms}
        _bars(ax, cells, res.arms, x=x, color="#7a8799")
        ax.set_xticks(x, res.arms, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
    return _png(fig)


# ---------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 74em; padding: 0 1em; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #c8c8c8; padding: .25em .6em; text-align: left; }
th { background: #f1f3f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { font-weight: 700; }
caption { caption-side: bottom; text-align: left; font-size: .88em; color: #333; padding-top: .3em;
          max-width: 60em; }
.banner { background: #fff3cd; border: 1px solid #e0b000; padding: .5em .8em; font-weight: 600; }
.verdict { font-size: 1.1em; font-weight: 600; }
.note { color: #444; font-size: .88em; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #333; max-width: 60em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "\u2014"
    return f"{value:.{digits}f}"


def _score_table(table: Any, labels: dict[str, str], number: int, caption: str) -> str:
    head = "".join(f"<th>{_e(labels.get(c, c))}</th>" for c in table.criteria)
    rows = []
    for method in table.methods:
        cells = []
        for crit in table.criteria:
            c = table.cells[crit][method]
            text = f"{_num(c['mean'])}{c.get('stars', '')} [{_num(c['low'])}, {_num(c['high'])}]"
            tip = ""
            if not c["best"] and c.get("t") is not None:
                tip = (
                    f' title="t({c["df"]}) = {_num(c["t"])}, p = {format_p(c["p"])}; '
                    f'paired t({c["df"] + 1}) p = {format_p(c["p_paired"])}"'
                )
            cls = "num best" if c["best"] else "num"
            cells.append(f'<td class="{cls}"{tip}>{text}</td>')
        rows.append(f"<tr><th>{_e(method)}</th>{''.join(cells)}</tr>")
    return (
        f"<table><caption>Table {number}: {caption}</caption><thead><tr><th></th>{head}</tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _tests_table(table: Any, labels: dict[str, str]) -> str:
    rows = []
    for crit in table.criteria:
        for method in table.methods:
            c = table.cells[crit][method]
            if c["best"] or c.get("t") is None:
                continue
            rows.append(
                f"<tr><td>{_e(labels.get(crit, crit))}</td><td>{_e(table.best[crit])} vs "
                f"{_e(method)}</td><td class='num'>t({c['df']}) = {_num(c['t'])}</td>"
                f"<td class='num'>{format_p(c['p'])}</td><td class='num'>{format_p(c['p_paired'])}"
                "</td></tr>"
            )
    return (
        "<table><thead><tr><th>criterion</th><th>comparison</th><th>statistic</th>"
        "<th>p, t(N - 2) (paper)</th><th>p, paired t(N - 1)</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _img(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(name)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _rating_html(res: RatingAnalysis, meta: dict[str, Any], figures: dict[str, bytes]) -> str:
    labels = {c["name"]: c["label"] for c in meta.get("criteria", [])}
    sc = meta["scale"]
    n = res.n_readers
    parts = [
        f"<p>{n} readers, {res.n_cases} cases, {len(res.methods)} methods, "
        f"{len(res.criteria)} criteria on {sc['low']} \u2026 {sc['high']}: {res.n_answers} of "
        f"{res.n_expected} answers.</p>",
        "".join(f"<p class='note'>{_e(x)}</p>" for x in res.notes),
        "<h2>Scores (Tables 2-4)</h2>",
        "<p class='note'>Mean [95% CI] (percentile bootstrap over readers and cases). The "
        "criterion's best method is bold; every other method is tested against it as in "
        f"Katzmann et al. 2021: per-reader means, two-tailed t-test, t(N - 2) = t({n - 2}); "
        "* p &lt; .05, ** p &lt; .01, *** p &lt; .001. Hover a cell for t and p.</p>",
        _score_table(
            res.raw,
            labels,
            2,
            "Raw questionnaire average per method with 95% CI (higher is better).",
        ),
        _score_table(
            res.z,
            labels,
            3,
            "Results after z-adjustment over all answers for the "
            "same case and criterion, with 95% CI (higher is better).",
        ),
        _score_table(
            res.rank,
            labels,
            4,
            "Average rank per criterion and question with 95% CI (lower is better).",
        ),
        "<h3>t-tests (z-adjusted scores)</h3>",
        _tests_table(res.z, labels),
    ]
    if res.mixed:
        rows = []
        for crit, fit in res.mixed.items():
            if "error" in fit:
                rows.append(
                    f"<tr><td>{_e(labels.get(crit, crit))}</td>"
                    f"<td colspan=5>{_e(fit['error'])}</td></tr>"
                )
                continue
            for method, m in fit["methods"].items():
                rows.append(
                    f"<tr><td>{_e(labels.get(crit, crit))}</td><td>{_e(method)} \u2212 "
                    f"{_e(fit['reference'])}</td><td class='num'>{_num(m['difference'])} "
                    f"[{_num(m['low'])}, {_num(m['high'])}]</td><td class='num'>t({fit['df']}) = "
                    f"{_num(m['t'])}</td><td class='num'>{format_p(m['p'])}</td>"
                    f"<td class='note'>{'' if fit['converged'] else 'did not converge'}</td></tr>"
                )
        parts += [
            "<h2>Mixed model</h2>",
            "<p class='note'>Per criterion, raw rating ~ method with crossed random intercepts "
            "for reader and case (REML, statsmodels MixedLM); the difference of each method "
            "from the best one with its 95% CI; Wald t referred to t(N - 1).</p>",
            "<table><thead><tr><th>criterion</th><th>difference</th><th>estimate [95% CI]"
            "</th><th>statistic</th><th>p</th><th></th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>",
        ]
    rel_rows = []
    for crit in res.criteria:
        r = res.reliability[crit]
        icc = res.icc[crit]
        icc_text = (
            f"{_num(icc.icc, 3)} [{_num(icc.low, 3)}, {_num(icc.high, 3)}] (n = {icc.n_targets})"
            if not isinstance(icc, str)
            else _e(icc)
        )
        rel_rows.append(
            f"<tr><td>{_e(labels.get(crit, crit))}</td><td class='num'>{_num(r['rho'], 3)}</td>"
            f"<td class='num'>{r['pairs']}</td><td class='num'>{icc_text}</td></tr>"
        )
    parts += [
        "<h2>Inter-observer reliability</h2>",
        "<table><thead><tr><th>criterion</th><th>\u03c1 (eq. 7: mean pairwise Pearson r)</th>"
        "<th>reader pairs</th><th>ICC(2,1) [95% CI]</th></tr></thead><tbody>"
        + "".join(rel_rows)
        + "</tbody></table>",
    ]
    if res.criteria_corr is not None:
        crit_head = "".join(f"<th>{_e(labels.get(c, c))}</th>" for c in res.criteria)
        body = "".join(
            f"<tr><th>{_e(labels.get(a, a))}</th>"
            + "".join(
                f"<td class='num'>{_num(res.criteria_corr[a][b], 3)}</td>" for b in res.criteria
            )
            + "</tr>"
            for a in res.criteria
        )
        parts += [
            "<h2>Criteria: correlations, KMO and the general factor \u03a6</h2>",
            f"<table><thead><tr><th></th>{crit_head}</tr></thead><tbody>{body}</tbody></table>",
        ]
        if res.kmo is not None:
            if isinstance(res.kmo, str):
                parts.append(f"<p>KMO: {_e(res.kmo)}</p>")
            else:
                per = ", ".join(
                    f"{_e(labels.get(k, k))} {_num(v, 3)}" for k, v in res.kmo.per_variable.items()
                )
                parts.append(
                    f"<p>Kaiser-Meyer-Olkin KMO = {_num(res.kmo.overall, 3)} "
                    f"(per criterion: {per}).</p>"
                )
        if isinstance(res.pca, PCAResult):
            vec = ", ".join(
                f"{_e(labels.get(k, k))} {_num(v, 3)}" for k, v in res.pca.l1_eigenvector.items()
            )
            parts.append(
                f"<p>PCA of the standardized criteria: the general factor \u03a6 explains "
                f"{100 * res.pca.explained:.1f}% of the variance; L1-normalized "
                f"eigenvector: {vec}.</p>"
            )
        elif isinstance(res.pca, str):
            parts.append(f"<p>PCA: {_e(res.pca)}</p>")
    order = res.order
    var = order["variants"]
    parts += [
        "<h2>Questionnaire variants and order effects</h2>",
        f"<p class='verdict'>{_e(order['verdict'])}</p>",
    ]
    if var.get("p_min") is not None:
        parts.append(
            f"<p>A vs B per method and criterion: p between {format_p(var['p_min'])} and "
            f"{format_p(var['p_max'])} (mean {_num(var['p_mean'], 3)}), |t| between "
            f"{_num(var['abs_t_min'], 3)} and {_num(var['abs_t_max'], 3)}.</p>"
        )
    rows = "".join(
        f"<tr><td>{_e(t['test'])}</td><td class='num'>{_e(t['statistic'])} = "
        f"{_num(t['value'])}</td><td class='num'>{format_p(t['p'])}</td>"
        f"<td class='num'>{format_p(t.get('p_holm'))}</td></tr>"
        for t in order["tests"]
    )
    parts.append(
        "<table><thead><tr><th>test</th><th>statistic</th><th>p</th><th>p (Holm)</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
    )
    captions = {
        "figure7_scores": "Figure 7: z-adjusted scores per criterion and method with 95% CIs, "
        "over all cases (top) and by class (bottom).",
        "figure8_dendrogram": "Figure 8: dendrogram of the criteria's pairwise Pearson "
        "correlations.",
        "figure9_phi": "Figure 9: (a) the methods on the general factor \u03a6 with 95% CIs; "
        "(b) its L1-normalized eigenvector.",
    }
    parts.append("<h2>Figures</h2>")
    parts += [_img(k, v, captions.get(k, k)) for k, v in figures.items()]
    return "".join(parts)


def _reader_performance_html(res: ReaderPerformanceAnalysis, figures: dict[str, bytes]) -> str:
    rows = []
    for arm in res.arms:
        t = res.table[arm]
        rows.append(
            f"<tr><th>{_e(arm)}</th><td class='num'>{t['n']}</td>"
            + "".join(
                f"<td class='num'>{_num(t[c]['mean'], d)} [{_num(t[c]['low'], d)}, "
                f"{_num(t[c]['high'], d)}]</td>"
                for c, d in (("correct", 3), ("confidence", 2), ("time_ms", 0))
            )
            + f"<td class='num'>{_num(res.by_model_correct[arm]['model_right'], 3)}</td>"
            f"<td class='num'>{_num(res.by_model_correct[arm]['model_wrong'], 3)}</td></tr>"
        )
    tests = []
    for col, name in (("correct", "accuracy"), ("confidence", "confidence"), ("time_ms", "time")):
        for arm, t in res.tests[col].items():
            stat = f"t({t.get('df')}) = {_num(t['t'])}" if t["t"] is not None else _DASH
            tests.append(
                f"<tr><td>{name}</td><td>{_e(arm)} \u2212 {_e(res.arms[0])}</td>"
                f"<td class='num'>{_num(t['difference'], 3)}</td><td class='num'>{stat}"
                f"</td><td class='num'>{format_p(t['p'])}</td></tr>"
            )
    return (
        f"<p>{res.n_readers} readers, {res.n_cases} cases, {res.readings} readings.</p>"
        + "".join(f"<p class='note'>{_e(x)}</p>" for x in res.notes)
        + "<h2>Reader performance per arm</h2><table><thead><tr><th>arm</th><th>readings</th>"
        "<th>accuracy [95% CI]</th><th>confidence</th><th>reading time, ms</th>"
        "<th>accuracy, model right</th><th>accuracy, model wrong</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table><h2>Paired t-tests over readers against the image-alone arm</h2>"
        "<table><thead><tr><th>measure</th><th>difference</th><th>mean</th><th>statistic</th>"
        "<th>p</th></tr></thead><tbody>"
        + "".join(tests)
        + "</tbody></table>"
        + "<h2>Models</h2><pre>"
        + _e(json.dumps(res.models, indent=1))
        + "</pre>"
        + "".join(
            _img(k, v, "Accuracy, confidence and reading time per arm (95% CIs).")
            for k, v in figures.items()
        )
    )


def _power_html(p: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(c)}</td><td>{_e(p['best'])} vs {_e(m)}</td><td class='num'>{v:.2f}</td></tr>"
        for c, per in p["power"].items()
        for m, v in per.items()
    )
    ranking = _DASH if p["ranking"] is None else f"{p['ranking']:.2f}"
    alarm = p["order_effect_reported"]
    alarm_text = _DASH if alarm is None else f"{alarm:.2f}"
    return (
        f"<h2>Power ({p['n_sim']} simulated studies, alpha = {p['alpha']})</h2>"
        f"<p>Planted effects: {_e(p['effects'])}; readers: {_e(p['spec'])}.</p>"
        f"<table><thead><tr><th>criterion</th><th>comparison</th><th>power</th></tr></thead>"
        f"<tbody>{rows}</tbody></table><p>Planted order recovered in {ranking}, best method "
        f"first in {p['best_first']:.2f}; an order effect reported in "
        f"{alarm_text} of the simulated studies.</p>"
    )


def write_report(
    path: str | os.PathLike[str],
    result: RatingAnalysis | ReaderPerformanceAnalysis,
    meta: dict[str, Any],
    figures: dict[str, bytes],
    power_result: dict[str, Any] | None = None,
    simulate: SimulationSpec | None = None,
) -> Path:
    """One self-contained HTML file (figures embedded), written atomically."""
    title = meta.get("title") or "Reader study"
    body = [f"<h1>{_e(title)}: analysis</h1>"]
    if simulate is not None:
        body.append(
            "<p class='banner'>SIMULATED readers: these answers were drawn from the "
            f"simulation model (effects {_e(dict(simulate.method_effects) or 'default spread')}, "
            f"reader noise {simulate.reader_noise}, drift {simulate.drift}, first-slot "
            f"bonus {simulate.first_slot}), not given by people.</p>"
        )
    body.append(
        f"<p class='note'>Study: {_e(meta.get('dataset_name'))}, model {_e(meta.get('model'))}, "
        f"design {_e(meta['design'])}, seed {meta.get('seed')}.</p>"
    )
    if isinstance(result, RatingAnalysis):
        body.append(_rating_html(result, meta, figures))
    else:
        body.append(_reader_performance_html(result, figures))
    if power_result is not None:
        body.append(_power_html(power_result))
    body.append(
        "<p class='note'>Methods: Katzmann et al. 2021, Explaining clinical decision support "
        "systems in medical imaging using cycle-consistent activation maximization "
        "(Neurocomputing), section 3.4; Huff et al. 2021 (Phys Med Biol), section 6; "
        "Shrout and Fleiss 1979; McGraw and Wong 1996; Kaiser 1970.</p>"
    )
    doc = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    return write_text_atomic(path, doc)
