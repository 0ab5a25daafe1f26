"""Loaders for trustmap dataset folders and the public datasets users bring.

Each loader is an :class:`~trustmap.data.datasets.ImageDataset`: it reads its label files
when created, raising ``ValueError`` naming the file and row for any problem there (empty
CSVs, unknown labels, duplicate ids, malformed run-length strings) and
``FileNotFoundError`` for images it cannot find, and reads images on access, raising
``ValueError`` naming the file and row for a corrupt image, a mask whose shape differs from
its image, a run-length mask that runs past the image, or NaN values.

============================  =============================================================
:class:`FolderDataset`        the trustmap layout: ``dataset.json``, ``manifest.csv``,
                              ``boxes.csv``, ``images/``, ``masks/`` (phantoms write it;
                              users can build one by hand: a folder of images and a CSV)
:class:`SIIMDataset`          SIIM-ACR Pneumothorax: DICOM files + ``train-rle.csv``
:class:`RSNADataset`          RSNA Pneumonia Detection: DICOM + ``stage_2_train_labels.csv``
:class:`MedMNISTDataset`      a MedMNIST ``.npz`` file (2D grey or colour, 3D)
:class:`NiftiPairsDataset`    NIfTI images and masks in ``images/`` and ``masks/``
============================  =============================================================

Chest-radiograph DICOMs (SIIM, RSNA) are mapped to [0, 1] by each image's own minimum and
maximum by default (``intensity="minmax"``). Both challenges ship 8-bit MONOCHROME2 images
without a consistent window, and min/max gives the same result for 8-, 12- and 16-bit
files; pass ``intensity="dicom"`` for the file's own window or a ``{"kind": "window",
...}`` dict. Images keep their native size unless ``size=`` is given (the challenges'
radiographs are 1024x1024).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmap.data.datasets import (
    GROUND_TRUTH_KINDS,
    SPLITS,
    ImageDataset,
    Sample,
    map_intensity,
    normalize_intensity,
)
from trustmap.data.io import LoadedImage, load
from trustmap.data.labels import (
    CsvRow,
    box_in_image,
    boxes_to_mask,
    check_box_extent,
    parse_rle,
    parse_rsna,
    read_table,
    rle_decode,
)
from trustmap.errors import DataError, MissingFileError

__all__ = [
    "FolderDataset",
    "MedMNISTDataset",
    "NiftiPairsDataset",
    "RSNADataset",
    "SIIMDataset",
    "open_path",
]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
_DEFAULT_CLASSES = ("negative", "positive")
#: Class indices a MedMNIST file may use without naming its classes (MedMNIST has at most
#: 14); a label of 2**40 must not make a list of 2**40 names.
MAX_CLASSES = 1000
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights for RGB -> grey


# ---------------------------------------------------------------------------------------
# Reading one image or mask, with the file and row in every error


def _strip_suffix(name: str) -> str:
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _display(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def _read(path: Path, where: str, shown: str) -> LoadedImage:
    try:
        return load(path)
    except FileNotFoundError as exc:
        raise MissingFileError(f"{where}: {shown} does not exist") from exc
    except ValueError as exc:
        raise DataError(f"{where}: cannot read {shown}: {exc}") from exc


def _spatial_array(image: LoadedImage, spatial_dims: int, where: str, shown: str) -> np.ndarray:
    """The image as ``(C, *spatial)`` with ``spatial_dims`` axes (C = 3 for colour, else 1)."""
    array = image.array
    if image.is_color:
        if spatial_dims != 2:
            raise DataError(f"{where}: {shown} is a colour image but the dataset is 3D")
        return array
    if spatial_dims == 2 and array.ndim == 3 and array.shape[0] == 1:
        array = array[0]  # a 2D image stored as a one-slice volume
    if array.ndim != spatial_dims:
        raise DataError(
            f"{where}: {shown} is {array.ndim}D with shape {array.shape}, the dataset is "
            f"{spatial_dims}D"
        )
    return array[None]


def to_channels(array: np.ndarray, channels: int, where: str, shown: str) -> np.ndarray:
    """``(C, *spatial)`` with ``channels`` channels: colour to grey (BT.601 luma) or grey
    repeated; any other change raises naming ``where`` and ``shown``."""
    if array.shape[0] == channels:
        return array
    if array.shape[0] == 3 and channels == 1:
        return np.tensordot(_LUMA, array.astype(np.float64), axes=1)[None].astype(np.float32)
    if array.shape[0] == 1:
        return np.repeat(array, channels, axis=0)
    raise DataError(f"{where}: {shown} has {array.shape[0]} channels, {channels} are needed")


def _load_image(
    path: Path,
    *,
    where: str,
    root: Path | None,
    spatial_dims: int,
    channels: int,
    intensity: dict[str, Any],
) -> tuple[torch.Tensor, LoadedImage]:
    shown = _display(path, root)
    image = _read(path, where, shown)
    array = to_channels(_spatial_array(image, spatial_dims, where, shown), channels, where, shown)
    try:
        mapped = map_intensity(array, intensity, meta=image.meta)
    except ValueError as exc:
        raise DataError(f"{where}: {shown}: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(mapped)), image


def _load_mask(
    path: Path,
    *,
    where: str,
    root: Path | None,
    spatial: tuple[int, ...],
    image_shown: str,
    what: str = "mask",
) -> torch.Tensor:
    shown = _display(path, root)
    mask = _read(path, where, shown)
    array = mask.array
    if mask.is_color:
        array = array.max(axis=0)  # a mask saved as RGB: any channel marks the pixel
    if len(spatial) == 2 and array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != spatial:
        raise DataError(
            f"{where}: {what} {shown} has shape {tuple(array.shape)} but its image "
            f"{image_shown} has {spatial}"
        )
    return torch.from_numpy(np.ascontiguousarray(array > 0))


def _spacing(image: LoadedImage, fallback: Sequence[float] | None) -> tuple[float, ...] | None:
    units = image.meta.get("spacing_units")
    # NIfTI voxel sizes are millimetres by convention even where the header leaves the
    # unit code unset, as nibabel does by default.
    if units == "mm" or (image.meta.get("format") == "nifti" and units == "unknown"):
        return tuple(float(s) for s in image.spacing)
    return tuple(float(s) for s in fallback) if fallback is not None else None


def _dicom_index(folder: Path, where: str) -> dict[str, Path]:
    """DICOM files under ``folder`` (recursively), by file stem."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.dcm")):
        stem = path.stem
        if stem in found:
            raise DataError(
                f"{where}: two DICOM files have the id {stem}: {found[stem]} and {path}"
            )
        found[stem] = path
    return found


