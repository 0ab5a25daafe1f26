"""The parts of the trust report written for the people who decide: what the verdicts
mean in plain words, which maps may be shown, effect sizes with confidence intervals, the
data described as data, a gallery of cases, and the run time over resumed runs.

Everything here reads ``results.json`` and ``per_image.csv`` and computes nothing about the
maps themselves; :func:`case_gallery` draws the figure the report shows.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trustmap.core.atomic import write_text_atomic

CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")
WORDS = {"pass": "pass", "fail": "did not pass", "uncertain": "uncertain"}


def _e(value: Any) -> str:
    return html.escape(str(value))


def _verdict(results: Mapping[str, Any], method: str, criterion: str) -> str | None:
    entry = (results.get("methods") or {}).get(method, {}).get(criterion)
    return entry.get("verdict") if isinstance(entry, Mapping) else None


def plain_language(results: Mapping[str, Any]) -> str:
    """The box that opens the report: the verdicts in words, and which methods' maps may
    be shown for this model, each with its reason."""
    methods = [str(m) for m in (results.get("methods") or {})]
    alpha = float((results.get("config") or {}).get("alpha", 0.05))
    shown, not_shown = [], []
    for m in methods:
        u, r = _verdict(results, m, "utility"), _verdict(results, m, "randomization")
        if u == "pass" and r == "pass":
            shown.append(
                f"<li><b>{_e(m)}</b>: its maps find the lesion better than the average "
                "lesion position does, and they change when the model's weights are "
                "destroyed, so they show what this model learned.</li>"
            )
            continue
        reasons = []
        if u != "pass":
            reasons.append(
                "its maps do not find the lesion better than the average lesion position"
                + (" (the data do not decide)" if u == "uncertain" else "")
            )
        if r != "pass":
            reasons.append(
                "its maps do not change significantly when the model's weights are "
                "randomized, so they may show the image (edges, anatomy) rather than the model"
                if r != "uncertain"
                else "whether its maps depend on the model's weights is undecided"
            )
        not_shown.append(f"<li><b>{_e(m)}</b>: {'; '.join(reasons)}.</li>")
    parts = [
        '<section id="plain" class="plain"><h2>What this report says</h2>',
        "<p>Each saliency method was tested on four questions (Arun et al. 2021). "
        "A verdict compares the method with a baseline, on every test image, with a "
        f"significance level of {alpha:g}:</p>",
        "<ul>",
        "<li><b>pass</b>: clearly better than the baseline (for randomization: the map "
        "clearly changed when the model's weights were randomized).</li>",
        "<li><b>did not pass</b>: clearly worse than the baseline.</li>",
        "<li><b>uncertain</b>: no clear difference; these images do not decide.</li>",
        "</ul>",
        "<p><b>Utility</b>: does the map point at the lesion? <b>Randomization</b>: does it "
        "depend on what the model learned? <b>Repeatability</b>: does a second training "
        "of the same model give the same map? <b>Reproducibility</b>: does another "
        "architecture give the same map?</p>",
    ]
    if shown:
        parts.append(
            "<p><b>Maps that may be shown to a clinician as explanations of this model:</b></p>"
        )
        parts.append("<ul>" + "".join(shown) + "</ul>")
    else:
        parts.append(
            "<p><b>No method's maps should be shown to a clinician as an explanation of this "
            "model</b>: none both found the lesions and depended on the model's weights.</p>"
        )
    if not_shown:
        parts.append("<p>Not to be shown:</p><ul>" + "".join(not_shown) + "</ul>")
    parts.append(
        "<p>Repeatability and reproducibility compare models, not only methods: a map that "
        "differs between two trainings says that the models differ.</p></section>"
    )
    return "\n".join(parts)


def _ci(values: np.ndarray) -> tuple[float, float, float, float, int]:
    """Mean, 95 % t interval and Cohen's d_z of paired differences."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n < 2:
        return (float(v.mean()) if n else math.nan, math.nan, math.nan, math.nan, n)
    mean, sd = float(v.mean()), float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    d = mean / sd if sd > 0 else math.nan
    return mean, mean - half, mean + half, d, n


