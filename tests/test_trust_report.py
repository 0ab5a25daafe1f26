"""Trust figures and the HTML report: files, paper-style numbers, verdicts, escaping, nulls."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from trustmap.trust import figures as figs
from trustmap.trust.report import format_mean_sd, format_p, write_report

METHODS = ("gradient", "grad_cam", "<x>")
STAGES = ("logits", "block3", "block2", "block1")
CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stat(mean, sd, n=10):
    return {"mean": mean, "sd": sd, "n": n}


def _results(verdicts: dict[str, dict[str, str]]) -> dict:
    """A results.json following the protocol's schema, with the given verdicts."""
    methods = {}
    for k, name in enumerate(METHODS):
        v = verdicts[name]
        methods[name] = {
            "utility": {
                "metric": "auprc",
                **_stat(0.10 + 0.05 * k, 0.07),
                "n_skipped_empty": 1 if k == 0 else 0,
                "baseline": {"name": "AVG", "mean": 0.15, "sd": 0.18},
                "p_value": 0.0004,
                "verdict": v["utility"],
                "high_baseline": {"name": "localizer", "mean": 0.41, "sd": 0.22, "p_value": 1e-6},
                "auroc": {
                    **_stat(0.70, 0.13),
                    "baseline": {"name": "AVG", "mean": 0.73, "sd": 0.19},
                    "p_value": 0.08,
                    "verdict": "uncertain",
                },
                "randomized": {**_stat(0.03, 0.04), "p_value": 0.004},
            },
            "randomization": {
                "metric": "ssim",
                **_stat(0.25, 0.03),
                "baseline": {"name": "random pairs", "mean": 0.24, "sd": 0.04, "n_pairs": 50},
                "p_value": 0.23,
                "verdict": v["randomization"],
                "stages": [
                    {"name": s, "mean": 0.9 - 0.15 * i - 0.02 * k, "sd": 0.05}
                    for i, s in enumerate(STAGES)
                ],
                "independent": [
                    {"name": s, "mean": 0.8 - 0.05 * i, "sd": 0.05} for i, s in enumerate(STAGES)
                ],
            },
            "repeatability": {
                "metric": "ssim",
                **_stat(0.64, 0.09),
                "baseline": {"name": "LOW", "mean": 0.5},
                "p_value": 0.02,
                "verdict": v["repeatability"],
                "high_baseline": {"name": "localizer", "mean": 0.98, "sd": 0.02, "p_value": 1e-5},
            },
            "reproducibility": {
                "metric": "ssim",
                **_stat(0.49, 0.08),
                "baseline": {"name": "LOW", "mean": 0.5},
                "p_value": 0.12,
                "verdict": v["reproducibility"],
                "high_baseline": {"name": "localizer", "mean": 0.98, "sd": 0.02, "p_value": 1e-5},
            },
            "faithfulness": {
                "deletion_auc": _stat(0.21, 0.05),
                "insertion_auc": _stat(0.55, 0.08),
                "sensitivity_n": {"n": [1, 4, 16], "correlation": [0.1, 0.3, 0.5]},
                "completeness_gap": None,
                "explainability_failures": {"count": 3, "n_correct_positive": 12},
            },
        }
    passes = [m for m in METHODS if all(verdicts[m][c] == "pass" for c in CRITERIA)]
    return {
        "methods": methods,
        "baselines": {
            "avg_mask": {"auprc": _stat(0.15, 0.18), "auroc": _stat(0.73, 0.19)},
            "localizer": {"auprc": _stat(0.41, 0.22), "auroc": _stat(0.87, 0.12)},
            "randomization": {m: {"mean": 0.24, "sd": 0.04, "n_pairs": 50} for m in METHODS},
            "repeatability_high": _stat(0.98, 0.02),
            "reproducibility_high": _stat(0.98, 0.02),
            "low_ssim": 0.5,
        },
        "tukey": {},
        "summary": {"verdicts": verdicts, "passes_all": passes},
        "models": {
            "A1": {"arch": "small_cnn", "seed": 0, "test_auc": 0.912, "checkpoint": "a1.pt"},
            "B": {"arch": "resnet_tiny", "seed": 2, "test_auc": None, "checkpoint": "b.pt"},
        },
        "config": {"dataset": "cxr-pneumothorax", "alpha": 0.05, "methods": list(METHODS)},
        "versions": {"trustmap": "0.1.0", "torch": "2.13.0"},
        "timings": {"models": 30.0, "maps": 60.0, "statistics": 10.0, "total": 100.0},
    }


