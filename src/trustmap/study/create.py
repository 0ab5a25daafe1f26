"""``create_study``: draw cases, explain them, render blinded panels, write the study file.

Katzmann et al. 2021 (Neurocomputing), section 3.4: the cases are drawn from the correctly
classified test images, balanced by class, "to avoid mixing up classification and
visualization errors"; every case is explained by every method and shown as a coloured
overlay; the order is randomized by a program and de-randomized for the analysis. The
reader-performance design (Sayres et al. 2019, after Huff et al. 2021, section 6) draws
test images balanced by class whether or not the model got them right, since how readers
follow a wrong prediction is part of what it measures.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmap.study.design import (
    CONFIDENCE_SCALE,
    DESIGNS,
    Criterion,
    Scale,
    parse_criteria,
    parse_scale,
    rating_layout,
    reader_performance_layout,
    reader_variants,
)
from trustmap.study.store import (
    ADMIN_KEY_FILE,
    SCHEMA,
    STUDY_FILE,
    STUDY_FORMAT,
    STUDY_VERSION,
    connect,
    derive_cipher,
    hash_secret,
    new_secret,
    transaction,
    write_meta,
)

__all__ = ["CreatedStudy", "create_study", "reader_url"]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CreatedStudy:
    """What :func:`create_study` made.

    Attributes
    ----------
    path:
        The study file.
    admin_key:
        The admin key (also written to ``ADMIN_KEY`` beside the study file, mode 0600).
    tokens:
        One token per reader, in reader order; the reader's URL is ``/r/<token>``.
    cases:
        Per drawn case: ``sample_id``, ``label``, ``predicted``, ``probability``.
    warnings:
        Things the admin should know (constant maps, unbalanced arms).
    """

    path: Path
    admin_key: str
    tokens: list[str]
    cases: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def reader_url(base_url: str, token: str) -> str:
    """A reader's URL on a server at ``base_url``."""
    return f"{base_url.rstrip('/')}/r/{token}"


def _check_methods(methods: Sequence[str], design: str) -> list[str]:
    from trustmap.core.registry import get_method

    names = [m.strip() for m in methods if m and m.strip()]
    if not names:
        raise ValueError(
            "the method list is empty: name the methods to compare, e.g. "
            "--methods grad_cam,integrated_gradients (trustmap methods lists them)"
        )
    resolved = [get_method(m).name for m in names]
    dupes = sorted({m for m in resolved if resolved.count(m) > 1})
    if dupes:
        raise ValueError(f"method {dupes[0]!r} is listed twice")
    if design == "rating" and len(resolved) < 2:
        raise ValueError(
            f"a rating study compares methods: it needs at least two, got {resolved[0]!r} alone"
        )
    return resolved


