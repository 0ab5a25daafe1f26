"""Write an :class:`~trustmap.inspect.run.InspectResult`: ``inspect.json`` (every number),
``embedding.csv`` (one row per case), the figures, a cohort map file where one was made,
and ``inspect.html``, one self-contained page (figures embedded as base64). Computes
nothing: it only reads the result.

The output directory is written atomically: it appears complete, or not at all.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from trustmap.core.atomic import atomic_directory

__all__ = ["result_dict", "write_inspection"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 76em; padding: 0 1em; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
.note { color: #8a5a00; }
nav a { margin-right: 1em; }
"""


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars and arrays to Python, NaN/Inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        return _clean(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_dict(result: Any) -> dict[str, Any]:
    """Every number of ``result`` as a JSON-ready dict (what ``inspect.json`` holds)."""
    import trustmap

    emb = result.embedding
    errors = emb.errors
    out: dict[str, Any] = {
        "format": "trustmap-inspect",
        "version": 1,
        "trustmap": trustmap.__version__,
        "model": result.model,
        "data": result.data,
        "config": dataclasses.asdict(result.config),
        "layers": list(result.layers),
        "layer_table": [dataclasses.asdict(info) for info in result.layer_table],
        "filters": result.filters.to_dict(),
        "filter_comparison": (
            result.filter_comparison.to_dict() if result.filter_comparison is not None else None
        ),
        "unit_rates": result.unit_rates.to_dict(),
        "feature_maps": result.feature_maps.to_dict(),
        "embedding": {
            "layer": emb.layer,
            "n": len(emb),
            "dimensions": int(emb.features.shape[1]),
            "accuracy": None if errors is None else float(1 - errors.mean()),
            "projections": [p.to_dict() for p in result.projections],
            "outliers": result.outliers.to_dict(emb.ids),
            "nearest_training_cases": result.neighbours,
        },
        "dissection": [d.to_dict() for d in result.dissections],
        "influence": [t.to_dict(None) for t in result.influence],
        "maximization": [
            {"label": label, **m.to_dict()}
            for label, m in zip(result.maximization_labels, result.maximizations)
        ],
        "attention": (
            None
            if result.attention_maps is None
            else {
                "images": len(result.attention_maps),
                "peak": [float(m.max()) for m in result.attention_maps],
                "mean": [float(m.mean()) for m in result.attention_maps],
            }
        ),
        "cohort": result.cohort.to_dict() if result.cohort is not None else None,
        "timings": result.timings,
        "notes": list(result.notes),
    }
    return _clean(out)


def _figures(result: Any, folder: Path) -> dict[str, tuple[Path, str]]:
    from trustmap.inspect import plots

    folder.mkdir()
    made: dict[str, tuple[Path, str]] = {}

    def add(name: str, caption: str, draw: Any) -> None:
        path = folder / f"{name}.png"
        draw(path)
        made[name] = (path, caption)

    add(
        "filters",
        f"First-layer filters ({result.filters.layer}); red positive, blue negative weights.",
        lambda p: plots.plot_filters(result.filters, p),
    )
    if result.filter_comparison is not None:
        add(
            "filter_comparison",
            "Per filter: weight norm at initialisation and after training, and the cosine "
            "similarity between them (near 1: the filter barely moved from its random start).",
            lambda p: plots.plot_filter_comparison(result.filter_comparison, p),
        )
    add(
        "unit_rates",
        "Share of dead units (never active) and saturated units (active almost everywhere) "
        "per layer.",
        lambda p: plots.plot_unit_rates(result.unit_rates, p),
    )
    add(
        "feature_maps",
        f"Every channel of {result.feature_maps.layer} for one image.",
        lambda p: plots.plot_feature_maps(result.feature_maps, result.example_image[0], p),
    )
    add(
        "activation_maps",
        f"Mean activation of {result.layers[0]} upsampled to the input.",
        lambda p: plots.plot_activation_maps(
            result.activation_images, result.activation_maps, result.layers[0], p
        ),
    )
    for proj in result.projections:
        add(
            f"projection_{proj.method}",
            f"{proj.method.upper()} of the {result.embedding.layer} features, coloured by "
            "label, prediction, error and split.",
            lambda p, proj=proj: plots.plot_projection(proj, result.embedding, p),
        )
    add(
        "outliers",
        "kNN outlier scores (Faust et al. 2018): mean distance to the nearest training cases.",
        lambda p: plots.plot_outliers(result.outliers, p),
    )
    for d in result.dissections:
        add(
            f"dissection_{d.layer}",
            f"Network dissection of {d.layer} (Bau et al. 2017): IoU of the best units with "
            "each concept, and units per label.",
            lambda p, d=d: plots.plot_dissection(d, p),
        )
    for t in result.influence:
        add(
            f"influence_{t.layer}",
            f"DeepMiner-like table: units of {t.layer} ranked by gradient x activation on the "
            f"score of class {t.target}, with crops where each peaks highest.",
            lambda p, t=t: plots.plot_influence(t, p),
        )
    add(
        "maximization",
        "Class-model visualization (Simonyan et al. 2014) per class and Deep Dream, with the "
        "objective curves.",
        lambda p: plots.plot_maximization(result.maximizations, result.maximization_labels, p),
    )
    if result.attention_maps is not None:
        add(
            "attention",
            "The model's own attention maps (Jetley et al. 2018).",
            lambda p: plots.plot_attention(result.attention_images, result.attention_maps, p),
        )
    if result.cohort is not None:
        add(
            "cohort",
            f"Mean {result.cohort.method} map over the images of class "
            f"{result.cohort.class_index} (Singh et al. 2020, section 5).",
            lambda p: plots.plot_cohort(result.cohort, p),
        )
    return made


def _embedding_csv(result: Any) -> str:
    emb = result.embedding
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["id", "label", "prediction", "error", "split", "outlier_score", "outlier_percentile"]
    for proj in result.projections:
        header += [f"{proj.method}_x", f"{proj.method}_y"]
    writer.writerow(header)
    errors = emb.errors
    for i in range(len(emb)):
        row = [
            emb.ids[i],
            "" if emb.labels is None else int(emb.labels[i]),
            int(emb.predictions[i]),
            "" if errors is None else int(errors[i]),
            "" if emb.splits is None else emb.splits[i],
            f"{result.outliers.scores[i]:.6g}",
            f"{result.outliers.percentile[i]:.4f}",
        ]
        for proj in result.projections:
            row += [f"{proj.coords[i, 0]:.5g}", f"{proj.coords[i, 1]:.5g}"]
        writer.writerow(row)
    return buffer.getvalue()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="n">{v:.3f}</td>'
        if isinstance(v, int):
            return f'<td class="n">{v}</td>'
        return f"<td>{_e(v)}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(result: Any, numbers: dict[str, Any], figures: dict[str, tuple[Path, str]]) -> str:
    model, data = numbers["model"], numbers["data"]
    emb = numbers["embedding"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>trustmap inspect: {_e(model.get('arch'))}</title><style>{_CSS}</style>",
        "</head><body>",
        f"<h1>Model inspection: {_e(model.get('arch'))} on {_e(data.get('name'))}</h1>",
        '<nav><a href="#units">Units</a><a href="#embedding">Embedding</a>'
        '<a href="#dissection">Dissection</a><a href="#maximization">Maximization</a>'
        '<a href="#figures">Figures</a></nav>',
        "<p>What the network learned (Huff et al. 2021, section 2): its filters, feature maps "
        "and dead units, how the cases cluster in its feature space, which units match which "
        "anatomical concept, and what image each class responds to most.</p>",
        _table(
            ["model", "test ROC AUC", "dataset", "input", "images", "inspected"],
            [
                [
                    str(model.get("path") or model.get("arch")),
                    model.get("test_roc_auc") if model.get("test_roc_auc") is not None else "-",
                    str(data.get("name")),
                    " x ".join(str(s) for s in data.get("input_size", [])),
                    int(data.get("n_images", 0)),
                    int(data.get("inspected_images", 0)),
                ]
            ],
        ),
    ]
    for note in numbers["notes"]:
        parts.append(f'<p class="note">Note: {_e(note)}</p>')
    parts.append('<h2 id="units">Units per layer</h2>')
    parts.append(
        _table(
            ["layer", "kind", "units", "dead", "saturated"],
            [
                [r["layer"], r["kind"], r["units"], r["dead_rate"], r["saturated_rate"]]
                for r in numbers["unit_rates"]["layers"]
            ],
        )
    )
    comp = numbers.get("filter_comparison")
    if comp:
        parts.append(
            f"<p>First-layer filters against their initialisation: mean cosine similarity "
            f"{comp['mean_cosine']:.3f}.</p>"
        )
    parts.append('<h2 id="embedding">Embedding</h2>')
    parts.append(
        f"<p>{emb['n']} cases, features of <code>{_e(emb['layer'])}</code> "
        f"({emb['dimensions']} dimensions); accuracy {emb['accuracy']:.3f}.</p>"
        if emb.get("accuracy") is not None
        else ""
    )
    parts.append(
        _table(
            ["projection", "trustworthiness", "k", "seconds"],
            [
                [p["method"], p["trustworthiness"], p["n_neighbors"], p["seconds"]]
                for p in emb["projections"]
            ],
        )
    )
    out = emb["outliers"]
    parts.append(
        f"<p>kNN outliers (k = {out['k']}): {out['n_flagged']} cases above the "
        f"{out['quantile']:.0%} quantile of the training cases' scores. Highest:</p>"
    )
    parts.append(
        _table(
            ["case", "score", "percentile of training"],
            [[t["id"], t["score"], t["percentile"]] for t in out["top"][:10]],
        )
    )
    parts.append('<h2 id="dissection">Network dissection</h2>')
    if not numbers["dissection"]:
        parts.append("<p>Not run: no concept masks.</p>")
    for d in numbers["dissection"]:
        best = d["best_unit_per_concept"]
        parts.append(
            f"<p><code>{_e(d['layer'])}</code>: {d['units']} units over {d['n_images']} images, "
            f"threshold at the top {d['quantile']:.1%} of each unit's activations, labelled at "
            f"IoU >= {d['iou_threshold']}.</p>"
        )
        parts.append(
            _table(
                ["concept", "units labelled", "best unit", "its IoU"],
                [
                    [c, d["labelled_units"][c], best[c]["unit"], best[c]["iou"]]
                    for c in d["concepts"]
                ],
            )
        )
    for t in numbers["influence"]:
        parts.append(
            f"<p>Most influential units of <code>{_e(t['layer'])}</code> on class "
            f"{t['target']} (gradient x activation):</p>"
        )
        parts.append(
            _table(
                ["rank", "unit", "influence", "concept", "IoU"],
                [
                    [
                        r["rank"],
                        r["unit"],
                        r["influence"],
                        r["concept"] or "-",
                        r["iou"] if r["iou"] is not None else "-",
                    ]
                    for r in t["rows"]
                ],
            )
        )
    parts.append('<h2 id="maximization">Activation maximization</h2>')
    parts.append(
        _table(
            ["objective", "start", "final", "steps"],
            [
                [m["label"], m["start_score"], m["final_score"], m["params"]["steps"]]
                for m in numbers["maximization"]
            ],
        )
    )
    parts.append('<h2 id="figures">Figures</h2>')
    for number, (name, (path, caption)) in enumerate(figures.items(), start=1):
        data64 = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="fig-{_e(name)}"><img src="data:image/png;base64,{data64}" '
            f'alt="{_e(name)}"><figcaption><b>Figure {number}.</b> {_e(caption)}'
            "</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_inspection(result: Any, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``result`` into the directory ``out`` (atomically) and return it.

    Files: ``inspect.json``, ``embedding.csv``, ``figures/*.png``, ``inspect.html`` and,
    with a cohort map, ``cohort.nii.gz`` (3D, with the images' affine) or ``cohort.npy``.
    ``out`` may exist only as an empty directory unless ``overwrite``.
    """
    numbers = result_dict(result)
    text = json.dumps(numbers, indent=2, allow_nan=False)
    with atomic_directory(out, overwrite=overwrite) as temp:
        figures = _figures(result, temp / "figures")
        if result.cohort is not None:
            name = "cohort.nii.gz" if result.cohort.mean.ndim == 3 else "cohort.npy"
            if name.endswith(".npy"):
                np.save(temp / name, result.cohort.mean)
            else:
                result.cohort.save_nifti(temp / name)
        (temp / "inspect.json").write_text(text + "\n")
        (temp / "embedding.csv").write_text(_embedding_csv(result))
        (temp / "inspect.html").write_text(_html(result, numbers, figures))
    return Path(out)
