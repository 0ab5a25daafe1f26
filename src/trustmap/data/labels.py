"""Label formats of the public chest-radiograph datasets: SIIM-ACR run-length masks, RSNA boxes.

SIIM-ACR run-length encoding
----------------------------
``train-rle.csv`` of the SIIM-ACR Pneumothorax Segmentation challenge stores each mask as
space-separated ``start length`` pairs over the image's pixels numbered **down the
columns** (column-major: pixel ``p`` is row ``p % height`` of column ``p // height``),
counting from 0. The starts are **relative**: the first one is the offset from pixel 0,
each later one the number of pixels between the end of the previous run and the start of
this one. ``"-1"`` (or an empty field) means no finding. For the 3x3 image::

    . x .
    . x x        columns read top to bottom: . . . | x x . | . x x
    . . x        runs: pixel 3, length 2; then pixel 7, length 2

the string is ``"3 2 2 2"`` (the second run starts 2 pixels after the first one ends).
The challenge's own ``mask_functions.py`` decodes the same way, reshaping the flat mask
to ``(width, height)`` and transposing. ``relative=False`` reads the other common Kaggle
form, absolute 1-based starts over the same column-major numbering.

RSNA pneumonia boxes
--------------------
``stage_2_train_labels.csv`` of the RSNA Pneumonia Detection Challenge has one row per
box, ``patientId,x,y,width,height,Target``, with ``x`` the column of the box's left edge
and ``y`` the row of its top edge, in pixels. Patients without pneumonia have one row with
``Target`` 0 and empty coordinates.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trustmap.errors import DataError, InputTypeError, MissingFileError

__all__ = ["boxes_to_mask", "read_rsna_boxes", "rle_decode", "rle_encode"]

#: Columns of the RSNA labels file.
RSNA_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")

#: Largest number in a run-length string (pixel index or run length): 2**40 pixels is far
#: beyond any image, and keeps every sum of starts and lengths inside int64.
MAX_RLE_NUMBER = 2**40


# ---------------------------------------------------------------------------------------
# CSV tables with row numbers (shared by the loaders)


@dataclass(frozen=True)
class CsvRow:
    """One data row of a CSV file: ``line`` is its line number, the header being line 1."""

    line: int
    values: dict[str, str]

    def get(self, column: str) -> str:
        return self.values.get(column, "")


def read_table(
    path: str | os.PathLike[str], *, required: Sequence[str] = ()
) -> tuple[list[str], list[CsvRow]]:
    """Read a CSV file with a header row; return the column names and the data rows.

    Column names and values are stripped of surrounding blanks (the SIIM-ACR file has a
    column called ``" EncodedPixels"``), blank lines are skipped and a UTF-8 byte-order
    mark is ignored. A row shorter than the header gets empty values for the missing
    columns.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        Naming the file, and the row where there is one: the file is empty (zero bytes or
        a header only), not text, lacks a ``required`` column, repeats a column, or has a
        row with more fields than the header.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: is not a UTF-8 text CSV file ({exc})") from exc
    if not text.strip():
        size = path.stat().st_size
        raise DataError(
            f"{path}: is empty ({size} bytes); expected a header row"
            + (f" with columns {', '.join(required)}" if required else "")
            + " and one row per item"
        )
    # newline="" keeps line breaks inside quoted fields, and line_num counts file lines.
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[CsvRow] = []
    try:
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue
            if header is None:
                header = [field.strip() for field in fields]
                _check_header(path, header, required)
                continue
            line = reader.line_num
            if len(fields) > len(header):
                raise DataError(
                    f"{path} row {line}: has {len(fields)} fields but the header has "
                    f"{len(header)} ({', '.join(header)})"
                )
            values = {name: "" for name in header}
            values.update(
                {name: field.strip() for name, field in zip(header, fields, strict=False)}
            )
            rows.append(CsvRow(line, values))
    except csv.Error as exc:
        raise DataError(f"{path} row {reader.line_num}: malformed CSV ({exc})") from exc
    if header is None:  # only blank fields, e.g. a line of commas
        raise DataError(
            f"{path}: has no header row, only empty fields"
            + (f"; expected columns {', '.join(required)}" if required else "")
        )
    if not rows:
        raise DataError(f"{path}: has a header ({', '.join(header)}) but no data rows")
    return header, rows


