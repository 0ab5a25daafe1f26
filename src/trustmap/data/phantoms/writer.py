"""Write a phantom dataset directory in the trustmap layout, atomically.

The directory is built in a hidden temporary directory next to ``out`` and renamed into
place (:func:`os.replace`) when complete, so a reader never sees a half-written dataset:
an exception or Ctrl-C while writing removes the temporary directory and leaves ``out``
as it was.

Layout (see :mod:`trustmap.data.loaders`, ``FolderDataset``)::

    dataset.json  DATASET_CARD.md  manifest.csv  boxes.csv  preview.png
    images/<id>.png|.nii.gz   masks/<id>.png|.nii.gz   masks/<id>_token.png|.nii.gz
    concepts/<concept>/<id>.png|.nii.gz

``concepts/`` holds the concept masks for network dissection (Bau et al. 2017): one folder
per concept (the phantom's anatomy, ``lesion`` and, with a shortcut, ``marker``), one mask
per image where the concept is present (a missing file means an empty mask).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustmap.core.atomic import atomic_directory
from trustmap.data.phantoms._common import (
    IMAGE,
    LABEL_BLOCK,
    SPLIT_FRACTIONS,
    TOKEN,
    PhantomCase,
    PhantomSpec,
    component_boxes,
    stream,
)
from trustmap.data.phantoms.shortcut import CORNERS, draw_token, token_side

__all__ = ["card_markdown", "render_case", "write_dataset"]

ProgressCallback = Callable[[int, int], None]

#: Cases rendered per task of the worker pool (and between progress reports).
CHUNK = 25


def render_case(
    spec: PhantomSpec,
    context: Any,
    seed: int,
    index: int,
    label: int,
    shortcut: float | None,
) -> PhantomCase:
    """Render case ``index``: image from stream (IMAGE, index), token from (TOKEN, index)."""
    image, mask, boxes, lesion_type, anatomy = spec.render(
        context, stream(seed, IMAGE, index), label
    )
    token = None
    agrees = None
    if shortcut is not None:
        token_rng = stream(seed, TOKEN, index)
        token, letters, agrees = draw_token(image.shape, token_rng, label, shortcut)
        image = image.copy()
        background, letter = spec.token_values
        image[token] = background
        image[letters] = letter
        if (mask & token).any():
            # The token covers part of the lesion: it is no longer visible there.
            mask = mask & ~token
            boxes = component_boxes(mask)
    concepts = dict(anatomy)
    if token is not None:
        # What the token covers is not visible under it.
        concepts = {name: m & ~token for name, m in concepts.items()}
    concepts["lesion"] = mask
    if token is not None:
        concepts["marker"] = token
    return PhantomCase(
        image=spec.finish(context, image),
        label=int(label),
        mask=mask,
        boxes=boxes,
        token_mask=token,
        lesion_type=lesion_type,
        index=index,
        token_agrees=agrees,
        concepts=concepts,
    )


# ---------------------------------------------------------------------------------------
# Files


def _affine(spec: PhantomSpec, shape: tuple[int, ...]) -> np.ndarray:
    """NIfTI affine of the stored array ``data.T`` (i = column, j = row, k = slice).

    Radiological display of ``(D, H, W)`` arrays: row 0 anterior, column 0 the patient's
    right, so both in-plane axes point against RAS+; slices run inferior to superior.
    """
    spacing = spec.spacing(shape) or (1.0,) * len(shape)
    affine = np.eye(4)
    if len(shape) == 3:
        sz, sy, sx = spacing
        d, h, w = shape
        affine[0, 0], affine[1, 1], affine[2, 2] = -sx, -sy, sz
        affine[:3, 3] = [sx * (w - 1) / 2, sy * (h - 1) / 2, -sz * (d - 1) / 2]
    else:
        sy, sx = spacing
        affine[0, 0], affine[1, 1] = sx, sy
    return affine


def _save(path: Path, array: np.ndarray, spec: PhantomSpec) -> None:
    if path.suffix == ".png":
        from PIL import Image

        Image.fromarray(array).save(path, compress_level=1)
        return
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array).T, _affine(spec, array.shape))
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(array.dtype)
    nib.save(img, path)


def _mask_array(mask: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    # PNG masks are 0/255 so they are visible in any viewer; NIfTI masks are 0/1 labels.
    return mask.astype(np.uint8) * (255 if spec.image_suffix == ".png" else 1)


def _write_case(root: Path, case: PhantomCase, spec: PhantomSpec, width: int) -> dict[str, Any]:
    ident = f"{case.index:0{width}d}"
    suffix = spec.image_suffix
    image = f"images/{ident}{suffix}"
    _save(root / image, case.image, spec)
    mask = ""
    if case.mask.any():
        mask = f"masks/{ident}{suffix}"
        _save(root / mask, _mask_array(case.mask, spec), spec)
    token = ""
    if case.token_mask is not None:
        token = f"masks/{ident}_token{suffix}"
        _save(root / token, _mask_array(case.token_mask, spec), spec)
    present = []
    for name, concept in case.concepts.items():
        if concept.any():
            _save(root / "concepts" / name / f"{ident}{suffix}", _mask_array(concept, spec), spec)
            present.append(name)
    return {
        "index": case.index,
        "image": image,
        "label": case.label,
        "mask": mask,
        "token_mask": token,
        "lesion_type": case.lesion_type,
        "boxes": case.boxes,
        "token_agrees": case.token_agrees,
        "mask_pixels": int(case.mask.sum()),
        "concepts": present,
    }


# Worker state: set in the parent before the pool forks, so workers inherit the context
# (the MRI template, grids) instead of rebuilding it.
_JOB: dict[str, Any] = {}


def _run_chunk(indices: Sequence[int]) -> list[dict[str, Any]]:
    job = _JOB
    rows = []
    for index in indices:
        case = render_case(
            job["spec"], job["context"], job["seed"], index, job["labels"][index], job["shortcut"]
        )
        rows.append(_write_case(job["root"], case, job["spec"], job["width"]))
    return rows


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A fork-based process pool, or None where fork is unavailable or one worker is asked."""
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        yield pool
    finally:
        # terminate, not close: after an error or Ctrl-C nothing may still write into the
        # temporary directory once it is removed.
        pool.terminate()
        pool.join()