def _under(root: Path, path: str | os.PathLike[str] | None) -> Path:
    """``path`` relative to ``root`` (``root`` itself when None); absolute paths as given."""
    if path is None:
        return root
    return Path(path) if Path(path).is_absolute() else root / path


def _resolve_missing(missing: str) -> str:
    if missing not in ("error", "skip"):
        raise DataError(f"missing must be 'error' or 'skip', got {missing!r}")
    return missing


# ---------------------------------------------------------------------------------------
# The trustmap layout


def _read_card(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(card, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(card).__name__}")
    version = card.get("format_version", 1)
    if version != 1:
        raise DataError(f"{path}: format_version {version!r} is not supported (expected 1)")
    return card


def _is_integer_text(text: str) -> bool:
    """``"3"``, ``"-1"``: ASCII digits only (``"²"`` and ``"٣"`` are digits to Python)."""
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()


def _parse_label(text: str, classes: Sequence[str], where: str) -> int:
    if _is_integer_text(text):
        value = int(text)
        if 0 <= value < len(classes):
            return value
    elif text in classes:
        return list(classes).index(text)
    else:
        folded = [c.casefold() for c in classes]
        if text.casefold() in folded:
            return folded.index(text.casefold())
    shown = f"{text!r}" if text else "empty"
    raise DataError(
        f"{where}: unknown label {shown}; expected 0...{len(classes) - 1} or one of the class "
        f"names {list(classes)}"
    )


def _parse_split(text: str, where: str) -> str:
    split = _SPLIT_ALIASES.get(text.lower())
    if split is None:
        raise DataError(f"{where}: unknown split {text!r}; expected one of {', '.join(SPLITS)}")
    return split


class FolderDataset(ImageDataset):
    """A dataset directory in the trustmap layout (what phantoms write).

    ::

        DIR/dataset.json    the card (optional for hand-made folders)
        DIR/manifest.csv    image,label[,split,mask,token_mask,lesion_type]
        DIR/boxes.csv       image,x,y,width,height[,z,depth]   (optional)
        DIR/images/...      PNG, NIfTI, DICOM or NPY, paths relative to DIR

    Labels are class indices or class names from the card's ``classes``. An empty mask
    field means an all-zero mask. The card gives ``name``, ``classes``, ``spatial_dims``,
    ``in_channels``, ``ground_truth``, ``intensity`` and ``spacing``; without a card the
    name is the folder's, the classes ``("negative", "positive")`` (or the class names
    the labels use), images are 2D unless NIfTI volumes, intensity ``"minmax"``, and the
    ground truth follows from the columns and files present. The boxes file's ``image``
    column holds the manifest's image path or the sample id (the file name without its
    suffix).

    Parameters
    ----------
    root:
        The dataset directory.
    size:
        Resize images (and masks, boxes) on load to this spatial size.
    intensity:
        Override the card's intensity mapping.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        size: int | Sequence[int] | None = None,
        intensity: str | dict[str, Any] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise MissingFileError(f"{root}: no such dataset directory")
        manifest = root / "manifest.csv"
        if not manifest.is_file():
            raise MissingFileError(
                f"{root}: has no manifest.csv (columns image,label[,split,mask,...])"
            )
        card = _read_card(root)
        header, rows = read_table(manifest, required=("image", "label"))
        self.card = card
        self.manifest = manifest

        classes = card.get("classes")
        if classes is None:
            names = {row.get("label") for row in rows}
            non_numeric = sorted(n for n in names if not _is_integer_text(n))
            classes = non_numeric if len(non_numeric) >= 2 else list(_DEFAULT_CLASSES)
        if (
            not isinstance(classes, list | tuple)
            or len(classes) < 2
            or not all(isinstance(c, str) and c for c in classes)
        ):
            raise DataError(
                f"{root / 'dataset.json'}: classes must list at least two names, got {classes!r}"
            )

        self._paths: list[Path] = []
        self._masks: list[Path | None] = []
        self._tokens: list[Path | None] = []
        self._rows: list[int] = []
        self._lesions: list[str] = []
        labels: list[int] = []
        ids: list[str] = []
        splits: list[str] = []
        seen_paths: dict[str, int] = {}
        seen_ids: dict[str, int] = {}
        for row in rows:
            where = f"manifest.csv row {row.line}"
            image = row.get("image")
            if not image:
                raise DataError(f"{where}: empty image path")
            if image in seen_paths:
                raise DataError(
                    f"{where}: image {image} is listed twice (also row {seen_paths[image]})"
                )
            seen_paths[image] = row.line
            sample_id = _strip_suffix(Path(image).name)
            if sample_id in seen_ids:
                raise DataError(
                    f"{where}: duplicate id {sample_id!r} ({image}; also row {seen_ids[sample_id]})"
                )
            seen_ids[sample_id] = row.line
            labels.append(_parse_label(row.get("label"), classes, where))
            if "split" in header:
                splits.append(_parse_split(row.get("split"), where) if row.get("split") else "")
            path = self._existing(root, image, where, "image")
            self._paths.append(path)
            self._masks.append(self._optional(root, row, "mask", where))
            self._tokens.append(self._optional(root, row, "token_mask", where))
            self._rows.append(row.line)
            self._lesions.append(row.get("lesion_type"))
            ids.append(sample_id)

        split_array = None
        if splits and any(splits):
            if not all(splits):
                first = next(r for r, s in zip(rows, splits) if not s)
                raise DataError(
                    f"manifest.csv row {first.line}: empty split while other rows have one; "
                    "give every row train, val or test, or leave the column empty"
                )
            split_array = np.asarray(splits, dtype=object)

        spatial_dims = card.get("spatial_dims") or self._guess_dims(self._paths[0])
        in_channels = card.get("in_channels", 1)
        _check_card(root, spatial_dims, in_channels, card.get("spacing"))
        boxes_file = root / "boxes.csv"
        self._boxes = (
            self._read_boxes(boxes_file, ids, spatial_dims) if boxes_file.is_file() else None
        )
        has_mask_column = "mask" in header
        ground_truth = card.get("ground_truth")
        if ground_truth is None:
            with_mask = has_mask_column and any(m is not None for m in self._masks)
            with_boxes = self._boxes is not None
            ground_truth = {
                (True, True): "mask+boxes",
                (True, False): "mask",
                (False, True): "boxes",
                (False, False): "none",
            }[(with_mask, with_boxes)]
        if ground_truth not in GROUND_TRUTH_KINDS:
            raise DataError(f"{root / 'dataset.json'}: unknown ground_truth {ground_truth!r}")
        if "mask" in ground_truth and not has_mask_column:
            raise DataError(
                f"{manifest}: dataset.json says ground_truth {ground_truth!r} but the manifest "
                "has no mask column"
            )
        if "boxes" in ground_truth and self._boxes is None:
            raise DataError(
                f"{root}: dataset.json says ground_truth {ground_truth!r} but there is no boxes.csv"
            )
        self.intensity = normalize_intensity(intensity or card.get("intensity") or "minmax")
        spacing = card.get("spacing")
        self._card_spacing = tuple(float(s) for s in spacing) if spacing else None
        super().__init__(
            name=card.get("name") or root.name,
            classes=classes,
            spatial_dims=int(spatial_dims),
            in_channels=int(in_channels),
            ground_truth=ground_truth,
            labels=labels,
            ids=ids,
            splits=split_array,
            size=size,
            root=root,
        )

    @staticmethod
    def _existing(root: Path, relative: str, where: str, what: str) -> Path:
        path = Path(relative)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise MissingFileError(f"{where}: {what} {relative} does not exist")
        return path

    def _optional(self, root: Path, row: CsvRow, column: str, where: str) -> Path | None:
        value = row.get(column)
        return self._existing(root, value, where, column.replace("_", " ")) if value else None

    @staticmethod
    def _guess_dims(path: Path) -> int:
        if path.name.endswith(_NIFTI_SUFFIXES):
            import nibabel as nib

            try:
                shape = nib.load(path).shape
            except Exception as exc:  # nibabel raises many types on garbage
                raise DataError(f"{path}: not a readable NIfTI file ({exc})") from exc
            return 3 if len(shape) >= 3 and shape[2] > 1 else 2
        return 2

    @staticmethod
    def _read_boxes(path: Path, ids: list[str], spatial_dims: int) -> dict[int, list[tuple]]:
        columns = ("image", "x", "y", "width", "height")
        if spatial_dims == 3:
            columns += ("z", "depth")
        _, rows = read_table(path, required=columns)
        index = {sample_id: k for k, sample_id in enumerate(ids)}
        boxes: dict[int, list[tuple]] = {}
        for row in rows:
            where = f"boxes.csv row {row.line}"
            ref = row.get("image")
            key = _strip_suffix(Path(ref).name)
            if key not in index:
                raise DataError(f"{where}: image {ref!r} is not in manifest.csv")
            values = []
            for column in columns[1:]:
                text = row.get(column)
                try:
                    value = float(text)
                except ValueError:
                    raise DataError(f"{where}: {column} is {text!r}, not a number") from None
                if not np.isfinite(value):
                    raise DataError(f"{where}: {column} is {text!r}, not a finite number")
                values.append(value)
            sizes = values[2:4] + (values[5:6] if spatial_dims == 3 else [])
            if min(sizes) <= 0:
                raise DataError(f"{where}: box sizes must be positive, got {values}")
            check_box_extent(values, where)
            boxes.setdefault(index[key], []).append(tuple(values))
        return boxes

    def _load(self, index: int) -> Sample:
        where = f"manifest.csv row {self._rows[index]}"
        path = self._paths[index]
        image, loaded = _load_image(
            path,
            where=where,
            root=self.root,
            spatial_dims=self.spatial_dims,
            channels=self.in_channels,
            intensity=self.intensity,
        )
        spatial = tuple(image.shape[1:])
        shown = _display(path, self.root)
        boxes = tuple(self._boxes.get(index, ())) if self._boxes is not None else ()
        _check_boxes_inside(boxes, spatial, where, shown)
        mask = None
        if "mask" in self.ground_truth:
            mask_path = self._masks[index]
            mask = (
                _load_mask(
                    mask_path, where=where, root=self.root, spatial=spatial, image_shown=shown
                )
                if mask_path is not None
                else torch.zeros(spatial, dtype=torch.bool)
            )
        elif self.ground_truth == "boxes":
            mask = torch.from_numpy(_boxes_mask(boxes, spatial))
        token = self._tokens[index]
        token_mask = (
            _load_mask(
                token,
                where=where,
                root=self.root,
                spatial=spatial,
                image_shown=shown,
                what="token mask",
            )
            if token is not None
            else None
        )
        meta = {
            "id": self.ids[index],
            "path": str(path),
            "split": None if self.splits is None else str(self.splits[index]),
            "spacing": _spacing(loaded, self._card_spacing),
            "row": self._rows[index],
            "source": str(self.manifest),
            "lesion_type": self._lesions[index] or None,
        }
        return Sample(image, int(self.labels[index]), mask, boxes, token_mask, meta)


def _check_card(root: Path, spatial_dims: object, in_channels: object, spacing: object) -> None:
    """The card's numbers, checked before they are used, naming dataset.json and the key."""
    card = root / "dataset.json"
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise DataError(f"{card}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise DataError(f"{card}: in_channels must be a positive integer, got {in_channels!r}")
    if spacing is None:
        return
    if (
        not isinstance(spacing, list | tuple)
        or len(spacing) != spatial_dims
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in spacing
        )
    ):
        raise DataError(
            f"{card}: spacing must list {spatial_dims} positive voxel sizes in mm, got {spacing!r}"
        )


def _check_boxes_inside(
    boxes: Sequence[tuple], spatial: tuple[int, ...], where: str, shown: str
) -> None:
    """A box that covers no pixel of its image would give an empty mask for a positive."""
    depth = spatial[0] if len(spatial) == 3 else None
    for box in boxes:
        if not box_in_image(box, spatial[-2], spatial[-1], depth):
            size = "x".join(str(n) for n in spatial)
            raise DataError(
                f"{where}: box {tuple(box)} lies outside the {size} image {shown} (x is the "
                "column and y the row of its top-left corner, in pixels)"
            )


def _boxes_mask(boxes: Sequence[tuple], spatial: tuple[int, ...]) -> np.ndarray:
    depth = spatial[0] if len(spatial) == 3 else None
    return boxes_to_mask(boxes, spatial[-2], spatial[-1], depth=depth)


# ---------------------------------------------------------------------------------------
# SIIM-ACR and RSNA: DICOM chest radiographs with a labels CSV


class _DicomCsvDataset(ImageDataset):
    """Shared loading of one 2D greyscale DICOM per id."""

    csv_path: Path
    _files: list[Path]
    _lines: list[tuple[int, ...]]

    def _dicom(self, index: int) -> tuple[torch.Tensor, LoadedImage, str]:
        where = f"{self.csv_path.name} row {self._lines[index][0]}"
        image, loaded = _load_image(
            self._files[index],
            where=where,
            root=self.root,
            spatial_dims=2,
            channels=1,
            intensity=self.intensity,
        )
        return image, loaded, where

    def _meta(self, index: int, loaded: LoadedImage) -> dict[str, Any]:
        return {
            "id": self.ids[index],
            "path": str(self._files[index]),
            "split": None,
            "spacing": _spacing(loaded, None),
            "row": self._lines[index][0],
            "rows": self._lines[index],
            "source": str(self.csv_path),
            "modality": loaded.modality,
        }

    def _match_files(
        self, ids: list[str], lines: list[tuple[int, ...]], images: Path, missing: str
    ) -> list[int]:
        """Find each id's DICOM file; return the positions of the ids kept."""
        index = _dicom_index(images, str(self.csv_path))
        keep, absent = [], []
        for k, sample_id in enumerate(ids):
            if sample_id in index:
                keep.append(k)
            else:
                absent.append(k)
        if absent and missing == "error":
            k = absent[0]
            more = f" (and {len(absent) - 1} more ids)" if len(absent) > 1 else ""
            raise MissingFileError(
                f"{self.csv_path.name} row {lines[k][0]}: no DICOM file {ids[k]}.dcm under "
                f"{images}{more}; pass missing='skip' to leave such rows out"
            )
        self.skipped = [ids[k] for k in absent]
        self._files = [index[ids[k]] for k in keep]
        return keep


class SIIMDataset(_DicomCsvDataset):
    """SIIM-ACR Pneumothorax Segmentation: DICOM radiographs and run-length masks.

    The CSV (``ImageId,EncodedPixels``) may hold several rows per image, whose masks are
    unioned; ``-1`` means no pneumothorax. Each ImageId (the DICOM SOPInstanceUID) is the
    stem of a ``.dcm`` file anywhere under ``images`` (the challenge nests them as
    ``dicom-images-train/<study>/<series>/<ImageId>.dcm``). Labels are 1 where any row has
    a mask. Run-length syntax is checked when the dataset is opened, bounds when an image
    is loaded (they need its size).

    Parameters
    ----------
    root:
        Directory holding the CSV (and by default the DICOM files).
    rle_csv:
        CSV file name in ``root`` or a path.
    images:
        Directory searched (recursively) for ``<ImageId>.dcm``, relative to ``root``;
        default ``root``.
    relative:
        The challenge's relative run-length starts (True) or absolute 1-based ones.
    missing:
        ``"error"`` (default) or ``"skip"`` for CSV ids without a DICOM file; skipped ids
        are listed in ``skipped``.
    size, intensity:
        Resize on load; intensity mapping (default ``"minmax"``, see the module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        rle_csv: str | os.PathLike[str] = "train-rle.csv",
        images: str | os.PathLike[str] | None = None,
        relative: bool = True,
        missing: str = "error",
        size: int | Sequence[int] | None = None,
        intensity: str | dict[str, Any] | None = "minmax",
    ) -> None:
        root = Path(root)
        self.csv_path = _under(root, rle_csv)
        self.relative = relative
        self.intensity = normalize_intensity(intensity or "minmax")
        _, rows = read_table(self.csv_path, required=("ImageId", "EncodedPixels"))
        rles: dict[str, list[tuple[int, str]]] = {}
        all_lines: dict[str, list[int]] = {}
        for row in rows:
            where = f"{self.csv_path.name} row {row.line}"
            image_id = row.get("ImageId")
            if not image_id:
                raise DataError(f"{where}: empty ImageId")
            text = row.get("EncodedPixels")
            try:
                _, lengths = parse_rle(text, relative=relative)
            except ValueError as exc:
                raise DataError(f"{where} (ImageId {image_id}): {exc}") from exc
            runs = rles.setdefault(image_id, [])
            if lengths.sum() > 0:  # "-1" and empty strings mark no finding
                runs.append((row.line, text))
            all_lines.setdefault(image_id, []).append(row.line)
        ids = list(rles)
        lines = [tuple(all_lines[i]) for i in ids]
        keep = self._match_files(ids, lines, _under(root, images), _resolve_missing(missing))
        self._lines = [lines[k] for k in keep]
        self._rles = [rles[ids[k]] for k in keep]
        super().__init__(
            name="siim-acr-pneumothorax",
            classes=_DEFAULT_CLASSES,
            spatial_dims=2,
            in_channels=1,
            ground_truth="mask",
            labels=[int(bool(r)) for r in self._rles],
            ids=[ids[k] for k in keep],
            size=size,
            root=root,
        )

    def _load(self, index: int) -> Sample:
        image, loaded, _ = self._dicom(index)
        height, width = image.shape[1:]
        mask = np.zeros((height, width), dtype=bool)
        for line, text in self._rles[index]:
            try:
                mask |= rle_decode(text, height, width, relative=self.relative)
            except ValueError as exc:
                raise DataError(
                    f"{self.csv_path.name} row {line} (ImageId {self.ids[index]}, image "
                    f"{_display(self._files[index], self.root)}): {exc}"
                ) from exc
        meta = self._meta(index, loaded)
        return Sample(image, int(self.labels[index]), torch.from_numpy(mask), (), None, meta)


class RSNADataset(_DicomCsvDataset):
    """RSNA Pneumonia Detection Challenge: DICOM radiographs and pneumonia boxes.

    ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``) holds one row per
    box, or one row with Target 0 and no box for a negative. Each patientId is the stem of
    a ``.dcm`` file under ``images``. Samples carry the boxes and, as mask, their union
    (:func:`~trustmap.data.labels.boxes_to_mask` at the image's size).

    Parameters are those of :class:`SIIMDataset`, with ``labels_csv`` for the CSV.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        labels_csv: str | os.PathLike[str] = "stage_2_train_labels.csv",
        images: str | os.PathLike[str] | None = None,
        missing: str = "error",
        size: int | Sequence[int] | None = None,
        intensity: str | dict[str, Any] | None = "minmax",
    ) -> None:
        root = Path(root)
        self.csv_path = _under(root, labels_csv)
        self.intensity = normalize_intensity(intensity or "minmax")
        patients = parse_rsna(self.csv_path)
        ids = list(patients)
        lines = [patients[p].lines for p in ids]
        keep = self._match_files(ids, lines, _under(root, images), _resolve_missing(missing))
        self._lines = [lines[k] for k in keep]
        self._boxes = [patients[ids[k]].boxes for k in keep]
        super().__init__(
            name="rsna-pneumonia",
            classes=_DEFAULT_CLASSES,
            spatial_dims=2,
            in_channels=1,
            ground_truth="boxes",
            labels=[patients[ids[k]].target for k in keep],
            ids=[ids[k] for k in keep],
            size=size,
            root=root,
        )

    def _load(self, index: int) -> Sample:
        image, loaded, _ = self._dicom(index)
        boxes = self._boxes[index]
        spatial = tuple(image.shape[1:])
        for box, line in zip(boxes, self._lines[index]):
            where = f"{self.csv_path.name} row {line} (patientId {self.ids[index]})"
            _check_boxes_inside([box], spatial, where, _display(self._files[index], self.root))
        mask = torch.from_numpy(_boxes_mask(boxes, spatial))
        meta = self._meta(index, loaded)
        return Sample(image, int(self.labels[index]), mask, boxes, None, meta)


