"""The quantitative evaluation of Katzmann et al. 2021, section 4.1, with JSON and HTML output.

For every image ``x`` of a split (the test split by default) the classifier's positive
probability on ``x``, ``G-(x)`` and ``G+(x)``. The paper reports their means with 95 %
confidence intervals and paired two-tailed t-tests between the transferred and the
original images (paper: .470 -> .820 for ``G+``, .470 -> .289 for ``G-``, ``t(233)`` =
17.9 and 14.5). Added here: the effect sizes (Cohen's ``d_z`` for paired samples: the
mean of the paired differences over their standard deviation), and how far each
counterfactual is from its input (SSIM and L1).

``counterfactual.json``::

    {"probability": {"original": {"mean", "ci"}, "minus": {...}, "plus": {...}},
     "t_tests": {"plus_vs_original": {"t", "p", "effect_size", ...},
                 "minus_vs_original": {...}},
     "similarity": {"ssim": {"minus": {"mean", "ci"}, "plus": {...}},
                    "l1": {"minus": {...}, "plus": {...}}},
     ...}

plus ``n``, ``split``, ``classes``, ``effect_size_kind``, ``by_label`` (the mean
probabilities per true class, read only here, never in training) and
``decision_changes`` (how often the thresholded decision at 0.5 moved).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.atomic import write_text_atomic
from trustmap.counterfactual import losses as L
from trustmap.counterfactual.networks import CounterfactualGenerators, load_generators
from trustmap.counterfactual.training import (
    _figure,
    check_binary,
    counterfactuals,
    load_classifier,
    load_images,
    middle_slice,
)
from trustmap.models.training import open_training_dataset

__all__ = [
    "EFFECT_SIZE_KIND",
    "CounterfactualEvaluation",
    "evaluate_counterfactual",
    "mean_ci",
    "paired_t_test",
]

EFFECT_SIZE_KIND = "cohen_dz"
JSON_NAME = "counterfactual.json"
HTML_NAME = "report.html"


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Mean with its two-sided t confidence interval: ``{"mean", "ci": [low, high]}``."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n == 0:
        return {"mean": None, "ci": [None, None]}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "ci": [None, None]}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci": [mean - half, mean + half]}


def paired_t_test(after: np.ndarray, before: np.ndarray) -> dict[str, Any]:
    """Paired two-tailed t-test of ``after - before`` with Cohen's ``d_z``.

    Returns ``{"t", "p", "df", "effect_size", "mean_difference", "ci"}`` where
    ``effect_size = mean(d) / sd(d)`` over the paired differences ``d`` and ``ci`` is the
    95 % interval of ``mean(d)``. A zero spread gives ``t`` and ``effect_size`` of None
    (undefined) unless the mean difference is zero too.
    """
    from scipy import stats

    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    n = d.size
    out: dict[str, Any] = {"df": max(n - 1, 0), **_renamed(mean_ci(d), "mean_difference")}
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    if n < 2 or sd == 0.0:
        out.update({"t": None, "p": None, "effect_size": None})
        return out
    res = stats.ttest_rel(after, before)
    out.update({"t": float(res.statistic), "p": float(res.pvalue), "effect_size": d.mean() / sd})
    out["effect_size"] = float(out["effect_size"])
    return out


def _renamed(summary: dict[str, Any], mean_key: str) -> dict[str, Any]:
    return {mean_key: summary["mean"], "ci": summary["ci"]}


@dataclass(frozen=True, eq=False)
class CounterfactualEvaluation:
    """The evaluation's numbers; :meth:`to_dict` is the content of ``counterfactual.json``.

    ``per_sample`` holds the arrays behind them: ``p_original``, ``p_minus``,
    ``p_plus``, ``ssim_minus``, ``ssim_plus``, ``l1_minus``, ``l1_plus`` and ``labels``.
    """

    probability: dict[str, dict[str, Any]]
    t_tests: dict[str, dict[str, Any]]
    similarity: dict[str, dict[str, Any]]
    n: int
    split: str
    classes: tuple[str, str]
    by_label: dict[str, dict[str, Any]]
    decision_changes: dict[str, Any]
    generators: dict[str, Any] = field(default_factory=dict)
    per_sample: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "t_tests": self.t_tests,
            "similarity": self.similarity,
            "n": self.n,
            "split": self.split,
            "classes": list(self.classes),
            "positive_class": self.classes[1],
            "effect_size_kind": EFFECT_SIZE_KIND,
            "by_label": self.by_label,
            "decision_changes": self.decision_changes,
            "generators": self.generators,
        }


def _ssim_per_sample(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    from skimage.metrics import structural_similarity

    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        a, b = x[i], y[i]
        # scikit-image's defaults (7-pixel window); several channels are averaged.
        if a.shape[0] == 1:
            out[i] = structural_similarity(a[0], b[0], data_range=data_range)
        else:
            out[i] = structural_similarity(a, b, data_range=data_range, channel_axis=0)
    return out


def _resolve_generators(
    generators: CounterfactualGenerators | str | os.PathLike[str], device: torch.device
) -> CounterfactualGenerators:
    if isinstance(generators, CounterfactualGenerators):
        return generators
    if isinstance(generators, (str, os.PathLike)):
        return load_generators(generators, map_location=device)
    raise TypeError(
        "generators must be a training directory, a generators.pt file or "
        f"CounterfactualGenerators, got {type(generators).__name__}"
    )


def evaluate_counterfactual(
    classifier: nn.Module | str | os.PathLike[str],
    generators: CounterfactualGenerators | str | os.PathLike[str],
    dataset: Any,
    *,
    out: str | os.PathLike[str] | None = None,
    split: str = "test",
    n_examples: int = 6,
    batch_size: int = 64,
    device: str = "cpu",
) -> CounterfactualEvaluation:
    """Evaluate trained generators as in Katzmann et al. 2021, section 4.1.

    Parameters
    ----------
    classifier
        The classifier the generators were trained for (module or checkpoint path).
    generators
        A training directory, its ``generators.pt`` or a
        :class:`~trustmap.counterfactual.networks.CounterfactualGenerators`.
    dataset
        ImageDataset, dataset directory or phantom name; images are resized to the
        generators' input size.
    out
        If given, ``counterfactual.json`` and a self-contained ``report.html`` (images
        embedded as base64) are written there atomically.
    split
        ``"train"``, ``"val"`` or ``"test"``.
    n_examples
        Example triplets shown in the report.

    Raises
    ------
    ValueError
        A classifier that is not binary or not the kind the generators were trained
        against, images of another size or channel count than the generators', an empty
        split.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    dev = torch.device(device)
    model, _ = load_classifier(classifier)
    model.to(dev)
    gens = _resolve_generators(generators, dev)
    ds = open_training_dataset(dataset)
    data = load_images(ds, gens.image_size)
    idx = data.split[split]
    if len(idx) < 2:
        raise ValueError(f"the {split!r} split of {data.name} has fewer than 2 images")
    x_all = data.images[torch.as_tensor(idx)]
    if tuple(x_all.shape[1:]) != (gens.in_channels, *gens.image_size):
        raise ValueError(
            f"the generators were trained for {gens.describe()}; {data.name} has "
            f"{tuple(x_all.shape[1:])} (channels, *size)"
        )
    outputs = check_binary(model, x_all[:2].to(dev))
    if outputs != gens.classifier_outputs:
        raise ValueError(
            f"the generators were trained against a classifier with {gens.classifier_outputs} "
            f"output(s); this one has {outputs}"
        )
    labels = np.asarray(ds.labels, dtype=np.int64)[idx]
    data_range = float(gens.meta.get("data_range") or float(x_all.max() - x_all.min()) or 1.0)

    p = {"original": [], "minus": [], "plus": []}
    ssim = {"minus": [], "plus": []}
    l1 = {"minus": [], "plus": []}
    flags = [(m, m.training) for m in (gens.plus, gens.minus)]
    try:
        for m, _ in flags:
            m.eval()
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start : start + batch_size].to(dev)
            plus, minus = counterfactuals(gens.plus, gens.minus, x, batch_size)
            with torch.no_grad():
                for key, t in (("original", x), ("minus", minus), ("plus", plus)):
                    p[key].append(L.positive_probability(model(t)).double().cpu().numpy())
            xn = x.double().cpu().numpy()
            for key, t in (("minus", minus), ("plus", plus)):
                tn = t.double().cpu().numpy()
                ssim[key].append(_ssim_per_sample(xn, tn, data_range))
                l1[key].append(np.abs(xn - tn).reshape(xn.shape[0], -1).mean(1))
    finally:
        for m, flag in flags:
            m.train(flag)
    per = {f"p_{k}": np.concatenate(v) for k, v in p.items()}
    per.update({f"ssim_{k}": np.concatenate(v) for k, v in ssim.items()})
    per.update({f"l1_{k}": np.concatenate(v) for k, v in l1.items()})
    per["labels"] = labels

    probability = {k: mean_ci(per[f"p_{k}"]) for k in ("original", "minus", "plus")}
    t_tests = {
        f"{k}_vs_original": paired_t_test(per[f"p_{k}"], per["p_original"])
        for k in ("plus", "minus")
    }
    similarity = {
        "ssim": {k: mean_ci(per[f"ssim_{k}"]) for k in ("minus", "plus")},
        "l1": {k: mean_ci(per[f"l1_{k}"]) for k in ("minus", "plus")},
        "data_range": data_range,
        "ssim_settings": "scikit-image structural_similarity defaults (7-pixel window)",
    }
    by_label = {
        data.classes[c]: {
            "n": int((labels == c).sum()),
            **{
                k: mean_ci(per[f"p_{k}"][labels == c])["mean"]
                for k in ("original", "minus", "plus")
            },
        }
        for c in (0, 1)
    }
    pos = {k: per[f"p_{k}"] >= 0.5 for k in ("original", "minus", "plus")}
    decision_changes = {
        "threshold": 0.5,
        "plus_to_positive": float(np.mean(pos["plus"][~pos["original"]]))
        if (~pos["original"]).any()
        else None,
        "minus_to_negative": float(np.mean(~pos["minus"][pos["original"]]))
        if pos["original"].any()
        else None,
        "plus_increases": float(np.mean(per["p_plus"] > per["p_original"])),
        "minus_decreases": float(np.mean(per["p_minus"] < per["p_original"])),
    }
    evaluation = CounterfactualEvaluation(
        probability=probability,
        t_tests=t_tests,
        similarity=similarity,
        n=len(idx),
        split=split,
        classes=data.classes,
        by_label=by_label,
        decision_changes=decision_changes,
        generators={
            "path": gens.path,
            "image_size": list(gens.image_size),
            "in_channels": gens.in_channels,
            "arch": dict(gens.arch),
            "steps": gens.meta.get("steps"),
            "seconds": gens.meta.get("seconds"),
            "dataset": gens.meta.get("dataset"),
        },
        per_sample=per,
    )
    if out is None:
        return evaluation
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_text_atomic(
        out_dir / JSON_NAME, json.dumps(_json_safe(evaluation.to_dict()), indent=2) + "\n"
    )
    picks = np.unique(np.round(np.linspace(0, len(idx) - 1, min(n_examples, len(idx)))).astype(int))
    x_ex = x_all[torch.as_tensor(picks)].to(dev)
    plus_ex, minus_ex = counterfactuals(gens.plus, gens.minus, x_ex)
    html_text = render_report(
        evaluation, x_ex.cpu(), minus_ex.cpu(), plus_ex.cpu(), picks, data.name, data.classes
    )
    html_path = write_text_atomic(out_dir / HTML_NAME, html_text)
    return CounterfactualEvaluation(
        **{
            **{f: getattr(evaluation, f) for f in evaluation.__dataclass_fields__},
            "files": {"json": str(json_path), "html": str(html_path)},
        }
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------
# The HTML report
# ----------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10**-digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _ci(summary: Mapping[str, Any]) -> str:
    low, high = summary.get("ci") or (None, None)
    return f"{_fmt(summary.get('mean'))} [{_fmt(low)}, {_fmt(high)}]"


def _bar_figure(ev: CounterfactualEvaluation) -> Any:
    fig = _figure((8, 3.2))
    ax, hist = fig.subplots(1, 2)
    keys = ("minus", "original", "plus")
    names = ("G-(x)", "x", "G+(x)")
    means = [ev.probability[k]["mean"] for k in keys]
    lows = [m - (ev.probability[k]["ci"][0] or m) for k, m in zip(keys, means)]
    highs = [(ev.probability[k]["ci"][1] or m) - m for k, m in zip(keys, means)]
    ax.bar(names, means, yerr=[lows, highs], color=["tab:blue", "0.6", "tab:red"], capsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"mean P({ev.classes[1]})")
    ax.set_title("classifier output, 95 % CI")
    bins = np.linspace(0, 1, 21)
    for k, colour, name in zip(keys, ("tab:blue", "0.4", "tab:red"), names):
        hist.hist(ev.per_sample[f"p_{k}"], bins=bins, histtype="step", color=colour, label=name)
    hist.set_xlabel(f"P({ev.classes[1]})")
    hist.set_ylabel("images")
    hist.legend(fontsize=8)
    hist.set_title("distribution over images")
    return fig


def _example_figure(
    x: torch.Tensor,
    minus: torch.Tensor,
    plus: torch.Tensor,
    probs: Mapping[str, float],
    title: str,
) -> Any:
    """``x``, ``G-(x)``, ``G+(x)`` and ``R`` drawn over ``x`` (red: G+, blue: G-)."""
    fig = _figure((10, 2.8))
    axes = fig.subplots(1, 4)
    images = [middle_slice(t.numpy()) for t in (x, minus, plus)]
    low, high = np.percentile(images[0], [0.5, 99.5])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    for ax, img, key, name in zip(
        axes, images, ("original", "minus", "plus"), ("x", "G-(x)", "G+(x)")
    ):
        ax.imshow(img, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(f"{name}  P={probs[key]:.2f}", fontsize=9)
    r = images[2] - images[1]
    lim = float(np.percentile(np.abs(r), 99.5)) or 1.0
    ax = axes[3]
    ax.imshow(images[0], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    # Opacity grows with |R|, so the anatomy shows where the generators changed nothing.
    alpha = np.clip(np.abs(r) / lim, 0, 1) * 0.8
    shown = ax.imshow(r, cmap="bwr", vmin=-lim, vmax=lim, alpha=alpha, interpolation="nearest")
    ax.set_title("R = G+(x) - G-(x) over x", fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


def render_report(
    ev: CounterfactualEvaluation,
    x: torch.Tensor,
    minus: torch.Tensor,
    plus: torch.Tensor,
    picks: np.ndarray,
    dataset: str,
    classes: Sequence[str],
) -> str:
    """The self-contained HTML report (every figure embedded as a base64 PNG)."""
    rows_p = "".join(
        f"<tr><td>{name}</td><td>{_ci(ev.probability[k])}</td></tr>"
        for k, name in (("original", "x"), ("minus", "G-(x)"), ("plus", "G+(x)"))
    )
    rows_t = "".join(
        f"<tr><td>{name}</td><td>{_fmt(t['mean_difference'])} "
        f"[{_fmt(t['ci'][0])}, {_fmt(t['ci'][1])}]</td><td>{_fmt(t['t'], 2)}</td>"
        f"<td>{t['df']}</td><td>{_fmt(t['p'])}</td><td>{_fmt(t['effect_size'], 2)}</td></tr>"
        for name, t in (
            ("G+(x) vs x", ev.t_tests["plus_vs_original"]),
            ("G-(x) vs x", ev.t_tests["minus_vs_original"]),
        )
    )
    rows_s = "".join(
        f"<tr><td>{name}</td><td>{_ci(ev.similarity['ssim'][k])}</td>"
        f"<td>{_ci(ev.similarity['l1'][k])}</td></tr>"
        for k, name in (("minus", "x vs G-(x)"), ("plus", "x vs G+(x)"))
    )
    rows_l = "".join(
        f"<tr><td>{html.escape(name)} (n={v['n']})</td><td>{_fmt(v['original'])}</td>"
        f"<td>{_fmt(v['minus'])}</td><td>{_fmt(v['plus'])}</td></tr>"
        for name, v in ev.by_label.items()
    )
    examples = []
    for i, pick in enumerate(picks):
        probs = {k: float(ev.per_sample[f"p_{k}"][pick]) for k in ("original", "minus", "plus")}
        label = classes[int(ev.per_sample["labels"][pick])]
        fig = _example_figure(x[i], minus[i], plus[i], probs, f"{ev.split} image {pick} ({label})")
        examples.append(f'<img alt="example {pick}" src="data:image/png;base64,{_png(fig)}">')
    bars = _png(_bar_figure(ev))
    pos = html.escape(classes[1])
    dc = ev.decision_changes
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>cyclegan_am evaluation: {html.escape(dataset)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
th {{ background: #f2f2f2; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; }}
.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>Counterfactual explanations: cycle-consistent activation maximization</h1>
<p class="note">Katzmann et al. 2021, section 4.1.
Dataset <b>{html.escape(dataset)}</b>, {html.escape(ev.split)} split, n = {ev.n}.
G+ pushes the classifier towards <b>{pos}</b>, G- away from it;
R = G+(x) - G-(x), red where G+ adds intensity relative to G-, blue where G- does.</p>
<h2>Classifier output: mean P({pos}) with 95 % CI</h2>
<table><tr><th>images</th><th>mean [95 % CI]</th></tr>{rows_p}</table>
<img alt="probabilities" src="data:image/png;base64,{bars}">
<h2>Paired two-tailed t-tests</h2>
<table><tr><th>comparison</th><th>mean difference [95 % CI]</th><th>t</th><th>df</th>
<th>p</th><th>Cohen's d<sub>z</sub></th></tr>{rows_t}</table>
<p class="note">Effect size: Cohen's d for paired samples (d<sub>z</sub> = mean of the paired
differences / their standard deviation). G+ raised the probability for
{_fmt(dc["plus_increases"] * 100, 1)} % of the images, G- lowered it for
{_fmt(dc["minus_decreases"] * 100, 1)} %.</p>
<h2>By true class</h2>
<table><tr><th>class</th><th>x</th><th>G-(x)</th><th>G+(x)</th></tr>{rows_l}</table>
<h2>Image similarity to x</h2>
<table><tr><th>pair</th><th>SSIM [95 % CI]</th><th>L1 [95 % CI]</th></tr>{rows_s}</table>
<p class="note">SSIM: scikit-image defaults, data range {_fmt(ev.similarity["data_range"])}.</p>
<h2>Examples</h2>
{"".join(examples)}
</body></html>
"""