def effect_sizes(
    results: Mapping[str, Any], per_image: pd.DataFrame | None
) -> list[dict[str, Any]]:
    """Per method and criterion: the mean difference from the baseline per image with its
    95 % confidence interval, Cohen's d_z, and the p value of the protocol's test.

    Utility: AUPRC minus the AVG baseline's AUPRC on the same image. Randomization: the
    fully randomized model's SSIM minus the random-pair baseline (negative: the map
    changed). Repeatability and reproducibility: SSIM minus 0.5.
    """
    rows: list[dict[str, Any]] = []
    if per_image is None or per_image.empty:
        return rows
    df = per_image
    methods = [str(m) for m in (results.get("methods") or {})]
    avg = df[(df.method == "AVG") & (df.criterion == "utility") & (df.metric == "auprc")]
    avg = avg.set_index("image")["value"]
    for m in methods:
        entry = (results.get("methods") or {}).get(m, {})
        for criterion in CRITERIA:
            sub = df[(df.method == m) & (df.criterion == criterion)]
            if sub.empty:
                continue
            if criterion == "utility":
                sub = sub[sub.metric == "auprc"].set_index("image")["value"]
                diff = (sub - avg.reindex(sub.index)).to_numpy()
                what = "AUPRC minus the average-mask baseline"
            elif criterion == "randomization":
                stages = [s for s in sub.stage.unique() if s]
                last = stages[-1] if stages else ""
                base = entry.get(criterion, {}).get("baseline")
                base = base.get("mean") if isinstance(base, Mapping) else base
                if not isinstance(base, (int, float)):
                    continue
                diff = sub[sub.stage == last]["value"].to_numpy() - float(base)
                what = "SSIM after full randomization minus the random-pair baseline"
            else:
                diff = sub["value"].to_numpy() - 0.5
                what = "SSIM minus 0.5"
            mean, lo, hi, d, n = _ci(diff)
            crit = entry.get(criterion, {}) if isinstance(entry.get(criterion), Mapping) else {}
            rows.append(
                {
                    "method": m,
                    "criterion": criterion,
                    "difference": what,
                    "mean": mean,
                    "low": lo,
                    "high": hi,
                    "d_z": d,
                    "n": n,
                    "p_value": crit.get("p_value"),
                    "verdict": crit.get("verdict"),
                }
            )
    return rows


def _num(x: Any, digits: int = 3) -> str:
    return "—" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(p: Any) -> str:
    if not isinstance(p, (int, float)) or not math.isfinite(p):
        return "—"
    return "<.001" if p < 0.001 else f"{p:.3f}".lstrip("0")


def effect_table(results: Mapping[str, Any], per_image: pd.DataFrame | None) -> str:
    rows = effect_sizes(results, per_image)
    if not rows:
        return ""
    out = [
        '<section id="effects"><h2>Effect sizes</h2>',
        "<p>How far each method is from its baseline, per test image: the mean difference "
        "with its 95 % confidence interval (t distribution) and Cohen's d<sub>z</sub> "
        "(the mean difference in standard deviations of the differences), beside the p value "
        "of the protocol's test.</p>",
        "<table><tr><th>Method</th><th>Criterion</th><th>Difference</th><th>Mean [95 % CI]"
        "</th><th>d<sub>z</sub></th><th>n</th><th>p</th><th>Verdict</th></tr>",
    ]
    for r in rows:
        out.append(
            f"<tr><td>{_e(r['method'])}</td><td>{_e(r['criterion'])}</td>"
            f"<td>{_e(r['difference'])}</td>"
            f'<td class="num">{_num(r["mean"])} [{_num(r["low"])}, {_num(r["high"])}]</td>'
            f'<td class="num">{_num(r["d_z"], 2)}</td><td class="num">{r["n"]}</td>'
            f'<td class="num">{_p(r["p_value"])}</td>'
            f"<td>{_e(WORDS.get(str(r['verdict']), r['verdict'] or '—'))}</td></tr>"
        )
    out.append("</table></section>")
    return "\n".join(out)


def describe_data(dataset: Any) -> str:
    """The dataset in words: name, synthetic or real, image count and size, splits."""
    if not isinstance(dataset, Mapping):
        return "the dataset is not recorded"
    from trustmap.data.phantoms import PHANTOMS

    name = str(dataset.get("name", "unnamed"))
    synthetic = name in PHANTOMS or str(dataset.get("path", "")).find("phantom") >= 0
    kind = (
        "a <b>synthetic phantom</b> generated by trustmap (not patient data)"
        if synthetic
        else "a dataset you provided (not one of trustmap's synthetic phantoms)"
    )
    size = dataset.get("size") or []
    native = dataset.get("native_size") or []
    dims = dataset.get("spatial_dims", len(size))
    grid = " x ".join(str(s) for s in size)
    native_text = (
        f" (resized from {' x '.join(str(s) for s in native)})"
        if native and list(native) != list(size)
        else ""
    )
    counts = dataset.get("counts") or {}
    split = ""
    if isinstance(counts, Mapping) and counts:
        parts = []
        for k, v in counts.items():
            # {"train": 2000} or per class {"train": {"0": 1000, "1": 1000}}
            if isinstance(v, Mapping):
                per_class = [int(c) for c in v.values() if isinstance(c, (int, float))]
                n = sum(per_class) if per_class else None
                positives = v.get("1")
            else:
                n, positives = v, None
            if isinstance(n, (int, float)):
                extra = f" ({int(positives)} positive)" if isinstance(positives, int) else ""
                parts.append(f"{int(n):,} {k}{extra}")
        split = ("; " + ", ".join(parts)) if parts else ""
    truth = str(dataset.get("ground_truth", "")).replace("_", " ")
    truth_text = f"; ground truth: {_e(truth)}" if truth else ""
    return (
        f"<b>{_e(name)}</b>, {kind}: {dims}D images of {_e(grid)} pixels"
        f"{_e(native_text)}{_e(split)}{truth_text}."
    )


def data_section(results: Mapping[str, Any]) -> str:
    return (
        '<section id="data"><h2>The data</h2><p>'
        + describe_data(results.get("dataset"))
        + "</p></section>"
    )