def _write_cases(
    root: Path,
    spec: PhantomSpec,
    context: Any,
    *,
    seed: int,
    labels: np.ndarray,
    shortcut: float | None,
    workers: int,
    progress: ProgressCallback | None,
) -> list[dict[str, Any]]:
    n = len(labels)
    width = max(5, len(str(n - 1)))
    _JOB.update(
        spec=spec, context=context, seed=seed, labels=labels, shortcut=shortcut, root=root,
        width=width,
    )  # fmt: skip
    chunks = [range(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]
    rows: list[dict[str, Any]] = []
    try:
        with _pool(workers if n > 2 * CHUNK else 1) as pool:
            results = pool.imap(_run_chunk, chunks) if pool is not None else map(_run_chunk, chunks)
            for chunk_rows in results:
                rows.extend(chunk_rows)
                if progress is not None:
                    progress(len(rows), n)
    finally:
        _JOB.clear()
    return rows


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# Card


def _card(
    spec: PhantomSpec,
    *,
    seed: int,
    n: int,
    size: tuple[int, ...],
    shortcut: float | None,
    difficulty: float,
    template: str | None,
    version: int,
    rows: list[dict[str, Any]],
    splits: np.ndarray,
) -> dict[str, Any]:
    counts = {
        split: {
            str(c): int(sum(1 for r, s in zip(rows, splits) if s == split and r["label"] == c))
            for c in (0, 1)
        }
        for split in ("train", "val", "test")
    }
    generator: dict[str, Any] = {
        "phantom": spec.name,
        "seed": seed,
        "n": n,
        "size": list(size),
        "shortcut": shortcut,
        "difficulty": difficulty,
        "prevalence": spec.prevalence,
        "label_block": LABEL_BLOCK,
        "split_fractions": list(SPLIT_FRACTIONS),
        "version": version,
    }
    if template is not None:
        generator["template"] = template
    token = None
    if shortcut is not None:
        agree = [bool(r["token_agrees"]) for r in rows]
        by_split = {
            split: float(np.mean([a for a, s in zip(agree, splits) if s == split]))
            for split in ("train", "val", "test")
        }
        token = {
            "p": shortcut,
            "agreement_rate": float(np.mean(agree)),
            "agreement_by_split": by_split,
            "positive_corner": f"{CORNERS[1][0]} ({CORNERS[1][1]})",
            "negative_corner": f"{CORNERS[0][0]} ({CORNERS[0][1]})",
            "token_side_pixels": token_side(size[-2:]),
            "note": (
                "Every image carries a laterality-marker-like token (a letter in a bright "
                "square); it sits in its own class's corner with probability p. The token's "
                "mask is masks/<id>_token*, and lesion masks exclude it."
            ),
        }
    lesion_types = Counter(r["lesion_type"] for r in rows if r["lesion_type"])
    present = Counter(name for r in rows for name in r["concepts"])
    positives = [r["mask_pixels"] for r in rows if r["mask_pixels"]]
    spacing = spec.spacing(size)
    return {
        "name": spec.name,
        "format_version": 1,
        "description": spec.description,
        "classes": list(spec.classes),
        "spatial_dims": spec.spatial_dims,
        "in_channels": 1,
        "image_size": list(size),
        "modality": spec.modality,
        "intensity": dict(spec.intensity),
        "ground_truth": spec.ground_truth,
        "generator": generator,
        "counts": counts,
        "spacing": list(spacing) if spacing else None,
        "lesion_types": dict(sorted(lesion_types.items())),
        "lesion_size_pixels": (
            {
                "median": float(np.median(positives)),
                "min": int(min(positives)),
                "max": int(max(positives)),
            }
            if positives
            else None
        ),
        "shortcut": token,
        "concepts": {
            "folder": "concepts",
            "names": list(concept_names(spec, shortcut)),
            "images_with": {
                name: int(present.get(name, 0)) for name in concept_names(spec, shortcut)
            },
            "note": (
                "Concept masks for network dissection: concepts/<name>/<image id> holds the "
                "mask of concept <name> where it is present in that image; no file means an "
                "empty mask."
            ),
        },
        "files": {
            "manifest": "manifest.csv",
            "boxes": "boxes.csv",
            "preview": "preview.png",
            "card": "DATASET_CARD.md",
        },
        "target_auc": [0.85, 0.98],
        "measured_auc": None,
    }


def concept_names(spec: PhantomSpec, shortcut: float | None) -> tuple[str, ...]:
    """The concept folders a dataset of ``spec`` holds."""
    return (*spec.concepts, "lesion", *(("marker",) if shortcut is not None else ()))


def card_markdown(card: dict[str, Any]) -> str:
    """The dataset card as markdown (what ``DATASET_CARD.md`` holds), from ``dataset.json``."""
    gen = card.get("generator") or {}
    lines = [f"# Dataset card: {card.get('name', 'dataset')}", ""]
    if card.get("description"):
        lines += [card["description"], ""]
    lines += ["## Summary", "", "| field | value |", "|---|---|"]
    summary = [
        ("modality", card.get("modality")),
        ("classes", ", ".join(f"{i} = {c}" for i, c in enumerate(card.get("classes", [])))),
        ("spatial dims", card.get("spatial_dims")),
        ("image size", " x ".join(str(s) for s in card.get("image_size", []))),
        ("spacing (mm)", card.get("spacing") or "n/a"),
        ("intensity", json.dumps(card.get("intensity"))),
        ("ground truth", card.get("ground_truth")),
    ]
    for key in ("phantom", "seed", "n", "difficulty", "template", "shortcut", "version"):
        if key in gen:
            summary.append((f"generator {key}", gen[key]))
    lines += [f"| {k} | {v} |" for k, v in summary]
    counts = card.get("counts") or {}
    if counts:
        classes = card.get("classes", ["0", "1"])
        lines += ["", "## Counts", "", "| split | " + " | ".join(classes) + " | total |"]
        lines.append("|---" * (len(classes) + 2) + "|")
        for split, per in counts.items():
            values = [per.get(str(i), 0) for i in range(len(classes))]
            lines.append(f"| {split} | " + " | ".join(map(str, values)) + f" | {sum(values)} |")
    if card.get("lesion_types"):
        lines += ["", "## Lesion types", ""]
        lines += [f"- {k}: {v}" for k, v in card["lesion_types"].items()]
    token = card.get("shortcut")
    lines += ["", "## Shortcut token", ""]
    if token:
        lines += [
            f"Agreement probability p = {token['p']}; realised agreement rate "
            f"{token['agreement_rate']:.3f} "
            + "("
            + ", ".join(f"{k} {v:.3f}" for k, v in token["agreement_by_split"].items())
            + ").",
            f"Positive corner: {token['positive_corner']}; negative corner: "
            f"{token['negative_corner']}.",
            "",
            token.get("note", ""),
        ]
    else:
        lines.append("None.")
    concepts = card.get("concepts")
    if concepts:
        lines += ["", "## Concept masks", ""]
        lines += [
            f"- `{name}`: {concepts.get('images_with', {}).get(name, 0)} images"
            for name in concepts.get("names", [])
        ]
        lines += ["", concepts.get("note", "")]
    lines += ["", "## Measured difficulty", ""]
    measured = card.get("measured_auc")
    target = card.get("target_auc") or [0.85, 0.98]
    if measured:
        ci = measured.get("ci95")
        ci_text = f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
        lines.append(
            f"`{measured.get('arch')}` (seed {measured.get('seed')}, {measured.get('epochs')} "
            f"epochs, {float(measured.get('seconds', 0.0)):.0f} s) reached a test ROC AUC of "
            f"**{float(measured['test_auc']):.3f}**{ci_text}; target range {target[0]}-"
            f"{target[1]}."
        )
    else:
        lines.append(
            f"Not measured yet (target range for a small CNN: {target[0]}-{target[1]}); "
            "`trustmap.models.calibrate.measure_dataset_auc` fills this in."
        )
    lines += [
        "",
        "## Files",
        "",
        "- `manifest.csv`: image, label, split, mask, token_mask, lesion_type",
        "- `boxes.csv`: image, x, y, width, height"
        + (", z, depth" if card.get("spatial_dims") == 3 else "")
        + " (one row per lesion part)",
        "- `preview.png`: examples with lesion masks outlined (red) and tokens (cyan)",
        "- `concepts/<concept>/<id>`: concept masks for network dissection",
        "",
    ]
    return "\n".join(lines)


# Preview


def _preview_indices(labels: np.ndarray, count: int = 16) -> list[int]:
    pos = np.flatnonzero(labels == 1)[: count // 2]
    neg = np.flatnonzero(labels == 0)[: count - len(pos)]
    return sorted([*pos.tolist(), *neg.tolist()])


def _display(spec: PhantomSpec, case: PhantomCase) -> tuple[np.ndarray, np.ndarray, Any, str]:
    """A 2D view of a case: image scaled to [0, 1], mask, token mask, slice note."""
    image = case.image.astype(np.float32)
    mask, token, note = case.mask, case.token_mask, ""
    if image.ndim == 3:
        z = int(np.argmax(mask.sum(axis=(1, 2)))) if mask.any() else image.shape[0] // 2
        image, mask = image[z], mask[z]
        token = token[z] if token is not None else None
        note = f" z={z}"
    kind = spec.intensity["kind"]
    if kind == "window":
        lo = spec.intensity["center"] - spec.intensity["width"] / 2
        image = (image - lo) / spec.intensity["width"]
    elif kind == "range":
        image = (image - spec.intensity["min"]) / (spec.intensity["max"] - spec.intensity["min"])
    else:
        top = float(np.percentile(image[image > 0], 99.5)) if (image > 0).any() else 1.0
        image = image / max(top, 1e-6)
    return np.clip(image, 0.0, 1.0), mask, token, note


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` on its border (4-neighbourhood)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def render_preview(
    spec: PhantomSpec, cases: Sequence[PhantomCase], splits: Sequence[str], path: Path
) -> None:
    """A grid of examples (4 per row): lesion outlines red, boxes yellow, tokens cyan.

    Drawn with Pillow at a fixed tile size (images upscaled without smoothing), which is
    a few tens of milliseconds; 3D cases show the axial slice with the most lesion.
    """
    from PIL import Image, ImageDraw, ImageFont

    tile, title, gap, cols = 256, 14, 4, 4
    rows = max(1, (len(cases) + cols - 1) // cols)
    header = 18
    canvas = Image.new(
        "RGB",
        (cols * tile + (cols + 1) * gap, header + rows * (tile + title + gap) + gap),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    legend = f"{spec.name}: red = lesion mask, cyan = shortcut token" + (
        ", yellow = boxes" if "boxes" in spec.ground_truth else ""
    )
    draw.text((gap, 3), legend, fill=(0, 0, 0), font=font)
    for k, (case, split) in enumerate(zip(cases, splits)):
        image, mask, token, note = _display(spec, case)
        h, w = image.shape
        scale = tile / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
        grey = Image.fromarray(np.rint(image * 255).astype(np.uint8)).resize(size, resample)
        rgb = np.repeat(np.asarray(grey)[..., None], 3, axis=2)
        for layer, colour in ((mask, (255, 40, 40)), (token, (0, 230, 255))):
            if layer is not None and layer.any():
                big = Image.fromarray(layer.astype(np.uint8) * 255).resize(
                    size, Image.Resampling.NEAREST
                )
                rgb[_outline(np.asarray(big) > 127)] = colour
        x0 = gap + (k % cols) * (tile + gap)
        y0 = header + (k // cols) * (tile + title + gap)
        canvas.paste(Image.fromarray(rgb), (x0, y0 + title))
        if "boxes" in spec.ground_truth:
            for box in case.boxes:
                bx, by, bw, bh = (v * scale for v in box[:4])
                draw.rectangle(
                    (x0 + bx, y0 + title + by, x0 + bx + bw - 1, y0 + title + by + bh - 1),
                    outline=(255, 220, 0),
                )
        cls = spec.classes[case.label]
        what = case.lesion_type if case.lesion_type.startswith(cls) else cls
        if case.lesion_type and what == cls:
            what = f"{cls}: {case.lesion_type}"
        text = f"#{case.index} {split} {what}{note}"
        draw.text((x0, y0 + 1), text, fill=(0, 0, 0), font=font)
    canvas.save(path, optimize=False, compress_level=6)


# Directory


def write_dataset(
    spec: PhantomSpec,
    out: Path,
    *,
    context: Any,
    seed: int,
    n: int,
    size: tuple[int, ...],
    shortcut: float | None,
    difficulty: float,
    template: str | None,
    labels: np.ndarray,
    splits: np.ndarray,
    overwrite: bool,
    version: int,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Generate and write the dataset into ``out`` atomically (arguments already checked)."""
    with atomic_directory(out, overwrite=overwrite) as temp:
        (temp / "images").mkdir()
        (temp / "masks").mkdir()
        for name in concept_names(spec, shortcut):
            (temp / "concepts" / name).mkdir(parents=True)
        rows = _write_cases(
            temp,
            spec,
            context,
            seed=seed,
            labels=labels,
            shortcut=shortcut,
            workers=_default_workers() if workers is None else workers,
            progress=progress,
        )
        rows.sort(key=lambda r: r["index"])
        (temp / "manifest.csv").write_text(
            _csv_text(
                ("image", "label", "split", "mask", "token_mask", "lesion_type"),
                [
                    (r["image"], r["label"], s, r["mask"], r["token_mask"], r["lesion_type"])
                    for r, s in zip(rows, splits)
                ],
            )
        )
        box_header = ["image", "x", "y", "width", "height"]
        if spec.spatial_dims == 3:
            box_header += ["z", "depth"]
        (temp / "boxes.csv").write_text(
            _csv_text(box_header, [(r["image"], *box) for r in rows for box in r["boxes"]])
        )
        card = _card(
            spec,
            seed=seed,
            n=n,
            size=size,
            shortcut=shortcut,
            difficulty=difficulty,
            template=template,
            version=version,
            rows=rows,
            splits=splits,
        )
        (temp / "dataset.json").write_text(json.dumps(card, indent=2) + "\n")
        (temp / "DATASET_CARD.md").write_text(card_markdown(card))
        chosen = _preview_indices(labels)
        cases = [render_case(spec, context, seed, i, int(labels[i]), shortcut) for i in chosen]
        render_preview(spec, cases, [str(splits[i]) for i in chosen], temp / "preview.png")
    return out