def _check_header(path: Path, header: list[str], required: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
    missing = [name for name in required if name not in seen]
    if missing:
        raise DataError(
            f"{path}: the header row ({', '.join(header) or 'empty'}) lacks the required "
            f"column(s) {', '.join(missing)}"
        )


# ---------------------------------------------------------------------------------------
# Run-length encoding


def _check_shape(height: object, width: object) -> tuple[int, int]:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(height), int(width)  # type: ignore[arg-type]


def _is_empty_rle(rle: object) -> bool:
    if rle is None:
        return True
    if isinstance(rle, float) and math.isnan(rle):  # pandas reads an empty field as NaN
        return True
    return isinstance(rle, str) and rle.strip() in ("", "-1")


def parse_rle(rle: str | None, *, relative: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Check an RLE string's syntax; return the 0-based absolute starts and run lengths.

    Knows nothing of the image size; :func:`rle_decode` checks the bounds.

    Raises
    ------
    ValueError
        Naming the position of the first bad number: not an integer, negative, an odd
        count of numbers, or (``relative=False``) a start below 1.
    """
    if _is_empty_rle(rle):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not isinstance(rle, str):
        raise InputTypeError(f"an RLE mask must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    values = np.empty(len(tokens), dtype=np.int64)
    for k, token in enumerate(tokens):
        if not (token.isascii() and token.isdigit()):
            raise DataError(
                f"RLE number {k + 1} ({_short(token)}) is not a non-negative integer; expected "
                "space-separated 'start length' pairs or -1"
            )
        value = int(token)
        if value > MAX_RLE_NUMBER:
            raise DataError(
                f"RLE number {k + 1} ({_short(token)}) is larger than any image: at most "
                f"{MAX_RLE_NUMBER} pixels are supported"
            )
        values[k] = value
    if len(values) % 2:
        raise DataError(
            f"RLE has {len(values)} numbers, an odd count; expected 'start length' pairs"
        )
    starts, lengths = values[0::2], values[1::2]
    if relative:
        # Each start counts from the end of the previous run. The sums are checked in
        # floating point first: with many huge numbers int64 would wrap around silently.
        if len(values) and float(np.sum(values, dtype=np.float64)) > MAX_RLE_NUMBER:
            raise DataError(
                f"RLE runs end past pixel {MAX_RLE_NUMBER}, beyond any image: the relative "
                "starts and lengths add up to more than that"
            )
        absolute = np.cumsum(starts) + np.cumsum(lengths) - lengths
    else:
        if len(starts) and starts.min() < 1:
            k = int(np.argmin(starts))
            raise DataError(f"RLE pair {k + 1} starts at {starts[k]}; absolute starts are 1-based")
        absolute = starts - 1
    return absolute, lengths


def rle_decode(rle: str | None, height: int, width: int, *, relative: bool = True) -> np.ndarray:
    """Decode a SIIM-ACR run-length string into a boolean mask of shape ``(height, width)``.

    Parameters
    ----------
    rle:
        Space-separated ``start length`` pairs over the pixels numbered down the columns
        from 0, each start relative to the end of the previous run (see the module
        docstring); ``"-1"``, ``""`` or None for an empty mask.
    height, width:
        Image size in pixels (DICOM Rows, Columns).
    relative:
        False for absolute 1-based starts (the other Kaggle convention).

    Raises
    ------
    ValueError
        If the string is malformed, or a run ends past the image, naming the pair and the
        pixel position.
    """
    height, width = _check_shape(height, width)
    starts, lengths = parse_rle(rle, relative=relative)
    n = height * width
    ends = starts + lengths
    over = np.flatnonzero(ends > n)
    if len(over):
        k = int(over[0])
        raise DataError(
            f"RLE pair {k + 1} (numbers {2 * k + 1}-{2 * k + 2}) covers pixels "
            f"{starts[k]}-{ends[k] - 1}, past the last pixel {n - 1} of a {height}x{width} "
            "image (pixels counted down the columns from 0)"
        )
    edges = np.zeros(n + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:n]) > 0
    # Column-major numbering: the flat mask is the transposed image, row by row.
    return np.ascontiguousarray(flat.reshape(width, height).T)


def rle_encode(mask: np.ndarray | torch.Tensor, *, relative: bool = True) -> str:
    """Encode a 2D mask in the SIIM-ACR run-length format; the inverse of :func:`rle_decode`.

    Nonzero pixels are foreground. An empty mask gives ``"-1"``.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim != 2:
        raise DataError(f"rle_encode needs a 2D (height, width) mask, got shape {array.shape}")
    flat = np.ravel(array != 0, order="F")
    padded = np.concatenate(([False], flat, [False])).astype(np.int8)
    steps = np.diff(padded)
    starts = np.flatnonzero(steps == 1)
    ends = np.flatnonzero(steps == -1)
    if not len(starts):
        return "-1"
    lengths = ends - starts
    if relative:
        starts = starts - np.concatenate(([0], ends[:-1]))
    else:
        starts = starts + 1
    pairs = np.stack([starts, lengths], axis=1).ravel()
    return " ".join(str(int(v)) for v in pairs)


def _short(text: str, limit: int = 24) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[: limit - 4]}...' ({len(text)} characters)"


# ---------------------------------------------------------------------------------------
# Boxes


Box = tuple[float, ...]


def _number(row: CsvRow, column: str, path: Path) -> float | None:
    text = row.get(column)
    if text == "" or text.lower() == "nan":
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path} row {row.line}: {column} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path} row {row.line}: {column} is {text!r}, not a finite number")
    return value