def _per_image() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    images = [f"img{i}" for i in range(8)]
    for image in images:
        for method in (*METHODS, "AVG", "localizer"):
            for metric in ("auprc", "auroc"):
                rows.append((image, method, "utility", "", metric, rng.random()))
        for method in (*METHODS, "localizer"):
            for criterion in ("repeatability", "reproducibility"):
                rows.append((image, method, criterion, "", "ssim", rng.random()))
        for method in METHODS:
            for stage in STAGES:
                rows.append((image, method, "randomization", stage, "ssim", rng.random()))
            rows.append((image, method, "faithfulness", "", "deletion_auc", rng.random()))
    columns = ["image", "method", "criterion", "stage", "metric", "value"]
    return pd.DataFrame(rows, columns=columns)


ALL_PASS = dict.fromkeys(CRITERIA, "pass")
MIXED = {
    "gradient": {"utility": "fail", "randomization": "pass", "repeatability": "fail",
                 "reproducibility": "uncertain"},
    "grad_cam": ALL_PASS,
    "<x>": {"utility": "uncertain", "randomization": "fail", "repeatability": "pass",
            "reproducibility": "pass"},
}  # fmt: skip
NONE_PASS = {**MIXED, "grad_cam": {**ALL_PASS, "randomization": "uncertain"}}


class _Captured:
    """Wraps figures._finish to keep each drawn Figure, so tests can read what was drawn."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.figures = []
        original = figs._finish

        def finish(fig, title, path):
            self.figures.append(fig)
            original(fig, title, path)

        monkeypatch.setattr(figs, "_finish", finish)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    with Image.open(path) as png:
        assert png.size[0] > 300 and png.size[1] > 200


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every figure, drawn once for the module from the synthetic results."""
    out = tmp_path_factory.mktemp("figures")
    results, per_image = _results(MIXED), _per_image()
    rng = np.random.default_rng(1)
    image = rng.random((32, 32))
    mask = np.zeros((32, 32))
    mask[8:20, 10:24] = 1.0
    stacks = {m: rng.random((len(STAGES) + 1, 32, 32)) for m in METHODS}
    repro = {m: {k: rng.random((32, 32)) for k in ("A1", "A2", "B")} for m in METHODS}
    return {
        "utility_boxplot": figs.utility_boxplot(per_image, results, out / "utility.png"),
        "utility_boxplot_auroc": figs.utility_boxplot(
            per_image, results, out / "utility_auroc.png", metric="auroc"
        ),
        "randomization_curves": figs.randomization_curves(results, out / "curves.png"),
        "randomization_grid": figs.randomization_grid(
            image, stacks, STAGES, out / "grid.png", mask=mask
        ),
        "repro_boxplot": figs.repro_boxplot(per_image, results, out / "repro.png"),
        "repro_examples": figs.repro_examples(image, repro, out / "examples.png", mask=mask),
        "faithfulness_plot": figs.faithfulness_plot(results, out / "faith.png"),
    }