# ---------------------------------------------------------------------------------------
# MedMNIST


class MedMNISTDataset(ImageDataset):
    """A MedMNIST ``.npz`` file: ``{train,val,test}_images`` and ``..._labels`` arrays.

    Images are ``(N, H, W)`` (grey), channel-last ``(N, H, W, C)`` with C 1 (grey), 3
    (colour) or 4 (RGBA, alpha dropped), or ``(N, D, H, W)`` / ``(N, D, H, W, 1)`` (the 3D
    sets); uint8 images map 0...255 to [0, 1] (other types by each image's min/max)
    unless ``intensity`` says otherwise. Labels ``(N, 1)`` are class indices (at most
    :data:`MAX_CLASSES` without ``classes=``); multi-label
    files (``(N, K)``, e.g. ChestMNIST) need ``label_column`` to pick the binary task.
    The split is the file's. There is no localization ground truth. A sample's ``row`` is
    its index within its split's arrays, its id ``<split>_<row>``.

    Parameters
    ----------
    path:
        The ``.npz`` file.
    label_column:
        For multi-label files, the column used as a binary label.
    classes:
        Class names; default ``"0"``, ``"1"``, ... (the file carries none).
    spatial_dims:
        2 or 3 to override the guess from the array shapes (``(N, D, H, 3)`` volumes).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        label_column: int | None = None,
        classes: Sequence[str] | None = None,
        spatial_dims: int | None = None,
        size: int | Sequence[int] | None = None,
        intensity: str | dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except Exception as exc:  # zipfile, zlib and numpy raise their own types
            raise DataError(
                f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})"
            ) from exc
        for key, value in arrays.items():
            # numpy hands back the raw bytes of a member that is not an .npy array.
            if not isinstance(value, np.ndarray):
                raise DataError(f"{path}: member {key!r} is not a NumPy array")
        present = [s for s in SPLITS if f"{s}_images" in arrays or f"{s}_labels" in arrays]
        if not present:
            raise DataError(
                f"{path}: has none of the MedMNIST arrays train_images/train_labels, "
                f"val_*, test_*; it holds {sorted(arrays) or 'nothing'}"
            )
        images, labels, splits, rows = [], [], [], []
        for split in present:
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in arrays:
                    raise DataError(f"{path}: has {split} arrays but no {key}")
            x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            self._check_images(x, path, split)
            if y.ndim == 0:
                raise DataError(f"{path}: {split}_labels is a single value, not one per image")
            if len(x) != len(y):
                raise DataError(
                    f"{path}: {split}_images has {len(x)} images but {split}_labels {len(y)} labels"
                )
            images.append(x)
            labels.append(self._labels(y, label_column, path, split))
            splits += [split] * len(x)
            rows += range(len(x))
        shapes = {x.shape[1:] for x in images}
        if len(shapes) > 1:
            raise DataError(f"{path}: the splits' images have different shapes {sorted(shapes)}")
        shape = images[0].shape
        dims, channels, self._channel_last = self._layout(shape, spatial_dims, path)
        self._images = images
        self._offsets = np.cumsum([0] + [len(x) for x in images])
        self.path = path
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        n_classes = int(all_labels.max()) + 1 if len(all_labels) else 2
        if classes is None:
            if n_classes > MAX_CLASSES:
                raise DataError(
                    f"{path}: a label is {n_classes - 1}; class indices go up to "
                    f"{MAX_CLASSES - 1} unless classes= names every class"
                )
            classes = [str(k) for k in range(max(n_classes, 2))]
        elif len(classes) < n_classes:
            raise DataError(
                f"{path}: labels go up to {n_classes - 1} but only {len(classes)} classes given"
            )
        default = (
            {"kind": "range", "min": 0, "max": 255} if images[0].dtype == np.uint8 else "minmax"
        )
        self.intensity = normalize_intensity(intensity or default)
        self._rows = rows
        super().__init__(
            name=name or path.stem,
            classes=classes,
            spatial_dims=dims,
            in_channels=channels,
            ground_truth="none",
            labels=all_labels,
            ids=[f"{s}_{r}" for s, r in zip(splits, rows)],
            splits=splits,
            size=size,
            root=path,
        )

    @staticmethod
    def _labels(y: np.ndarray, column: int | None, path: Path, split: str) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2:
            raise DataError(
                f"{path}: {split}_labels has shape {y.shape}, expected (N, 1) or (N, K)"
            )
        if y.dtype.kind not in "iub" and not (
            y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))
        ):
            raise DataError(f"{path}: {split}_labels must hold integers, got {y.dtype}")
        if y.shape[1] > 1:
            if column is None:
                raise DataError(
                    f"{path}: {split}_labels is multi-label with {y.shape[1]} columns; pass "
                    "label_column=k to use column k as a binary label"
                )
            if not 0 <= column < y.shape[1]:
                raise DataError(f"{path}: label_column {column} out of range 0...{y.shape[1] - 1}")
            y = y[:, column : column + 1]
        column_values = y[:, 0]
        if len(column_values):
            top = float(np.max(column_values.astype(np.float64)))
            if top >= 2**31:
                row = int(np.argmax(column_values))
                raise DataError(
                    f"{path}: {split}_labels[{row}] is {column_values[row]}, not a class index "
                    f"(at most {MAX_CLASSES - 1} without classes=)"
                )
        values = column_values.astype(np.int64)
        if len(values) and values.min() < 0:
            row = int(np.argmin(values))
            raise DataError(f"{path}: {split}_labels[{row}] is {values[row]}, a negative label")
        return values

    @staticmethod
    def _check_images(x: np.ndarray, path: Path, split: str) -> None:
        if x.ndim < 3:
            raise DataError(
                f"{path}: {split}_images has shape {x.shape}; expected (N, H, W), (N, H, W, C) "
                "or (N, D, H, W)"
            )
        if x.dtype.kind not in "biuf":
            raise DataError(f"{path}: {split}_images must hold numbers, got dtype {x.dtype}")
        if 0 in x.shape[1:]:
            raise DataError(f"{path}: {split}_images has shape {x.shape}, an empty image size")

    @staticmethod
    def _layout(
        shape: tuple[int, ...], spatial_dims: int | None, path: Path
    ) -> tuple[int, int, bool]:
        """Spatial dims, channels, and whether the channels are the last axis.

        MedMNIST stores colour channel-last: ``(N, H, W, 3)``; ``(N, H, W, 1)`` and
        RGBA ``(N, H, W, 4)`` (alpha dropped) are read the same way, and ``(N, D, H, W,
        1)`` as a grey volume. A last axis of 1, 3 or 4 is a channel axis unless
        ``spatial_dims=3`` says the array is a volume.
        """
        if len(shape) == 3:
            if spatial_dims == 3:
                raise DataError(f"{path}: images of shape {shape} are 2D, not 3D")
            return 2, 1, False
        if len(shape) == 4:
            if shape[-1] in (1, 3, 4) and spatial_dims != 3:
                return 2, 1 if shape[-1] == 1 else 3, True
            if spatial_dims == 2:
                raise DataError(f"{path}: images of shape {shape} are not 2D (N, H, W[, C])")
            return 3, 1, False
        if len(shape) == 5 and shape[-1] == 1 and spatial_dims != 2:
            return 3, 1, True
        raise DataError(
            f"{path}: images have shape {shape}; expected (N, H, W), (N, H, W, C) with C 1, 3 "
            "or 4, (N, D, H, W) or (N, D, H, W, 1)"
        )

    def _load(self, index: int) -> Sample:
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        split = str(self.splits[index])
        row = self._rows[index]
        array = np.asarray(self._images[part][index - self._offsets[part]])
        where = f"{self.path.name} {split}_images[{row}]"
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DataError(f"{where}: contains NaN or Inf values")
        if self._channel_last:
            array = np.moveaxis(array[..., : self.in_channels], -1, 0)  # RGBA: alpha dropped
        else:
            array = array[None]
        mapped = map_intensity(array, self.intensity)
        meta = {
            "id": self.ids[index],
            "path": str(self.path),
            "split": split,
            "spacing": None,
            "row": row,
            "source": str(self.path),
        }
        return Sample(
            torch.from_numpy(np.ascontiguousarray(mapped)), int(self.labels[index]), meta=meta
        )


# ---------------------------------------------------------------------------------------
# NIfTI image/mask pairs


def _nifti_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if (
            not path.is_file()
            or not path.name.endswith(_NIFTI_SUFFIXES)
            or path.name.startswith(".")
        ):
            continue
        stem = _strip_suffix(path.name)
        if stem in found:
            raise DataError(
                f"{folder}: two files have the id {stem}: {found[stem].name} and {path.name}"
            )
        found[stem] = path
    return found


class NiftiPairsDataset(ImageDataset):
    """NIfTI images in ``images/`` with masks of the same file stem in ``masks/``.

    Labels come from a CSV (``labels.csv`` in ``root`` when present, or ``labels_csv``)
    with columns ``image`` (or ``id``: the file stem or name) and ``label``, and an
    optional ``split``; without one, a sample is positive when its mask is non-empty
    (which reads every mask when the dataset is opened). Mask voxels > 0 are lesion
    (multi-label masks are unioned). 2D images may be stored as ``(X, Y)`` or ``(X, Y,
    1)``.

    Parameters
    ----------
    root:
        Directory holding ``images/`` and ``masks/``.
    images, masks:
        Their names under ``root``.
    labels_csv:
        Labels file (name in ``root`` or path); default ``labels.csv`` if it exists.
    mask_suffix:
        Text between the stem and the suffix of mask files (``"_seg"`` for
        ``case1_seg.nii.gz``).
    intensity:
        Default ``"zscore"`` (MR); use a window for CT in Hounsfield units.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        images: str = "images",
        masks: str = "masks",
        labels_csv: str | os.PathLike[str] | None = None,
        mask_suffix: str = "",
        classes: Sequence[str] | None = None,
        size: int | Sequence[int] | None = None,
        intensity: str | dict[str, Any] | None = "zscore",
    ) -> None:
        root = Path(root)
        image_dir, mask_dir = root / images, root / masks
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise MissingFileError(f"{root}: has no {folder.name}/ directory")
        image_files = _nifti_files(image_dir)
        if not image_files:
            raise DataError(f"{image_dir}: contains no NIfTI files (.nii, .nii.gz)")
        mask_files = {}
        for stem, path in _nifti_files(mask_dir).items():
            if mask_suffix and not stem.endswith(mask_suffix):
                continue
            mask_files[stem[: len(stem) - len(mask_suffix)] if mask_suffix else stem] = path
        ids = list(image_files)
        for sample_id in ids:
            if sample_id not in mask_files:
                raise MissingFileError(
                    f"{image_dir.name}/{image_files[sample_id].name}: has no mask "
                    f"{masks}/{sample_id}{mask_suffix}.nii[.gz]"
                )
        extra = sorted(set(mask_files) - set(image_files))
        if extra:
            raise DataError(
                f"{mask_dir}: mask {mask_files[extra[0]].name} has no image in {images}/"
            )
        self.root = root
        self._images = [image_files[i] for i in ids]
        self._mask_files = [mask_files[i] for i in ids]
        self.intensity = normalize_intensity(intensity or "zscore")
        classes = tuple(classes) if classes is not None else _DEFAULT_CLASSES
        self._lines: list[int | None] = [None] * len(ids)
        csv_path = None
        if labels_csv is not None:
            csv_path = _under(root, labels_csv)
        elif (root / "labels.csv").is_file():
            csv_path = root / "labels.csv"
        self.labels_csv = csv_path
        splits = None
        if csv_path is not None:
            labels, splits = self._read_labels(csv_path, ids, classes)
        else:
            labels = [int(self._mask_nonempty(k)) for k in range(len(ids))]
        dims = self._dims(self._images[0])
        super().__init__(
            name=root.name,
            classes=classes,
            spatial_dims=dims,
            in_channels=1,
            ground_truth="mask",
            labels=labels,
            ids=ids,
            splits=splits,
            size=size,
            root=root,
        )

    def _read_labels(
        self, csv_path: Path, ids: list[str], classes: Sequence[str]
    ) -> tuple[list[int], np.ndarray | None]:
        header, rows = read_table(csv_path)
        key = "image" if "image" in header else "id" if "id" in header else None
        if key is None or "label" not in header:
            raise DataError(
                f"{csv_path}: needs columns image (or id) and label; it has {', '.join(header)}"
            )
        index = {sample_id: k for k, sample_id in enumerate(ids)}
        labels: list[int | None] = [None] * len(ids)
        splits: list[str] = [""] * len(ids)
        for row in rows:
            where = f"{csv_path.name} row {row.line}"
            ref = _strip_suffix(Path(row.get(key)).name)
            if ref not in index:
                raise DataError(f"{where}: image {row.get(key)!r} is not in images/")
            k = index[ref]
            if labels[k] is not None:
                raise DataError(f"{where}: duplicate id {ref!r} (also row {self._lines[k]})")
            labels[k] = _parse_label(row.get("label"), classes, where)
            self._lines[k] = row.line
            if "split" in header and row.get("split"):
                splits[k] = _parse_split(row.get("split"), where)
        unlabelled = [ids[k] for k, value in enumerate(labels) if value is None]
        if unlabelled:
            raise DataError(
                f"{csv_path}: has no row for image {unlabelled[0]}"
                + (f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else "")
            )
        split_array = None
        if any(splits):
            if not all(splits):
                k = splits.index("")
                raise DataError(
                    f"{csv_path.name} row {self._lines[k]}: empty split while other rows have one"
                )
            split_array = np.asarray(splits, dtype=object)
        return [int(v) for v in labels], split_array  # type: ignore[arg-type]

    def _where(self, index: int, sample: Sample | None = None) -> str:
        line = self._lines[index]
        name = f"{self._images[index].parent.name}/{self._images[index].name}"
        return f"{self.labels_csv.name} row {line} ({name})" if line is not None else name

    def _mask_nonempty(self, index: int) -> bool:
        path = self._mask_files[index]
        return bool((_read(path, self._where(index), _display(path, self.root)).array > 0).any())

    def _dims(self, path: Path) -> int:
        return FolderDataset._guess_dims(path)

    def _load(self, index: int) -> Sample:
        where = self._where(index)
        path = self._images[index]
        image, loaded = _load_image(
            path,
            where=where,
            root=self.root,
            spatial_dims=self.spatial_dims,
            channels=1,
            intensity=self.intensity,
        )
        spatial = tuple(image.shape[1:])
        mask = _load_mask(
            self._mask_files[index],
            where=where,
            root=self.root,
            spatial=spatial,
            image_shown=_display(path, self.root),
        )
        meta = {
            "id": self.ids[index],
            "path": str(path),
            "split": None if self.splits is None else str(self.splits[index]),
            "spacing": _spacing(loaded, None),
            "row": self._lines[index],
            "source": str(self.labels_csv) if self.labels_csv else None,
            "mask_path": str(self._mask_files[index]),
        }
        return Sample(image, int(self.labels[index]), mask, (), None, meta)