@dataclass(frozen=True)
class RsnaPatient:
    """All rows of one patient in the RSNA labels file."""

    target: int
    boxes: tuple[Box, ...]
    lines: tuple[int, ...]


def parse_rsna(path: str | os.PathLike[str]) -> dict[str, RsnaPatient]:
    """Read ``stage_2_train_labels.csv``: per patient (in file order) target, boxes, rows.

    Raises
    ------
    ValueError
        Naming the file and row: empty file, missing columns, a Target other than 0/1, a
        positive row without a complete box, a box with a non-positive size, a negative
        row with a box, or a patient with both positive and negative rows.
    """
    path = Path(path)
    _, rows = read_table(path, required=RSNA_COLUMNS)
    targets: dict[str, int] = {}
    boxes: dict[str, list[Box]] = {}
    lines: dict[str, list[int]] = {}
    for row in rows:
        pid = row.get("patientId")
        if not pid:
            raise DataError(f"{path} row {row.line}: empty patientId")
        target_value = _number(row, "Target", path)
        if target_value not in (0.0, 1.0):
            raise DataError(
                f"{path} row {row.line}: Target is {row.get('Target')!r}; expected 0 or 1"
            )
        target = int(target_value)
        coords = [_number(row, c, path) for c in ("x", "y", "width", "height")]
        if target == 1:
            if any(v is None for v in coords):
                raise DataError(
                    f"{path} row {row.line}: Target is 1 but the box (x, y, width, height) "
                    f"is incomplete: {[row.get(c) for c in ('x', 'y', 'width', 'height')]}"
                )
            if coords[2] <= 0 or coords[3] <= 0:  # type: ignore[operator]
                raise DataError(
                    f"{path} row {row.line}: box width and height must be positive, got "
                    f"{coords[2]} x {coords[3]}"
                )
            check_box_extent(coords, f"{path} row {row.line}")  # type: ignore[arg-type]
        elif any(v is not None for v in coords):
            raise DataError(
                f"{path} row {row.line}: Target is 0 but the row has a box; negatives "
                "have empty x, y, width, height"
            )
        if pid in targets and targets[pid] != target:
            raise DataError(
                f"{path} row {row.line}: patient {pid} has Target {target} here but "
                f"{targets[pid]} in row {lines[pid][0]}"
            )
        targets[pid] = target
        lines.setdefault(pid, []).append(row.line)
        patient_boxes = boxes.setdefault(pid, [])
        if target == 1:
            patient_boxes.append(tuple(float(v) for v in coords))  # type: ignore[arg-type]
    return {pid: RsnaPatient(targets[pid], tuple(boxes[pid]), tuple(lines[pid])) for pid in targets}


