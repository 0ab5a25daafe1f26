"""The model card: ``model_card.json``, ``model_card.md`` and ``learning_curves.png``.

The card is built by :mod:`trustmap.models.training` as a plain JSON-like dict; this module
only writes it (atomically) and renders it. Its main keys: ``kind`` (classifier or
localizer), ``arch``, ``params``, ``seed``, ``dataset`` (name, path, counts per split and
class), ``epochs_run``, ``best_epoch``, ``wall_time_s``, ``threshold``, ``test`` (metrics
with 95 % bootstrap intervals), ``confusion``, ``history`` (one row per epoch),
``findings`` (the checks of Huff et al.'s (2021) appendix) and ``versions``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trustmap.core.atomic import atomic_path, write_text_atomic

__all__ = ["plot_learning_curves", "render_markdown", "write_model_card"]

_METRIC_NAMES = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "informedness": "Informedness",
    "markedness": "Markedness",
    "mcc": "MCC",
    "roc_auc": "ROC AUC",
    "dice": "Dice (test images with a lesion)",
    "iou": "IoU (test images with a lesion)",
    "auprc": "AUPRC of the map vs the mask",
}


def _json_safe(value: Any) -> Any:
    """Replace NaN/Inf by None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _metric_cell(metric: Any) -> str:
    if isinstance(metric, Mapping):
        text = _fmt(metric.get("value"))
        if metric.get("low") is not None and metric.get("high") is not None:
            text += f" [{_fmt(metric['low'])}, {_fmt(metric['high'])}]"
        if metric.get("value") is None and metric.get("reason"):
            text += f" ({metric['reason']})"
        return text
    return _fmt(metric)


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as a markdown document."""
    ds = card.get("dataset", {})
    lines = [
        f"# Model card: {card.get('arch')} on {ds.get('name')}",
        "",
        f"- Kind: {card.get('kind')}; architecture `{card.get('arch')}` "
        f"{card.get('create_kwargs') or ''}; {card.get('params', 0):,} parameters",
        f"- Seed: {card.get('seed')}",
        f"- Dataset: `{ds.get('name')}` ({ds.get('path') or 'in memory'}), input size "
        f"{ds.get('input_size')} (native {ds.get('native_size')})",
        f"- Epochs run: {card.get('epochs_run')} (best epoch {card.get('best_epoch')}, stopped by "
        f"{card.get('stop_reason')}); training time {card.get('wall_time_s', 0):.1f} s",
    ]
    if card.get("threshold") is not None:
        lines.append(
            f"- Decision threshold on P({(ds.get('classes') or ['', 'positive'])[-1]}): "
            f"{_fmt(card.get('threshold'))}"
        )
    versions = card.get("versions", {})
    lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines += ["", "## Data", "", "| split | " + " | ".join(ds.get("classes", [])) + " |"]
    lines.append("|---" * (1 + len(ds.get("classes", []))) + "|")
    for split, counts in (ds.get("counts") or {}).items():
        lines.append(f"| {split} | " + " | ".join(str(v) for v in counts.values()) + " |")
    test = card.get("test", {})
    lines += [
        "",
        "## Test metrics (95 % bootstrap intervals)",
        "",
        "| metric | value [95 % CI] |",
        "|---|---|",
    ]
    for key, label in _METRIC_NAMES.items():
        if key in test:
            lines.append(f"| {label} | {_metric_cell(test[key])} |")
    if test.get("detection_roc_auc") is not None:
        lines.append(
            f"| Image-level ROC AUC of the map's maximum | {_fmt(test['detection_roc_auc'])} |"
        )
    confusion = card.get("confusion")
    if confusion and len(confusion) == 2:
        (tn, fp), (fn, tp) = confusion
        lines += [
            "",
            "## Confusion matrix (test)",
            "",
            "| | predicted negative | predicted positive |",
            "|---|---|---|",
            f"| true negative | {tn} | {fp} |",
            f"| true positive | {fn} | {tp} |",
        ]
    lines += ["", "## Checks (Huff et al. 2021, Appendix 1)", ""]
    findings = card.get("findings", [])
    if not findings:
        lines.append(
            "No findings: learning curves, feature maps, class balance, masks and "
            "augmentation look sound."
        )
    for f in findings:
        lines.append(f"- **{f['severity']}** `{f['id']}`: {f['message']}")
    lines += ["", "## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    history = card.get("history", [])
    if history:
        keys = [k for k in history[0] if k != "epoch"]
        lines.append("| epoch | " + " | ".join(keys) + " |")
        lines.append("|---" * (1 + len(keys)) + "|")
        for row in history:
            lines.append(
                f"| {row.get('epoch')} | " + " | ".join(_fmt(row.get(k), 4) for k in keys) + " |"
            )
    return "\n".join(lines) + "\n"


def plot_learning_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    best_epoch: int | None = None,
    title: str = "",
) -> Path:
    """Training and validation loss per epoch, and the validation metric(s), as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        ax_loss.plot(epochs, [row.get(key) for row in history], marker="o", ms=3, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    metric_keys = [
        k
        for k in ("val_auc", "val_dice", "val_auprc")
        if any(row.get(k) is not None for row in history)
    ]
    for key in metric_keys:
        values = [row.get(key) if row.get(key) is not None else float("nan") for row in history]
        ax_metric.plot(
            epochs,
            values,
            marker="o",
            ms=3,
            label=key.replace("val_", "validation ").replace("auc", "ROC AUC"),
        )
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylim(0, 1.02)
    if metric_keys:
        ax_metric.legend()
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png")
    return Path(path)


def write_model_card(out: str | os.PathLike[str], card: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``model_card.json``, ``model_card.md`` and ``learning_curves.png`` into ``out``.

    Each file is written atomically. Returns their paths by kind.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    safe = _json_safe(card)
    curves = plot_learning_curves(
        safe.get("history", []),
        out / "learning_curves.png",
        best_epoch=safe.get("best_epoch"),
        title=(
            f"{safe.get('arch')} on {safe.get('dataset', {}).get('name')} (seed {safe.get('seed')})"
        ),
    )
    md = write_text_atomic(out / "model_card.md", render_markdown(safe))
    js = write_text_atomic(
        out / "model_card.json", json.dumps(safe, indent=2, allow_nan=False) + "\n"
    )
    return {"json": js, "markdown": md, "learning_curves": curves}
