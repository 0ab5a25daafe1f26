"""Explain many cases: a folder, a CSV or DICOM series, with per-case results, a gallery
and resume.

This is the work behind ``trustmap explain --input FOLDER|CSV``. Each case is explained
by :func:`trustmap.run.explain_image` into ``out/cases/<id>/``; ``gallery.html`` shows one
row per case (the image, the prediction, every method's overlay) and sorts by prediction,
by name or by map agreement, the mean SSIM between the post-processed maps of the
methods (Arun et al. 2021 compare maps the same way).

Resume: a case's results are keyed on a hash of the image as the model sees it (after
loading, windowing, resizing, normalising), the model's weights, the methods with their
parameters and the target. A case whose ``summary.json`` carries the same key and whose
maps are all there is not recomputed; any change recomputes that case. A case
interrupted half-way keeps the methods it finished under the same key.
"""

from __future__ import annotations

import csv
import html
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.atomic import write_text_atomic

IMAGE_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".npy", ".ima")


@dataclass(frozen=True)
class Case:
    """One input of a batch: an id (its folder name in the output) and a path."""

    id: str
    path: Path


@dataclass
class BatchResult:
    """What :func:`explain_batch` did: a row per case, and which cases it computed."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_dicom_series(folder: Path) -> bool:
    """A folder of DICOM slices of one volume: no subfolders, every file DICOM, one
    SeriesInstanceUID and more than one slice position. A folder of separate images
    (radiographs, or slices of different series) is many cases instead."""
    import pydicom

    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) < 2 or any(p.is_dir() for p in entries):
        return False
    if not all(_suffix(p) in (".dcm", ".dicom", ".ima", "") and _has_dicm(p) for p in entries):
        return False
    series, positions = set(), set()
    for p in entries:
        try:
            ds = pydicom.dcmread(
                p,
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "ImagePositionPatient"],
            )
        except Exception:  # an unreadable file: let the case report it
            return False
        series.add(str(ds.get("SeriesInstanceUID", "")))
        positions.add(tuple(float(v) for v in ds.get("ImagePositionPatient", []) or []))
    return len(series) == 1 and len(positions) > 1


def _has_dicm(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_batch(path: str | Path) -> bool:
    """Whether ``--input`` names many cases (a CSV, or a folder that is not one series)."""
    p = Path(path)
    if p.is_file():
        return _suffix(p) == ".csv"
    return p.is_dir() and not _is_dicom_series(p)


def find_cases(path: str | Path) -> list[Case]:
    """The cases of a folder or a CSV.

    A folder: each image file is a case, and each subfolder that is a DICOM series is one
    (3D) case. A CSV: a column ``image`` with paths relative to the CSV, and optionally
    ``id``. ValueError for an empty folder, a CSV without ``image`` or a missing file.
    """
    p = Path(path)
    cases: list[Case] = []
    if p.is_file():
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise ValueError(f"{p}: a batch CSV needs a column 'image' (and optionally 'id')")
            for line, row in enumerate(reader, start=2):
                image = (row.get("image") or "").strip()
                if not image:
                    raise ValueError(f"{p} row {line}: empty image path")
                file = (p.parent / image).resolve()
                if not file.exists():
                    raise FileNotFoundError(f"{p} row {line}: {image} does not exist")
                case_id = (row.get("id") or "").strip() or _stem(file)
                cases.append(Case(_safe(case_id), file))
    else:
        for entry in sorted(p.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and _is_dicom_series(entry):
                cases.append(Case(_safe(entry.name), entry))
            elif entry.is_file() and (
                _suffix(entry) in IMAGE_SUFFIXES or (not entry.suffix and _has_dicm(entry))
            ):
                cases.append(Case(_safe(_stem(entry)), entry))
    if not cases:
        raise ValueError(
            f"{p} holds no case: expected image files (DICOM, NIfTI, PNG/JPEG, NPY), DICOM "
            "series folders, or a CSV with an 'image' column"
        )
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise ValueError(f"two cases in {p} are both called {case.id!r}; give them ids")
        seen.add(case.id)
    return cases


def _stem(path: Path) -> str:
    name = path.name
    suffix = _suffix(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def _safe(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._")
    return out or "case"


def case_key(
    x: torch.Tensor, weights: str, methods: Sequence[str], params: dict, target: Any
) -> str:
    """The resume key of one case (see the module docstring)."""
    from trustmap.trust.cache import array_hash, key_of

    return key_of("explain-case", array_hash(x), weights, list(methods), params, repr(target))


def map_agreement(maps: dict[str, np.ndarray]) -> float | None:
    """Mean SSIM over the pairs of methods, on maps post-processed as the trust protocol
    does (absolute value, channels summed, 99th-percentile clip, min-max); None with
    fewer than two maps."""
    from trustmap.metrics.similarity import ssim
    from trustmap.trust.postprocess import postprocess

    if len(maps) < 2:
        return None
    post = {}
    for name, m in maps.items():  # each (C, *spatial)
        t = torch.as_tensor(np.asarray(m, dtype=np.float32)).unsqueeze(0)
        post[name] = np.asarray(postprocess(t))[0]
    values = [float(ssim(post[a], post[b])) for a, b in combinations(post, 2)]
    return float(np.mean(values))


def explain_batch(
    model: nn.Module,
    cases: Sequence[Case],
    methods: Sequence[str],
    out: str | Path,
    *,
    prepare: Callable[[Any], torch.Tensor],
    load: Callable[[Path], Any],
    params: dict[str, dict[str, Any]] | None = None,
    target: Any = None,
    resume: bool = True,
    on_case: Callable[[int, Case, str], None] | None = None,
) -> BatchResult:
    """Explain every case into ``out/cases/<id>/`` and write ``gallery.html`` and
    ``gallery.json``.

    ``load(path)`` reads a case (a :class:`~trustmap.data.io.LoadedImage`),
    ``prepare(image)`` turns it into the model's ``(1, C, *spatial)`` input. A case that
    cannot be read is recorded as failed and the others still run. ``on_case(i, case,
    status)`` is called before each case (status ``"explaining"`` or ``"reused"``).
    """
    from trustmap.run import explain_image
    from trustmap.trust.cache import weights_hash

    out = Path(out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    params = params or {}
    weights = weights_hash(model)
    result = BatchResult()
    started = time.perf_counter()
    for i, case in enumerate(cases):
        folder = out / "cases" / case.id
        try:
            image = load(case.path)
            x = prepare(image)
        except (ValueError, TypeError, FileNotFoundError) as err:
            result.failed[case.id] = str(err)
            result.rows.append({"id": case.id, "input": str(case.path), "error": str(err)})
            continue
        key = case_key(x, weights, methods, params, target)
        previous = _read_summary(folder)
        complete = (
            resume
            and previous.get("case_key") == key
            and all(
                (folder / str(r.get("overlay_path"))).is_file()
                for r in previous.get("methods", {}).values()
                if not r.get("error") and not r.get("skipped")
            )
            and set(previous.get("methods", {})) == set(methods)
        )
        if on_case:
            on_case(i, case, "reused" if complete else "explaining")
        if complete:
            summary_json = previous
            result.reused.append(case.id)
        else:
            same_key = resume and previous.get("case_key") == key
            summary = explain_image(
                model,
                x,
                methods,
                folder,
                name=str(case.path),
                target=target,
                params=params,
                like=image,
                resume=same_key,
            )
            summary_json = summary.to_json()
            summary_json["case_key"] = key
            summary_json["agreement"] = map_agreement(_maps_of(folder, summary_json))
            _write_input_png(folder, x)
            write_text_atomic(folder / "summary.json", json.dumps(summary_json, indent=2))
            result.computed.append(case.id)
        result.rows.append(_row(case, summary_json))
    result.seconds = time.perf_counter() - started
    write_gallery(out, result.rows, methods)
    return result


def _read_summary(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _maps_of(folder: Path, summary: dict[str, Any]) -> dict[str, np.ndarray]:
    from trustmap.data.io import load

    maps = {}
    for name, r in summary.get("methods", {}).items():
        path = r.get("map_path")
        if not path or r.get("error") or r.get("skipped"):
            continue
        file = folder / path
        maps[name] = np.load(file) if file.suffix == ".npy" else load(file).array[None]
    return maps


def _write_input_png(folder: Path, x: torch.Tensor) -> None:
    """The case as the model saw it (the middle slice of a volume), for the gallery."""
    from PIL import Image

    from trustmap.core.atomic import atomic_path

    img = x[0].detach().float().cpu().mean(0).numpy()
    if img.ndim == 3:
        img = img[img.shape[0] // 2]
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    with atomic_path(folder / "input.png") as tmp:
        Image.fromarray((img * 255).astype(np.uint8)).save(tmp, format="PNG")


def _row(case: Case, summary: dict[str, Any]) -> dict[str, Any]:
    probs = summary.get("probabilities") or []
    pred = summary.get("prediction")
    return {
        "id": case.id,
        "input": str(case.path),
        "prediction": pred,
        "probability": probs[pred] if isinstance(pred, int) and pred < len(probs) else None,
        "probabilities": probs,
        "agreement": summary.get("agreement"),
        "warnings": summary.get("warnings", []),
        "methods": {
            m: {
                "overlay": f"cases/{case.id}/{r['overlay_path']}"
                if r.get("overlay_path")
                else None,
                "seconds": r.get("seconds"),
                "skipped": r.get("skipped"),
                "error": r.get("error"),
            }
            for m, r in summary.get("methods", {}).items()
        },
    }


def write_gallery(out: Path, rows: list[dict[str, Any]], methods: Sequence[str]) -> Path:
    """``gallery.html`` (self-contained page, images linked from ``cases/``) and
    ``gallery.json``, both written atomically."""
    write_text_atomic(
        out / "gallery.json", json.dumps({"methods": list(methods), "cases": rows}, indent=2)
    )
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    body = []
    for row in rows:
        if row.get("error"):
            body.append(
                f'<tr data-id="{html.escape(row["id"])}" data-pred="-1" data-prob="-1" '
                f'data-agree="-1"><td class="case">{html.escape(row["id"])}</td>'
                f'<td colspan="{len(methods) + 2}" class="err">could not be read: '
                f"{html.escape(row['error'])}</td></tr>"
            )
            continue
        prob = row.get("probability")
        agree = row.get("agreement")
        cells = []
        for m in methods:
            r = row["methods"].get(m, {})
            if r.get("overlay"):
                cells.append(
                    f'<td><img loading="lazy" src="{html.escape(r["overlay"])}" '
                    f'alt="{html.escape(m)}"></td>'
                )
            else:
                reason = r.get("skipped") or r.get("error") or "not computed"
                cells.append(f'<td class="skip">{html.escape(str(reason))}</td>')
        warn = "".join(f'<div class="warn">{html.escape(w)}</div>' for w in row.get("warnings", []))
        body.append(
            f'<tr data-id="{html.escape(row["id"])}" data-pred="{row.get("prediction", -1)}" '
            f'data-prob="{-1 if prob is None else prob:.6f}" '
            f'data-agree="{-1 if agree is None else agree:.6f}">'
            f'<td class="case"><b>{html.escape(row["id"])}</b>{warn}</td>'
            f'<td><img src="cases/{html.escape(row["id"])}/input.png" alt="input"></td>'
            f'<td class="num">class {row.get("prediction")}<br>'
            f"p = {'' if prob is None else f'{prob:.3f}'}<br>"
            f"agreement {'n/a' if agree is None else f'{agree:.2f}'}</td>"
            + "".join(cells)
            + "</tr>"
        )
    page = _GALLERY.format(
        n=len(rows),
        methods=html.escape(", ".join(methods)),
        head=head,
        body="\n".join(body),
    )
    path = out / "gallery.html"
    write_text_atomic(path, page)
    return path


_GALLERY = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trustmap gallery</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 6px; vertical-align: top; }}
th {{ position: sticky; top: 0; background: #f6f6f6; }}
img {{ width: 160px; height: auto; display: block; }}
.num {{ white-space: nowrap; font-variant-numeric: tabular-nums; }}
.skip, .err {{ color: #777; font-size: 85%; max-width: 160px; }}
.warn {{ color: #a15c00; font-size: 80%; max-width: 200px; }}
button {{ margin-right: .5em; }}
</style></head><body>
<h1>Explanations of {n} cases</h1>
<p>Methods: {methods}. Agreement is the mean SSIM between the methods' maps of a case (after
the post-processing of Arun et al. 2021): low agreement means the methods tell different
stories about that case. Sort by:
<button data-key="pred">prediction</button><button data-key="prob">probability</button>
<button data-key="agree">agreement</button><button data-key="id">case</button></p>
<table id="gallery"><thead><tr><th>case</th><th>image</th><th>prediction</th>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
<script>
const tbody = document.querySelector("#gallery tbody");
let last = null, descending = true;
for (const button of document.querySelectorAll("button[data-key]")) {{
  button.addEventListener("click", () => {{
    const key = button.dataset.key;
    descending = key === last ? !descending : key !== "id";
    last = key;
    const rows = Array.from(tbody.rows);
    rows.sort((a, b) => {{
      const x = a.dataset[key], y = b.dataset[key];
      const c = key === "id" ? x.localeCompare(y) : parseFloat(x) - parseFloat(y);
      return descending ? -c : c;
    }});
    rows.forEach((r) => tbody.appendChild(r));
  }});
}}
</script>
</body></html>
"""