# -- time over resumed runs ---------------------------------------------------------------


def record_run_time(out: Path, seconds: float) -> dict[str, Any]:
    """Append this run's wall time to ``out/run_history.json`` and return the totals:
    ``{"runs": n, "this_run": s, "all_runs": sum}``. A resumed run's own time covers only
    what it had left to do; the sum is what the whole study cost."""
    path = Path(out) / "run_history.json"
    try:
        history = json.loads(path.read_text())
        if not isinstance(history, list):
            history = []
    except (OSError, json.JSONDecodeError):
        history = []
    history.append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 3)})
    write_text_atomic(path, json.dumps(history, indent=2))
    total = sum(float(h.get("seconds", 0)) for h in history if isinstance(h, Mapping))
    return {"runs": len(history), "this_run": round(seconds, 3), "all_runs": round(total, 3)}


# -- the case gallery ---------------------------------------------------------------------


def pick_cases(per_image: pd.DataFrame, method: str) -> dict[str, str]:
    """The best, median and worst image of ``method`` by AUPRC."""
    sub = per_image[
        (per_image.method == method)
        & (per_image.criterion == "utility")
        & (per_image.metric == "auprc")
    ].sort_values("value", kind="stable")
    if sub.empty:
        return {}
    images = sub["image"].tolist()
    return {"worst": images[0], "median": images[len(images) // 2], "best": images[-1]}


def case_gallery(
    per_image: pd.DataFrame,
    examples: Mapping[str, Any],
    path: str | Path,
    failures: Mapping[str, Sequence[str]] | None = None,
) -> Path | None:
    """One row per method: its best, median and worst image by AUPRC, the map over the
    image with the lesion outlined; then every explainability failure (a correct positive
    prediction whose map localizes worse than the average mask, Borys et al. 2023)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = examples.get("trained")
    images, masks, ids = examples.get("images"), examples.get("masks"), examples.get("ids")
    if maps is None or images is None or ids is None:
        return None
    index = {str(i): k for k, i in enumerate(ids)}
    auprc = per_image[(per_image.criterion == "utility") & (per_image.metric == "auprc")]
    score = {(r.method, str(r.image)): r.value for r in auprc.itertuples()}
    panels: list[tuple[str, str, str]] = []
    for method in maps:
        for label, image in pick_cases(per_image, method).items():
            panels.append((method, label, str(image)))
    for method, cases in (failures or {}).items():
        for image in cases:
            panels.append((method, "failure", str(image)))
    if not panels:
        return None
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (method, label, image) in zip(axes.ravel(), panels):
        k = index.get(image)
        if k is None:
            continue
        img = np.asarray(images[k], dtype=float)
        img = img.mean(0) if img.ndim == 3 else img
        smap = np.asarray(maps[method][k], dtype=float)
        if img.ndim == 3:  # a volume: its middle slice
            mid = img.shape[0] // 2
            img, smap = img[mid], smap[mid]
            mask = np.asarray(masks[k])[mid]
        else:
            mask = np.asarray(masks[k])
        ax.imshow(img, cmap="gray")
        ax.imshow(smap, cmap="inferno", alpha=0.5, vmin=0, vmax=1)
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        value = score.get((method, image))
        ax.set_title(
            f"{method}: {label}\n{image}, AUPRC {value:.2f}"
            if value is not None
            else f"{method}: {label}",
            fontsize=8,
            color="#b00" if label == "failure" else "black",
        )
    fig.tight_layout()
    path = Path(path)
    from trustmap.core.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def failures_of(
    results: Mapping[str, Any], per_image: pd.DataFrame, examples: Mapping[str, Any]
) -> dict[str, list[str]]:
    """Per method, the images that are explainability failures: correct positive
    predictions (``examples["correct"]``) whose AUPRC is below the AVG baseline's."""
    correct = examples.get("correct")
    ids = examples.get("ids")
    if correct is None or ids is None:
        return {}
    ok = {str(i) for i, c in zip(ids, correct) if c}
    util = per_image[(per_image.criterion == "utility") & (per_image.metric == "auprc")]
    avg = util[util.method == "AVG"].set_index("image")["value"]
    out: dict[str, list[str]] = {}
    for method in examples.get("trained", {}):
        sub = util[util.method == method].set_index("image")["value"]
        bad = [str(i) for i, v in sub.items() if str(i) in ok and v < avg.get(i, -np.inf)]
        if bad:
            out[method] = bad
    return out


def gallery_section(src: str | None, failures: Mapping[str, Sequence[str]]) -> str:
    n = sum(len(v) for v in failures.values())
    text = (
        '<section id="gallery"><h2>Cases</h2><p>For each method, its best, median and worst '
        "test image by AUPRC: the map over the image, the lesion outlined in cyan. Then every "
        f"explainability failure ({n} in all, titled in red): a correct positive prediction "
        "whose map localizes the lesion worse than the average mask does (Borys et al. 2023)."
        "</p>"
    )
    if src:
        text += f'<img src="{src}" alt="case gallery">'
    else:
        text += '<p class="note">No case gallery was drawn.</p>'
    return text + "</section>"