# ---------------------------------------------------------------------------------------
# Layout detection

_KINDS = {
    "folder": FolderDataset,
    "siim": SIIMDataset,
    "rsna": RSNADataset,
    "medmnist": MedMNISTDataset,
    "nifti": NiftiPairsDataset,
}


def detect_kind(path: str | os.PathLike[str]) -> str:
    """Which loader reads ``path``: ``"folder"``, ``"siim"``, ``"rsna"``, ``"medmnist"``
    or ``"nifti"`` (see :func:`open_path`)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return "medmnist"
        raise DataError(f"{path}: a dataset is a directory or a MedMNIST .npz file")
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such file or directory")
    if (path / "dataset.json").is_file() or (path / "manifest.csv").is_file():
        return "folder"
    if (path / "train-rle.csv").is_file():
        return "siim"
    if any(path.glob("stage_*_train_labels.csv")):
        return "rsna"
    if (path / "images").is_dir() and (path / "masks").is_dir():
        images = path / "images"
        if any(p.name.endswith(_NIFTI_SUFFIXES) for p in images.iterdir()):
            return "nifti"
    archives = sorted(path.glob("*.npz"))
    if len(archives) == 1:
        return "medmnist"
    if len(archives) > 1:
        raise DataError(
            f"{path}: holds {len(archives)} .npz files "
            f"({', '.join(a.name for a in archives[:5])}); open one of them"
        )
    raise DataError(
        f"{path}: not a recognised dataset layout; expected dataset.json/manifest.csv "
        "(trustmap), train-rle.csv (SIIM-ACR), stage_2_train_labels.csv (RSNA), a .npz "
        "file (MedMNIST) or images/ and masks/ of NIfTI files"
    )


def open_path(
    path: str | os.PathLike[str], *, kind: str | None = None, **kwargs: Any
) -> ImageDataset:
    """Open a dataset directory (or MedMNIST file) with the loader its layout calls for.

    ``kind`` (``"folder"``, ``"siim"``, ``"rsna"``, ``"medmnist"``, ``"nifti"``) skips the
    detection; other keywords go to the loader.
    """
    path = Path(path)
    kind = kind or detect_kind(path)
    if kind not in _KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; use one of {', '.join(_KINDS)}")
    if kind == "medmnist" and path.is_dir():
        path = sorted(path.glob("*.npz"))[0] if any(path.glob("*.npz")) else path
    if kind == "rsna" and "labels_csv" not in kwargs:
        found = sorted(path.glob("stage_*_train_labels.csv"))
        if found:
            kwargs["labels_csv"] = found[-1].name
    return _KINDS[kind](path, **kwargs)