# ---------------------------------------------------------------------------------------
# number formatting


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.0004, "<.001"),
        (0.0, "<.001"),
        (0.001, ".001"),
        (0.004, ".004"),
        (0.02, ".02"),
        (0.0449, ".04"),
        (0.23, ".23"),
        (0.996, ">.99"),
        (1.0, ">.99"),
        (None, "NA"),
        (float("nan"), "NA"),
    ],
)
def test_format_p_follows_the_paper(p, text) -> None:
    assert format_p(p) == text


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_format_p_rejects_impossible_values(p) -> None:
    with pytest.raises(ValueError, match="p value"):
        format_p(p)


def test_format_mean_sd() -> None:
    assert format_mean_sd(0.15, 0.18) == "0.15 \u00b1 0.18"
    assert format_mean_sd(0.146, None) == "0.15"
    assert format_mean_sd(np.float64(0.5), np.float32(0.25)) == "0.50 \u00b1 0.25"
    assert format_mean_sd(None, 0.1) == "\u2014"
    assert format_mean_sd(float("nan"), 0.1) == "\u2014"


# ---------------------------------------------------------------------------------------
# figures


def test_every_figure_is_a_png_written_atomically(rendered: dict[str, Path]) -> None:
    for path in rendered.values():
        _assert_png(path)
    folder = next(iter(rendered.values())).parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in rendered.values())


