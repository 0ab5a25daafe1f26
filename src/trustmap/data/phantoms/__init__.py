"""Procedural phantom datasets with exact ground truth.

Four phantoms, each seeded and reproducible bit for bit:

=====================  ======================================================  ==========
name                   content                                                 default
=====================  ======================================================  ==========
``cxr-pneumothorax``   PA chest radiographs; positives: pneumothorax (mask)     2500 x 128^2
``cxr-pneumonia``      the same anatomy; positives: patchy opacities            2500 x 128^2
                       (boxes and mask)
``ct-nodule``          CT lung patches in HU; benign vs malignant nodules       2500 x 64^2
                       (mask for every image)
``mri-brain-3d``       FLAIR-like brain MRI volumes; tumour- or MS-like         500 x 64^3
                       lesions (mask)
=====================  ======================================================  ==========

>>> from trustmap.data.phantoms import make_dataset, generate
>>> make_dataset("cxr-pneumothorax", "data/ptx", seed=0)  # doctest: +SKIP
>>> case = next(generate("ct-nodule", 1, seed=0))  # in memory, no files
>>> case.image.dtype, case.mask.shape
(dtype('int16'), (64, 64))

Case ``i`` of seed ``s`` depends on ``(s, i)`` and the size/difficulty/shortcut options
only (not on ``n``), so ``generate(..., indices=[i])`` regenerates it alone; the worker
count never changes the output. The train/val/test split (80/10/10, stratified) is fixed
by the seed. ``shortcut=p`` burns a laterality-marker-like token into every image
(:mod:`trustmap.data.phantoms.shortcut`), in its label's corner with probability ``p``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from trustmap.data.phantoms._common import (
    DIFFICULTY_LEVELS,
    PhantomCase,
    PhantomSpec,
    assign_splits,
    label_of,
    labels_for,
    min_n,
    resolve_difficulty,
    resolve_seed,
    resolve_shortcut,
    resolve_size,
)
from trustmap.data.phantoms.ct_nodule import CT_NODULE
from trustmap.data.phantoms.cxr import PNEUMONIA, PNEUMOTHORAX
from trustmap.data.phantoms.mri_brain import MRI_BRAIN, resolve_template
from trustmap.data.phantoms.writer import card_markdown, render_case, write_dataset

__all__ = [
    "DIFFICULTY_LEVELS",
    "GENERATOR_VERSION",
    "PHANTOMS",
    "PhantomCase",
    "card_markdown",
    "generate",
    "get_spec",
    "make_dataset",
]

#: Bumped whenever the generated data changes for the same arguments.
GENERATOR_VERSION = 2  # 2: concept masks (concepts/); the images are those of version 1

_SPECS: dict[str, PhantomSpec] = {
    spec.name: spec for spec in (PNEUMOTHORAX, PNEUMONIA, CT_NODULE, MRI_BRAIN)
}
PHANTOMS: tuple[str, ...] = tuple(_SPECS)


def get_spec(name: str) -> PhantomSpec:
    """The phantom called ``name``; a ValueError suggests the closest name if unknown."""
    if not isinstance(name, str):
        raise ValueError(f"phantom name must be a string, got {name!r}")
    spec = _SPECS.get(name.strip().lower())
    if spec is not None:
        return spec
    close = difflib.get_close_matches(name.strip().lower(), PHANTOMS, n=1, cutoff=0.3)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown phantom {name!r}{hint} Known: {', '.join(PHANTOMS)}")


def _template_for(spec: PhantomSpec, template: str | None) -> str | None:
    if spec.spatial_dims == 3:
        return resolve_template(template)
    if template not in (None, "auto"):
        raise ValueError(f"template= applies to mri-brain-3d only, not to {spec.name}")
    return None


def _check_n(spec: PhantomSpec, n: int | None) -> int:
    if n is None:
        return spec.default_n
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be an integer, got {n!r}")
    need = min_n(spec.prevalence)
    if n < need:
        raise ValueError(
            f"n={n} is too small for {spec.name}: the 80/10/10 train/val/test split needs at "
            f"least {need} images so that every split holds both classes"
        )
    return n


def generate(
    name: str,
    n: int | None = None,
    *,
    size: int | Sequence[int] | None = None,
    seed: int = 0,
    shortcut: float | None = None,
    difficulty: float | str | None = None,
    template: str | None = "auto",
    indices: Iterable[int] | None = None,
) -> Iterator[PhantomCase]:
    """Yield the cases of a phantom in memory (no files).

    Parameters
    ----------
    name
        One of :data:`PHANTOMS`.
    n
        Number of cases (indices ``0..n-1``); the phantom's default if None. Ignored
        when ``indices`` is given.
    size
        Image size: an int (square/cubic) or a shape; the phantom's default if None.
    seed
        Non-negative integer; the same arguments give bit-identical arrays.
    shortcut
        Token agreement probability in [0, 1], or None for no token.
    difficulty
        Positive float (1.0 default, larger is harder) or a level in
        :data:`DIFFICULTY_LEVELS`.
    template
        mri-brain-3d only: ``"auto"``, ``"mni152"`` or ``"procedural"``.
    indices
        Generate these case indices only (each as it would be in a larger dataset).

    Yields
    ------
    PhantomCase
    """
    spec = get_spec(name)
    seed = resolve_seed(seed)
    shape = resolve_size(spec, size)
    shortcut = resolve_shortcut(shortcut)
    level = resolve_difficulty(difficulty)
    kind = _template_for(spec, template)
    if indices is None:
        if n is None:
            n = spec.default_n
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        indices = range(n)
    indices = list(indices)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError("indices must be non-negative integers")
    context = spec.context(seed, shape, level, kind)
    for index in indices:
        label = label_of(seed, index, spec.prevalence)
        yield render_case(spec, context, seed, index, label, shortcut)


def make_dataset(
    name: str,
    out: str | os.PathLike[str],
    *,
    n: int | None = None,
    size: int | Sequence[int] | None = None,
    seed: int = 0,
    shortcut: float | None = None,
    difficulty: float | str | None = None,
    template: str | None = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Generate phantom ``name`` and write it to the directory ``out``; return ``out``.

    Writes ``dataset.json``, ``DATASET_CARD.md``, ``manifest.csv``, ``boxes.csv``,
    ``preview.png``, ``images/`` and ``masks/`` (layout in
    :mod:`trustmap.data.phantoms.writer`), atomically: the directory appears complete or
    not at all, also after an exception or Ctrl-C.

    Parameters
    ----------
    name, n, size, seed, shortcut, difficulty, template
        As for :func:`generate`; ``n`` must allow a stratified 80/10/10 split.
    out
        The dataset directory. It may exist only if empty, unless ``overwrite``.
    overwrite
        Replace an existing non-empty ``out`` (only once the new dataset is complete).
    progress
        Called as ``progress(done, total)`` while writing.
    workers
        Processes used for rendering (default: up to 2, the cores available). The
        output does not depend on it.

    Raises
    ------
    ValueError
        Unknown phantom (the closest name is suggested), ``n`` too small for the splits,
        size out of range, ``shortcut`` outside [0, 1], bad difficulty or seed, or ``out``
        a file or a non-empty directory without ``overwrite``.
    """
    spec = get_spec(name)
    seed = resolve_seed(seed)
    n = _check_n(spec, n)
    shape = resolve_size(spec, size)
    shortcut = resolve_shortcut(shortcut)
    level = resolve_difficulty(difficulty)
    kind = _template_for(spec, template)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"output directory {out} exists and is not empty; pass overwrite=True "
            "(--overwrite) to replace it"
        )
    labels = labels_for(seed, n, spec.prevalence)
    splits = assign_splits(seed, labels)
    context = spec.context(seed, shape, level, kind)
    return write_dataset(
        spec,
        out,
        context=context,
        seed=seed,
        n=n,
        size=shape,
        shortcut=shortcut,
        difficulty=level,
        template=kind,
        labels=labels,
        splits=splits,
        overwrite=overwrite,
        version=GENERATOR_VERSION,
        workers=workers,
        progress=progress,
    )