def read_rsna_boxes(csv_path: str | os.PathLike[str]) -> dict[str, list[tuple[float, ...]]]:
    """Map each patientId of an RSNA labels file to its ``(x, y, width, height)`` boxes.

    Patients are in file order; negatives map to an empty list. Coordinates are floats in
    pixels, ``x`` the left column and ``y`` the top row. See :func:`parse_rsna` for the
    errors raised.
    """
    return {pid: list(patient.boxes) for pid, patient in parse_rsna(csv_path).items()}


def check_box_extent(box: Sequence[float], where: str) -> None:
    """Raise naming ``where`` when a box's far edge (``x + width``, ...) is not finite."""
    for start, extent, name in zip(box[0::2], box[2::2], ("x + width", "y + height")):
        if not math.isfinite(start + extent):
            raise DataError(f"{where}: the box's {name} ({start} + {extent}) is not finite")
    if len(box) == 6 and not math.isfinite(box[4] + box[5]):
        raise DataError(f"{where}: the box's z + depth ({box[4]} + {box[5]}) is not finite")


def box_in_image(box: Sequence[float], height: int, width: int, depth: int | None = None) -> bool:
    """Whether a box covers at least one pixel of the image (see :func:`boxes_to_mask`)."""
    values = [float(v) for v in box]
    ranges = [_box_range(values[0], values[2], width), _box_range(values[1], values[3], height)]
    if depth is not None and len(values) == 6:
        ranges.append(_box_range(values[4], values[5], depth))
    return all(hi > lo for lo, hi in ranges)


def _box_range(start: float, extent: float, size: int) -> tuple[int, int]:
    """Pixels ``[lo, hi)`` of one axis whose centres lie in ``[start, start + extent)``.

    For integer boxes these are exactly ``start ... start + extent - 1``. A box too thin to
    contain a pixel centre still gets the pixel under its own centre, so that a small box
    (or one shrunk by resizing) never vanishes from the mask.
    """
    lo = math.ceil(start - 0.5)
    hi = math.ceil(start + extent - 0.5)
    if hi <= lo and extent > 0:
        lo = math.floor(start + extent / 2.0)
        hi = lo + 1
    # Clip both ends into [0, size]: a negative end would count from the far edge.
    return min(max(lo, 0), size), min(max(hi, 0), size)


def boxes_to_mask(
    boxes: Iterable[Sequence[float]], height: int, width: int, *, depth: int | None = None
) -> np.ndarray:
    """Rasterize boxes into the boolean union mask of shape ``(height, width)``.

    Parameters
    ----------
    boxes:
        ``(x, y, width, height)`` in pixels, ``x`` the left column and ``y`` the top row
        (RSNA convention); a pixel belongs to a box when its centre lies inside it, so
        integer boxes cover columns ``x ... x + width - 1`` and rows ``y ... y + height -
        1``. With ``depth`` given, boxes are ``(x, y, width, height, z, depth)`` (``z`` the
        first slice) and the mask is ``(depth, height, width)``. Parts outside the image
        are clipped.
    height, width, depth:
        Image size in pixels (and slices).

    Raises
    ------
    ValueError
        For a box with the wrong number of values, a non-finite value or a negative size.
    """
    height, width = _check_shape(height, width)
    if depth is not None:
        depth = _check_shape(depth, 1)[0]
    shape = (height, width) if depth is None else (depth, height, width)
    mask = np.zeros(shape, dtype=bool)
    n_values = 4 if depth is None else 6
    for k, box in enumerate(boxes):
        values = [float(v) for v in box]
        if len(values) != n_values:
            form = "(x, y, width, height)" if depth is None else "(x, y, width, height, z, depth)"
            raise DataError(f"box {k} has {len(values)} values, expected {form}: {box!r}")
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"box {k} has a non-finite value: {box!r}")
        check_box_extent(values, f"box {k}")
        if values[2] < 0 or values[3] < 0 or (depth is not None and values[5] < 0):
            raise DataError(f"box {k} has a negative size: {box!r}")
        c0, c1 = _box_range(values[0], values[2], width)
        r0, r1 = _box_range(values[1], values[3], height)
        if depth is None:
            mask[r0:r1, c0:c1] = True
        else:
            s0, s1 = _box_range(values[4], values[5], depth)
            mask[s0:s1, r0:r1, c0:c1] = True
    return mask