def test_utility_boxplot_draws_baselines_methods_and_verdict_marks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _Captured(monkeypatch)
    results, per_image = _results(MIXED), _per_image()
    figs.utility_boxplot(per_image, results, tmp_path / "u.png")
    ax = captured.figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["AVG", "localizer", *METHODS]
    boxes = [p for p in ax.patches if p.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
    assert len(boxes) == 5
    marks = [t.get_text() for t in ax.texts]
    assert marks == ["\u2717", "\u2713", "?"]  # fail, pass, uncertain, in method order
    # The dashed mean line of a box sits at the mean of its values.
    values = per_image.query("criterion == 'utility' and metric == 'auprc' and method == 'AVG'")
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert np.mean(dashed[0].get_ydata()) == pytest.approx(values["value"].mean())


def test_randomization_curves_start_at_one_and_draw_each_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _Captured(monkeypatch)
    results = _results(MIXED)
    figs.randomization_curves(results, tmp_path / "c.png")
    cascading = captured.figures[0].axes[0]
    solid = [line for line in cascading.lines if line.get_linestyle() == "-"]
    dotted = [line for line in cascading.lines if line.get_linestyle() == ":"]
    assert [line.get_label() for line in solid] == list(METHODS)
    assert len(dotted) == len(METHODS)
    assert solid[0].get_ydata()[0] == 1.0
    expected = [s["mean"] for s in results["methods"]["gradient"]["randomization"]["stages"]]
    assert list(solid[0].get_ydata()[1:]) == pytest.approx(expected)
    ticks = [t.get_text() for t in cascading.get_xticklabels()]
    assert ticks == ["orig", *STAGES]
    assert np.unique(dotted[0].get_ydata()) == pytest.approx([0.24])
    colour = solid[1].get_color()
    assert dotted[1].get_color() == colour


def test_missing_criterion_is_skipped_in_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _Captured(monkeypatch)
    results = _results(MIXED)
    del results["methods"]["grad_cam"]["randomization"]
    del results["methods"]["<x>"]["faithfulness"]
    del results["baselines"]["randomization"]["grad_cam"]
    per_image = _per_image()
    per_image = per_image[~((per_image.method == "<x>") & (per_image.criterion == "utility"))]
    figs.randomization_curves(results, tmp_path / "c.png")
    figs.faithfulness_plot(results, tmp_path / "f.png")
    figs.utility_boxplot(per_image, results, tmp_path / "u.png")
    curves, faith, utility = (f.axes[0] for f in captured.figures)
    assert [ln.get_label() for ln in curves.lines if ln.get_linestyle() == "-"] == [
        "gradient",
        "<x>",
    ]
    assert [t.get_text() for t in faith.get_xticklabels()] == ["gradient", "grad_cam"]
    assert [t.get_text() for t in utility.get_xticklabels()] == [
        "AVG",
        "localizer",
        "gradient",
        "grad_cam",
    ]
    # Nothing at all to draw still gives a figure that says so.
    empty = {"methods": {"gradient": {}}}
    for path in (
        figs.randomization_curves(empty, tmp_path / "c0.png"),
        figs.faithfulness_plot(empty, tmp_path / "f0.png"),
        figs.repro_boxplot(per_image.iloc[:0], empty, tmp_path / "r0.png"),
    ):
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert "no data" in [t.get_text() for t in captured.figures[-1].axes[0].texts]


def test_grid_functions_show_the_middle_axial_slice_of_volumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _Captured(monkeypatch)
    rng = np.random.default_rng(2)
    depth = 6
    image = rng.random((1, depth, 12, 14))  # (C, D, H, W)
    mask = np.zeros((depth, 12, 14))
    mask[2:5, 3:9, 4:10] = 1.0
    stacks = {m: rng.random((len(STAGES) + 1, depth, 12, 14)) for m in METHODS[:2]}
    stacks["skipped"] = None
    path = figs.randomization_grid(image, stacks, STAGES, tmp_path / "g.png", mask=mask)
    _assert_png(path)
    fig = captured.figures[0]
    assert "middle axial slice d=3" in fig.get_suptitle()
    grid = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(grid) == 2 * (len(STAGES) + 2)
    np.testing.assert_array_equal(grid[0].images[0].get_array(), image[0, depth // 2])
    for c in range(len(STAGES) + 1):
        drawn = grid[1 + c].images[-1].get_array()
        np.testing.assert_array_equal(drawn, stacks[METHODS[0]][c, depth // 2])
    assert grid[0].get_ylabel() == METHODS[0]
    assert [ax.get_title() for ax in grid[: len(STAGES) + 2]] == ["image", "trained", *STAGES]

    maps = {m: {k: rng.random((depth, 12, 14)) for k in ("A1", "A2", "B")} for m in METHODS}
    del maps["<x>"]["B"]  # reproducibility not run for this method
    path = figs.repro_examples(image, maps, tmp_path / "e.png", mask=mask)
    _assert_png(path)
    fig = captured.figures[1]
    assert "middle axial slice" in fig.get_suptitle()
    grid = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    rows = [grid[r * len(METHODS)].get_ylabel() for r in range(3)]
    assert rows == ["A replicate 1", "A replicate 2", "B"]
    np.testing.assert_array_equal(
        grid[len(METHODS) + 1].images[-1].get_array(), maps[METHODS[1]]["A2"][depth // 2]
    )
    assert [t.get_text() for t in grid[-1].texts] == ["not run"]


def test_grid_functions_reject_inconsistent_shapes(tmp_path: Path) -> None:
    image = np.zeros((16, 16))
    with pytest.raises(ValueError, match="S \\+ 1"):
        figs.randomization_grid(image, {"m": np.zeros((3, 16, 16))}, STAGES, tmp_path / "a.png")
    stack = np.zeros((len(STAGES) + 1, 16, 16))
    with pytest.raises(ValueError, match="mask shape"):
        figs.randomization_grid(image, {"m": stack}, STAGES, tmp_path / "a.png", mask=np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        figs.repro_examples(image, {"m": {"A1": np.full((16, 16), np.nan)}}, tmp_path / "b.png")
    with pytest.raises(ValueError, match="image shape"):
        figs.repro_examples(np.zeros((8, 8)), {"m": {"A1": image}}, tmp_path / "b.png")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# report


def _strip_data(text: str) -> str:
    return re.sub(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+", "DATA", text)


def _matrix_rows(text: str) -> dict[str, list[str]]:
    """Method -> the four verdict cells of the summary's verdict matrix."""
    summary = text.split('<section id="summary">', 1)[1].split("</section>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr><td>(.*?)</td>(.*?)</tr>", summary, flags=re.S):
        rows[row[0]] = re.findall(r'<td class="v-[a-z]+">(.*?)</td>', row[1])
    return rows


def test_report_is_one_self_contained_file(tmp_path: Path, rendered: dict[str, Path]) -> None:
    out = tmp_path / "report"
    out.mkdir()
    path = write_report(_results(MIXED), rendered, out / "report.html", per_image=_per_image())
    assert path == out / "report.html" and [p.name for p in out.iterdir()] == ["report.html"]
    text = path.read_text(encoding="utf-8")
    for external in ('src="http', "src='http", 'href="http', "<script", "<link", "url(", "@import"):
        assert external not in text
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(rendered)
    embedded = {base64.b64decode(data) for data in images}
    assert embedded == {p.read_bytes() for p in rendered.values()}
    # Figures come in the paper's order, each with a caption.
    captions = re.findall(r"<figcaption><b>Figure (\d+)\.</b> (.*?)</figcaption>", text)
    assert [int(n) for n, _ in captions] == list(range(1, len(rendered) + 1))
    assert "Figure 2A" in captions[0][1] and "(auroc)" in captions[1][1]
    assert "Figure 3A" in captions[2][1]


def test_report_verdicts_statement_and_tables(tmp_path: Path, rendered: dict[str, Path]) -> None:
    results = _results(MIXED)
    text = write_report(results, {}, tmp_path / "r.html").read_text(encoding="utf-8")
    rows = _matrix_rows(text)
    assert rows["gradient"] == ["did not pass \u2020", "pass \u2021", "did not pass \u2020",
                                "uncertain \u00a7"]  # fmt: skip
    assert rows["grad_cam"] == ["pass \u2021"] * 4
    assert rows["&lt;x&gt;"] == ["uncertain \u00a7", "did not pass \u2020", "pass \u2021",
                                 "pass \u2021"]  # fmt: skip
    assert "Passed all four criteria: grad_cam." in text
    assert "No method passed" not in text
    # Table 3: utility p vs AVG with the verdict mark, vs the localizer (below it: dagger),
    # randomization p .23 uncertain; the baseline rows are NA.
    table3 = text.split('id="table3"', 1)[1].split("</table>", 1)[0]
    gradient = re.search(r"<tr><td>gradient</td>(.*?)</tr>", table3).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", gradient)
    assert cells == [
        "0.10 \u00b1 0.07",
        "&lt;.001 \u2020",
        "&lt;.001 \u2020",
        "0.24 \u00b1 0.04",
        "0.25 \u00b1 0.03",
        ".23 \u2021",
    ]
    avg = re.search(r'<tr class="baseline"><td>AVG</td>(.*?)</tr>', table3).group(1)
    assert re.findall(r"<td[^>]*>(.*?)</td>", avg) == ["0.15 \u00b1 0.18"] + ["NA"] * 5
    table4 = text.split('id="table4"', 1)[1].split("</table>", 1)[0]
    grad_cam = re.search(r"<tr><td>grad_cam</td>(.*?)</tr>", table4).group(1)
    assert re.findall(r"<td[^>]*>(.*?)</td>", grad_cam) == [
        "0.64 \u00b1 0.09", "&lt;.001 \u2020", ".02 \u2021",
        "0.49 \u00b1 0.08", "&lt;.001 \u2020", ".12 \u2021",
    ]  # fmt: skip
    table2 = text.split('id="table2"', 1)[1].split("</table>", 1)[0]
    assert ".08 \u00a7" in table2
    faith = text.split('id="faithfulness"', 1)[1].split("</table>", 1)[0]
    assert "3 of 12" in faith and "16: 0.50" in faith
    assert "Total time: 1 min 40 s" in text
    timings = text.split('id="timings"', 1)[1]
    assert "60.0 %" in timings and "trustmap trust --config" in text


def test_report_says_when_no_method_passes(tmp_path: Path) -> None:
    results = _results(NONE_PASS)
    text = write_report(results, {}, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "No method passed all four criteria." in text
    assert "Passed all four criteria" not in text
    assert "disagrees" not in text
    # The statement follows the verdicts, not the recorded list, and flags a disagreement.
    results["summary"]["passes_all"] = ["gradient"]
    text = write_report(results, {}, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "No method passed all four criteria." in text and "disagrees" in text


def test_report_escapes_strings_and_shows_nulls_as_dashes(tmp_path: Path) -> None:
    results = _results(MIXED)
    entry = results["methods"]["<x>"]["repeatability"]
    entry.update(mean=None, sd=None, p_value=None, note='all maps constant & "flat"')
    results["methods"]["gradient"]["faithfulness"]["deletion_auc"]["mean"] = float("nan")
    results["config"]["weird"] = float("inf")
    results["timings"]["<stage>"] = None
    results["versions"]["extra"] = "<b>bold</b>"
    text = write_report(results, {}, tmp_path / "r.html", title="t <&>").read_text("utf-8")
    assert "<x>" not in text and "&lt;x&gt;" in text
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "<stage>" not in text and "<title>t &lt;&amp;&gt;</title>" in text
    note = "all maps constant &amp; &quot;flat&quot;"
    assert f'<td class="num" title="{note}">\u2014</td>' in text
    assert f'<td class="num" title="{note}">NA</td>' in text
    assert re.search(r"\bnan\b|\binf(inity)?\b", _strip_data(text), flags=re.I) is None
    assert "&quot;weird&quot;: null" in text


def test_report_handles_a_missing_criterion(tmp_path: Path) -> None:
    results = _results({m: ALL_PASS for m in METHODS})
    for criterion in ("randomization", "repeatability", "faithfulness"):
        del results["methods"]["grad_cam"][criterion]
    del results["summary"]["verdicts"]["grad_cam"]
    del results["timings"]["total"]
    figures = {"repro_boxplot": tmp_path / "absent.png"}
    text = write_report(results, figures, tmp_path / "r.html").read_text(encoding="utf-8")
    rows = _matrix_rows(text)
    assert rows["grad_cam"] == ["pass \u2021", "not run", "not run", "pass \u2021"]
    assert "Passed all four criteria: gradient, &lt;x&gt;." in text
    assert "Not every criterion was run for: grad_cam" in text
    table4 = text.split('id="table4"', 1)[1].split("</table>", 1)[0]
    grad_cam = re.search(r"<tr><td>grad_cam</td>(.*?)</tr>", table4).group(1)
    assert grad_cam.count('title="not run">\u2014</td>') == 3
    assert "could not be read" in text  # the absent figure is reported, not fatal
    assert "Total time: 1 min 40 s" in text  # the sum of the stages


def test_report_captions_follow_figure_names(tmp_path: Path, rendered: dict[str, Path]) -> None:
    figures = {
        "faithfulness": rendered["faithfulness_plot"],
        "repeatability_examples": rendered["repro_examples"],
        "repeatability": rendered["repro_boxplot"],
        "utility_auroc": rendered["utility_boxplot_auroc"],
        "randomization_grid": rendered["randomization_grid"],
        "something else": rendered["utility_boxplot"],
    }
    text = write_report(_results(MIXED), figures, tmp_path / "r.html").read_text("utf-8")
    captions = re.findall(r"<figcaption><b>Figure \d+\.</b> (.*?)</figcaption>", text)
    assert [c.split("(after Arun et al. 2021, ")[1][:10] for c in captions[:4]] == [
        "Figure 2A)",
        "Figure 3B)",
        "Figure 4A)",
        "Figure 4C)",
    ]
    assert captions[0].endswith("(auroc)") and not captions[3].endswith(")")
    assert captions[4].startswith("Faithfulness") and captions[5] == "something else."