def _draw_cases(
    labels: np.ndarray,
    predicted: np.ndarray,
    n_cases: int,
    classes: Sequence[str],
    *,
    correct_only: bool,
    seed: int,
    split: str,
) -> np.ndarray:
    """Indices of ``n_cases`` test images balanced by class (the remainder going to
    classes in a seeded order), correctly classified ones only when asked."""
    n_classes = len(classes)
    rng = np.random.default_rng(seed)
    per_class = np.full(n_classes, n_cases // n_classes)
    per_class[rng.permutation(n_classes)[: n_cases % n_classes]] += 1
    chosen: list[int] = []
    for k in range(n_classes):
        pool = np.flatnonzero((labels == k) & ((predicted == labels) if correct_only else True))
        if len(pool) < per_class[k]:
            what = "correctly classified " if correct_only else ""
            raise ValueError(
                f"--cases {n_cases} needs {per_class[k]} {what}{classes[k]!r} images, but the "
                f"{split} split has only {len(pool)}: ask for at most "
                f"{_max_cases(labels, predicted, correct_only, n_classes)} cases"
            )
        chosen.extend(int(i) for i in rng.choice(pool, size=per_class[k], replace=False))
    return np.asarray(rng.permutation(chosen), dtype=np.int64)


def _max_cases(labels: np.ndarray, predicted: np.ndarray, correct_only: bool, k: int) -> int:
    ok = (predicted == labels) if correct_only else np.ones_like(labels, dtype=bool)
    return int(min((ok & (labels == c)).sum() for c in range(k)) * k)


def _predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and its probability, in batches of 64."""
    preds, probs = [], []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            out = model(images[start : start + 64])
            out = out.reshape(out.shape[0], -1)
            if out.shape[1] == 1:
                p1 = torch.sigmoid(out[:, 0])
                pred = (p1 > 0.5).long()
                prob = torch.where(pred == 1, p1, 1 - p1)
            else:
                soft = torch.softmax(out.double(), dim=1)
                prob, pred = soft.max(dim=1)
            preds.append(pred.numpy())
            probs.append(prob.double().numpy())
    return np.concatenate(preds), np.concatenate(probs)


def _png(fig: Any, dpi: int) -> bytes:
    """The figure as PNG bytes with no metadata chunk at all (matplotlib writes its
    version into 'Software'; re-encoding with Pillow drops every text chunk)."""
    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=dpi)
    raw.seek(0)
    with Image.open(raw) as img:
        clean = img.convert("RGB")
    out = io.BytesIO()
    clean.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _render(image: torch.Tensor, attribution: torch.Tensor | None, dpi: int) -> bytes:
    from trustmap.viz import overlay

    spatial_dims = image.dim() - 1
    attr = torch.zeros_like(image[:1]) if attribution is None else attribution
    fig = overlay(image, attr, bare=True, spatial_dims=spatial_dims)
    return _png(fig, dpi)


def create_study(
    out: str | os.PathLike[str],
    *,
    methods: Sequence[str],
    dataset: Any,
    model: str | os.PathLike[str],
    n_cases: int = 24,
    n_readers: int = 8,
    criteria: str | Sequence[str] | None = None,
    scale: str | Sequence[int] | Scale | None = None,
    design: str = "rating",
    seed: int = 0,
    split: str = "test",
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
    dpi: int = 80,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> CreatedStudy:
    """Build a blinded study in the directory ``out`` (which must not hold a study yet).

    Parameters
    ----------
    out:
        Directory for ``study.sqlite`` and ``ADMIN_KEY`` (created if missing).
    methods:
        Registered method names (``trustmap methods``); at least two for ``rating``.
    dataset:
        A phantom name, a dataset directory or an ``ImageDataset``.
    model:
        A trustmap checkpoint (``model.pt``) or the directory holding it; images are
        resized to its input size.
    n_cases, n_readers:
        Cases drawn from the ``split`` (balanced by class) and readers.
    criteria, scale:
        See :func:`~trustmap.study.design.parse_criteria` and
        :func:`~trustmap.study.design.parse_scale`; rating design only.
    design:
        ``"rating"`` or ``"reader-performance"``.
    seed:
        Seeds the draw of cases, the questionnaire variants and every panel order.
    method_params:
        Per method, keyword parameters for it (e.g. ``{"cyclegan_am": {"generators": p}}``).
    dpi:
        Resolution of the panels (a 2D panel is 4 inches wide: 320 pixels at 80 dpi).
    progress:
        Called as ``progress(stage, done, total)``.

    Raises
    ------
    ValueError
        Empty or unknown methods, unknown criteria, a bad scale or design, more cases than
        the split can give, an ``out`` that already holds a study.
    """
    from trustmap.core.base import explain
    from trustmap.models.training import normalize_size, open_training_dataset, resize_images

    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; use one of {', '.join(DESIGNS)}")
    names = _check_methods(methods, design)
    crits: tuple[Criterion, ...] = parse_criteria(criteria) if design == "rating" else ()
    rating_scale = parse_scale(scale) if design == "rating" else CONFIDENCE_SCALE
    for label, value, low in (("--cases", n_cases, 1), ("--readers", n_readers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    params = {m: dict((method_params or {}).get(m, {})) for m in names}
    unknown = sorted(set(method_params or {}) - set(names))
    if unknown:
        raise ValueError(f"parameters given for {unknown[0]!r}, which is not in --methods")
    out = Path(out).expanduser()
    target = out / STUDY_FILE
    if target.exists():
        raise ValueError(f"{out} already holds a study ({STUDY_FILE}); choose another --out")
    report = progress or (lambda *_: None)

    from trustmap.models import load_checkpoint

    model_path = Path(model).expanduser()
    if model_path.is_dir():
        model_path = model_path / "model.pt"
    net, info = load_checkpoint(model_path)
    extra = info.get("extra") or {}
    ds = open_training_dataset(dataset)
    idx = ds.split_indices(seed=0).get(split) if split in ("train", "val", "test") else None
    if idx is None:
        raise ValueError(f"unknown split {split!r}; use train, val or test")
    if len(idx) == 0:
        raise ValueError(f"the {split} split of {ds.name} is empty")
    data = ds.tensors(idx)
    images = data.images
    size = normalize_size(extra.get("input_size"), images.dim() - 2, minimum=1)
    if size is not None:
        images = resize_images(images, size)
    labels = data.labels.numpy()
    classes = list(ds.classes)
    report("predicting", 0, len(images))
    try:
        predicted, probability = _predict(net, images)
    except RuntimeError as err:
        raise ValueError(
            f"the model does not accept the dataset's images {tuple(images.shape[1:])}: "
            f"{str(err).splitlines()[0]}"
        ) from None
    report("predicting", len(images), len(images))
    chosen = _draw_cases(
        labels,
        predicted,
        n_cases,
        classes,
        correct_only=design == "rating",
        seed=seed,
        split=split,
    )
    x = images[torch.as_tensor(chosen)]
    targets = torch.as_tensor(predicted[chosen], dtype=torch.long)

    warnings: list[str] = []
    maps: dict[str, torch.Tensor] = {}
    total = len(names) * len(chosen)
    done = 0
    for name in names:
        parts = []
        for start in range(0, len(x), batch_size):
            sl = slice(start, start + batch_size)
            parts.append(explain(net, x[sl], name, target=targets[sl], **params[name]).detach())
            done += len(x[sl])
            report("explaining", done, total)
        maps[name] = torch.cat(parts)
        flat = maps[name].reshape(len(x), -1)
        constant = (flat.max(1).values == flat.min(1).values).nonzero().flatten().tolist()
        if constant:
            warnings.append(
                f"{name} gave a constant map for {len(constant)} case(s); those panels show "
                "the image without overlay"
            )

    # Render: the plain image of every case, then every case x method overlay.
    plain: dict[int, str] = {}
    overlays: dict[tuple[int, int], str] = {}
    key: dict[str, str | None] = {}
    pngs: list[tuple[str, int, bytes]] = []
    total = len(chosen) * (len(names) + 1)
    done = 0
    for c in range(len(chosen)):
        image_id = secrets.token_hex(16)
        plain[c] = image_id
        key[image_id] = None
        pngs.append((image_id, c, _render(x[c], None, dpi)))
        done += 1
        report("rendering", done, total)
        for m, name in enumerate(names):
            image_id = secrets.token_hex(16)
            overlays[(c, m)] = image_id
            key[image_id] = name
            pngs.append((image_id, c, _render(x[c], maps[name][c], dpi)))
            done += 1
            report("rendering", done, total)

    admin_key = new_secret()
    tokens = [new_secret(18) for _ in range(n_readers)]
    salt = secrets.token_bytes(16)
    cipher = derive_cipher(admin_key, salt)
    variants = reader_variants(n_readers) if design == "rating" else [""] * n_readers

    if design == "rating":
        plan = rating_layout(len(chosen), len(names), n_readers, [c.name for c in crits], seed)
        arms: list[dict[str, Any]] = []
    else:
        arms = [
            {"name": "image", "prediction": False, "method": None},
            {"name": "prediction", "prediction": True, "method": None},
            *({"name": f"map:{n}", "prediction": True, "method": n} for n in names),
        ]
        plan = reader_performance_layout(len(chosen), len(arms), n_readers, seed)
        if n_readers % len(arms):
            warnings.append(
                f"{n_readers} readers for {len(arms)} arms: arms are balanced over cases only "
                f"when the number of readers is a multiple of {len(arms)}"
            )

    cases = [
        {
            "sample_id": str(data.ids[i]),
            "dataset_index": int(idx[i]),
            "label": int(labels[i]),
            "predicted": int(predicted[i]),
            "probability": float(probability[i]),
        }
        for i in chosen
    ]
    meta = {
        "format": STUDY_FORMAT,
        "version": STUDY_VERSION,
        "design": design,
        "title": title or ("Rating study" if design == "rating" else "Reader study"),
        "created_at": time.time(),
        "seed": seed,
        "methods": names,
        "method_params": {m: {k: str(v) for k, v in p.items()} for m, p in params.items()},
        "criteria": [dataclasses.asdict(c) for c in crits],
        "scale": rating_scale.to_dict(),
        "classes": classes,
        "arms": [a["name"] for a in arms],
        "dataset": str(getattr(ds, "root", None) or getattr(ds, "name", "")),
        "dataset_name": ds.name,
        "split": split,
        "model": str(model_path),
        "input_size": list(images.shape[2:]),
        "n_readers": n_readers,
        "n_cases": len(chosen),
        "admin_key_hash": hash_secret(admin_key),
        "key_salt": base64.b64encode(salt).decode(),
        "blinding_key": cipher.encrypt(json.dumps(key).encode()).decode(),
    }

    out.mkdir(parents=True, exist_ok=True)
    temp = out / f".{STUDY_FILE}.{secrets.token_hex(6)}.tmp"
    try:
        con = connect(temp)
        con.execute("PRAGMA journal_mode = WAL")
        _write(con, meta, cases, pngs, tokens, variants, cipher, plan, plain, overlays, arms)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{temp}{suffix}").unlink(missing_ok=True)
        if target.exists():
            raise ValueError(f"{out} already holds a study ({STUDY_FILE}); choose another --out")
        os.replace(temp, target)
        key_file = out / ADMIN_KEY_FILE
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(admin_key + "\n")
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{temp}{suffix}").unlink(missing_ok=True)
    return CreatedStudy(target, admin_key, tokens, cases, warnings)


def _write(
    con: sqlite3.Connection,
    meta: dict[str, Any],
    cases: list[dict[str, Any]],
    pngs: list[tuple[str, int, bytes]],
    tokens: list[str],
    variants: list[str],
    cipher: Any,
    plan: list[Any],
    plain: dict[int, str],
    overlays: dict[tuple[int, int], str],
    arms: list[dict[str, Any]],
) -> None:
    con.executescript(SCHEMA)
    with transaction(con):
        write_meta(con, meta)
        con.executemany(
            "INSERT INTO cases (case_id, sample_id, dataset_index, label, predicted, probability)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    c,
                    case["sample_id"],
                    case["dataset_index"],
                    case["label"],
                    case["predicted"],
                    case["probability"],
                )
                for c, case in enumerate(cases)
            ],
        )
        con.executemany("INSERT INTO images (image_id, case_id, png) VALUES (?, ?, ?)", pngs)
        con.executemany(
            "INSERT INTO readers (reader_id, token_hash, token_enc, variant) VALUES (?, ?, ?, ?)",
            [
                (r, hash_secret(t), cipher.encrypt(t.encode()), variants[r])
                for r, t in enumerate(tokens)
            ],
        )
        questions, items = [], []
        for q in plan:
            qid = secrets.token_hex(12)
            if q.arm is None:
                questions.append((qid, q.reader, q.seq, q.case, q.criterion, plain[q.case], 0))
                for slot, m in enumerate(q.slots):
                    items.append(
                        (secrets.token_hex(12), qid, q.reader, slot, "rating", overlays[q.case, m])
                    )
            else:
                arm = arms[q.arm]
                if arm["method"] is None:
                    ref = plain[q.case]
                else:
                    ref = overlays[q.case, meta["methods"].index(arm["method"])]
                questions.append((qid, q.reader, q.seq, q.case, None, ref, int(arm["prediction"])))
                for slot, name in enumerate(("diagnosis", "confidence")):
                    items.append((secrets.token_hex(12), qid, q.reader, slot, name, None))
        con.executemany(
            "INSERT INTO questions (question_id, reader_id, seq, case_id, criterion, ref_image, "
            "show_prediction) VALUES (?, ?, ?, ?, ?, ?, ?)",
            questions,
        )
        con.executemany(
            "INSERT INTO items (item_id, question_id, reader_id, slot, field, image_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            items,
        )


def copy_study(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a study file consistently (SQLite's online backup) to ``dst``."""
    from trustmap.study.store import study_path

    source = connect(study_path(src))
    dst = Path(dst)
    temp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp")
    try:
        target = sqlite3.connect(str(temp))
        source.backup(target)
        target.execute("PRAGMA journal_mode = WAL")
        target.close()
        os.replace(temp, dst)
    finally:
        source.close()
        temp.unlink(missing_ok=True)
    admin = Path(study_path(src)).parent / ADMIN_KEY_FILE
    if admin.is_file() and dst.parent != admin.parent:
        shutil.copy2(admin, dst.parent / ADMIN_KEY_FILE)
    return dst
