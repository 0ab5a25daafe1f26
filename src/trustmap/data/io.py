"""Read medical images (DICOM, NIfTI, PNG/JPEG, NPY) into arrays a model can take; save maps.

>>> from trustmap.io import load, save_map
>>> ct = load("chest.dcm", window="lung")  # doctest: +SKIP
>>> x = ct.to_tensor()  # (1, 1, H, W), values in [0, 1]
>>> save_map(attributions, "map.nii.gz", like=ct)  # doctest: +SKIP

Axis convention
---------------
Every loader returns ``(H, W)`` for a 2D image, ``(3, H, W)`` for a colour image and
``(D, H, W)`` for a volume, and :attr:`LoadedImage.affine` maps indices *of the returned
array*, ``(d, h, w, 1)`` (``(h, w, 0, 1)`` in 2D), to RAS+ world coordinates in mm, the
NIfTI convention.

* DICOM: ``h`` is the row, ``w`` the column of each slice, ``d`` the slice, ordered by
  position along the slice normal (row direction x column direction). World coordinates
  are converted from DICOM's LPS to RAS by negating x and y.
* NIfTI: the stored voxel array ``(i, j, k)`` is returned transposed to ``(k, j, i)``, so
  that ``k`` is the slice axis as for DICOM (``dcm2niix`` maps DICOM columns to ``i``, rows
  to ``j`` and slices to ``k``). The affine's columns are permuted to match, and
  :func:`save_map` transposes back, so ``load(save_map(a, p, like=img))`` returns ``a``
  and ``img.affine``. Images are not reoriented or flipped: what is stored is what you
  get, only the axis order changes.

Values are float32: stored values after the DICOM modality transform (rescale slope and
intercept; Hounsfield units for CT) or NIfTI scaling (``scl_slope``/``scl_inter``), and
raw pixel values for PNG/JPEG (0-255, or 0-65535 for 16-bit PNG). A ``window`` clips and
scales the values to [0, 1].

:attr:`LoadedImage.meta` never holds patient identifiers (name, ID, birth date): maps and
reports built from it can be shared.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmap.core.atomic import atomic_path, save_npy_atomic
from trustmap.errors import DataError, InputError, InputTypeError, MissingFileError

__all__ = ["SUFFIXES", "WINDOW_PRESETS", "LoadedImage", "apply_window", "load", "save_map"]

#: CT display windows as ``(center, width)`` in HU. Values from Radiopaedia, "Windowing (CT)"
#: (https://radiopaedia.org/articles/windowing-ct): lungs W1500/L-600, mediastinum
#: W350/L50, bone W1800/L400, brain W80/L40, soft tissue W400/L50.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 400.0),
}

_NIFTI = (".nii", ".nii.gz")
_PILLOW = (".png", ".jpg", ".jpeg")
_DICOM = (".dcm", ".dicom")
_NUMPY = (".npy",)
#: File suffixes :func:`load` recognises; DICOM files are also recognised by content.
SUFFIXES: tuple[str, ...] = _DICOM + _NIFTI + _PILLOW + _NUMPY
_MAP_SUFFIXES = _NUMPY + _NIFTI
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """An image read from disk, with the geometry needed to put a map back on it.

    Attributes
    ----------
    array:
        float32, ``(H, W)``, ``(D, H, W)``, or ``(3, H, W)`` when ``is_color``.
    spacing:
        Size of a voxel along each spatial axis of ``array``, in mm where the file says
        so (see ``meta["spacing_units"]``); ``(1.0, ...)`` where it does not.
    affine:
        ``(4, 4)`` float64 mapping array indices ``(d, h, w, 1)`` (``(h, w, 0, 1)`` in 2D)
        to RAS+ world mm, or None where the file carries no geometry (PNG, NPY, DICOM
        without ImagePositionPatient).
    modality:
        DICOM Modality (``"CT"``, ``"MR"``, ...) or None.
    source:
        The path the image was read from.
    meta:
        Non-identifying tags: ``units`` (``"HU"`` for rescaled CT), ``window`` (the
        ``(center, width)`` applied, if any), ``window_center``/``window_width`` (the
        file's own), ``photometric_interpretation``, ``inverted``, ``format``, ...
    is_color:
        True for an RGB image, whose first axis holds the three channels.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    modality: str | None = None
    source: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    is_color: bool = False

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes: ``array.shape`` without the colour axis."""
        return tuple(self.array.shape[1:] if self.is_color else self.array.shape)

    def to_tensor(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The image as a model input of shape ``(1, C, *spatial)`` (a new tensor)."""
        x = torch.tensor(self.array, dtype=dtype, device=device)
        return x[None] if self.is_color else x[None, None]


def load(
    path: str | os.PathLike[str],
    *,
    window: str | tuple[float, float] | None = None,
    frame: int | None = None,
) -> LoadedImage:
    """Read a DICOM file or series, a NIfTI, PNG, JPEG or NPY file.

    The format comes from the suffix (``.dcm``, ``.nii``, ``.nii.gz``, ``.png``, ``.jpg``,
    ``.jpeg``, ``.npy``) or, for DICOM, from the ``DICM`` marker at byte 128. A directory
    is read as one DICOM series and stacked into ``(D, H, W)``, sorted by
    ImagePositionPatient along the slice normal (InstanceNumber where positions are
    missing).

    Parameters
    ----------
    path:
        File or directory.
    window:
        None to return the values as stored (after rescaling); a preset name from
        :data:`WINDOW_PRESETS` (CT, in HU); ``"dicom"`` for the file's own
        WindowCenter/WindowWidth; or ``(center, width)``. The windowed image is
        ``clip((v - (center - width / 2)) / width, 0, 1)``.
    frame:
        Index of the frame of a multi-frame DICOM file or of the volume of a 4D NIfTI
        file; the result is then 2D or 3D respectively.

    Returns
    -------
    LoadedImage

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming the file, if it is corrupt, holds no image, has an unsupported type, or
        contains NaN or Inf values.
    """
    source = Path(path)
    if not source.exists():
        raise MissingFileError(f"no such file or directory: {source}")
    if not source.is_dir() and not source.is_file():
        # A FIFO would block forever, /dev/urandom never ends.
        raise DataError(f"{source}: not a regular file or a folder of DICOM files")
    _check_window(window)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
        raise InputError(f"frame must be a non-negative integer, got {frame!r}")

    if source.is_dir():
        image = _load_dicom_series(source, frame)
    else:
        kind = _sniff(source)
        if kind != "dicom" and window == "dicom":
            raise DataError(f"{source}: window='dicom' needs a DICOM file, this is {kind}")
        if kind != "dicom" and kind != "nifti" and frame is not None:
            raise DataError(
                f"{source}: frame= applies to multi-frame DICOM and 4D NIfTI files only"
            )
        loader = {
            "dicom": _load_dicom_file,
            "nifti": _load_nifti,
            "pillow": _load_pillow,
            "numpy": _load_npy,
        }[kind]
        image = loader(source, frame)
    _check_image(image, source)
    if window is None:
        return image
    center, width = _resolve_window(window, image)
    meta = {
        **image.meta,
        "window": (center, width),
        "source_units": image.meta.get("units"),
        "units": "window fraction [0, 1]",
    }
    return LoadedImage(
        array=apply_window(image.array, center, width),
        spacing=image.spacing,
        affine=image.affine,
        modality=image.modality,
        source=image.source,
        meta=meta,
        is_color=image.is_color,
    )


def apply_window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map ``[center - width/2, center + width/2]`` linearly onto [0, 1], clipping outside.

    This is the plain linear window; DICOM PS3.3 C.11.2.1.2's variant shifts the edges
    by half a unit (``center - 0.5``, ``width - 1``), which matters only for integer
    display levels.
    """
    if not width > 0:
        raise InputError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    out = (np.asarray(array, dtype=np.float64) - low) / width
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def save_map(
    array_or_tensor: np.ndarray | torch.Tensor,
    path: str | os.PathLike[str],
    *,
    like: LoadedImage | None = None,
    affine: np.ndarray | None = None,
) -> Path:
    """Save an attribution map as ``.npy`` or NIfTI (``.nii``, ``.nii.gz``), atomically.

    NIfTI maps must be 2D ``(H, W)`` or 3D ``(D, H, W)``; leading axes of size one (batch,
    channel) are dropped, so ``explanation.attributions`` of one single-channel sample
    can be passed as is. The map is written in float32 with the geometry of ``like``
    (its affine, or its spacing on the diagonal when it has none), of ``affine`` (which
    maps ``(d, h, w, 1)`` like :attr:`LoadedImage.affine`), or the identity; see the
    module docstring for the axis convention, which makes ``load`` return exactly the
    saved array. ``.npy`` files hold the array as given.

    Returns
    -------
    Path
        ``path``.
    """
    target = Path(path)
    suffix = _suffix_of(target)
    if suffix not in _MAP_SUFFIXES:
        raise InputError(
            f"cannot save a map as {target.name!r}: unsupported file type {suffix or '(none)'}, "
            f"expected one of {', '.join(_MAP_SUFFIXES)}"
        )
    if like is not None and affine is not None:
        raise InputError("pass either like= or affine=, not both")
    array = _as_numpy(array_or_tensor)
    if suffix in _NUMPY:
        return save_npy_atomic(target, array)

    spatial_ndim = len(like.spatial_shape) if like is not None else 3
    while array.ndim > max(spatial_ndim, 2) and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        raise InputError(
            f"a NIfTI map must be (H, W) or (D, H, W), got shape {array.shape}; "
            "sum over the channel axis or pick one sample first"
        )
    if like is not None and array.shape != like.spatial_shape:
        raise InputError(
            f"map shape {array.shape} does not match the image shape {like.spatial_shape} "
            f"of {like.source}"
        )
    if like is not None:
        matrix = like.affine if like.affine is not None else _diagonal(like.spacing)
    elif affine is not None:
        matrix = affine
    else:
        matrix = np.eye(4)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise InputError(f"affine must be a finite (4, 4) matrix, got {matrix.round(4).tolist()}")

    import nibabel as nib

    stored_affine = _swap_affine_axes(matrix, array.ndim)
    img = nib.Nifti1Image(np.ascontiguousarray(array.T, dtype=np.float32), stored_affine)
    # Both forms, so that viewers reading only the qform agree with nibabel on geometry.
    img.set_qform(stored_affine, code=1)
    img.set_sform(stored_affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(target) as temp:
        nib.save(img, temp)
    return target


# ---------------------------------------------------------------------------------------
# shared helpers


def _suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _sniff(path: Path) -> str:
    suffix = _suffix_of(path)
    if suffix in _NIFTI:
        return "nifti"
    if suffix in _PILLOW:
        return "pillow"
    if suffix in _NUMPY:
        return "numpy"
    if suffix in _DICOM or _has_dicom_preamble(path):
        return "dicom"
    raise DataError(
        f"{path}: unsupported file type {suffix or '(no suffix)'}, expected one of "
        f"{', '.join(SUFFIXES)}, a DICOM file (with 'DICM' at byte 128) or a directory of "
        "DICOM files"
    )


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _as_numpy(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise InputTypeError(f"expected a numeric array or tensor, got dtype {array.dtype}")
    return array


def _to_float32(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: unsupported data type {array.dtype}, expected real numbers")
    return np.asarray(array, dtype=np.float32)


def _check_image(image: LoadedImage, path: Path) -> None:
    """What every loader returns: a non-empty finite array and valid geometry."""
    array = image.array
    spatial = image.spatial_shape
    if array.size == 0 or len(spatial) not in (2, 3) or min(spatial) < 1:
        raise DataError(f"{path}: holds an empty image (shape {tuple(array.shape)})")
    finite = np.isfinite(array)
    if not finite.all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int(array.size - finite.sum()) - n_nan
        problems = [f"{n} {kind} values" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
        raise DataError(f"{path}: contains {' and '.join(problems)}")
    check_geometry(image.spacing, image.affine, len(spatial), path)


def check_geometry(
    spacing: Sequence[float],
    affine: np.ndarray | None,
    ndim: int,
    path: object,
    *,
    spacing_field: str = "spacing",
    affine_field: str = "affine",
) -> None:
    """Raise naming ``path`` and the field unless the geometry is usable.

    ``spacing`` needs one positive finite value per spatial axis; ``affine`` (if any) must
    be a finite ``(4, 4)`` matrix whose columns for the ``ndim`` array axes are linearly
    independent (a singular affine maps two voxels onto one point).
    """
    values = [float(v) for v in spacing]
    if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise DataError(
            f"{path}: {spacing_field} is {tuple(values)}; a voxel size must be a positive "
            f"finite number for each of the {ndim} axes"
        )
    if affine is None:
        return
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise DataError(
            f"{path}: {affine_field} must be a finite (4, 4) matrix, got {matrix.round(4).tolist()}"
        )
    columns = matrix[:3, :ndim]
    # Relative to the columns' own scale: 1e-6 mm voxels are odd, not singular.
    scale = float(np.abs(columns).max())
    if scale == 0 or np.linalg.matrix_rank(columns / scale, tol=1e-9) < ndim:
        raise DataError(
            f"{path}: {affine_field} is singular (its {ndim} voxel axes are not linearly "
            "independent), so voxels cannot be placed in space"
        )


def _check_window(window: object) -> None:
    if window is None:
        return
    if isinstance(window, str):
        if window == "dicom" or window in WINDOW_PRESETS:
            return
        raise InputError(
            f"unknown window {window!r}; use one of {[*WINDOW_PRESETS, 'dicom']} "
            "or a (center, width) tuple"
        )
    if (
        isinstance(window, Sequence)
        and len(window) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in window)
        and all(math.isfinite(v) for v in window)
        and window[1] > 0
    ):
        return
    raise InputError(
        f"window must be a preset name or (center, width) with width > 0, got {window!r}"
    )


def _resolve_window(window: str | tuple[float, float], image: LoadedImage) -> tuple[float, float]:
    if window == "dicom":
        center, width = image.meta.get("window_center"), image.meta.get("window_width")
        if center is None or width is None or not width > 0:
            raise DataError(f"{image.source}: has no WindowCenter/WindowWidth to apply")
        return float(center), float(width)
    if isinstance(window, str):
        return WINDOW_PRESETS[window]
    return float(window[0]), float(window[1])


def _diagonal(spacing: Sequence[float]) -> np.ndarray:
    matrix = np.eye(4)
    for axis, step in enumerate(spacing[:3]):
        matrix[axis, axis] = step
    return matrix


def _swap_affine_axes(matrix: np.ndarray, ndim: int) -> np.ndarray:
    """Reorder the affine's index columns between ``(d, h, w)`` and NIfTI's ``(i, j, k)``.

    Reversing the first ``ndim`` columns is its own inverse, so the same call converts
    in both directions.
    """
    out = np.array(matrix, dtype=np.float64)
    out[:, :ndim] = matrix[:, :ndim][:, ::-1]
    return out


# ---------------------------------------------------------------------------------------
# NumPy and Pillow


def _load_npy(path: Path, frame: int | None) -> LoadedImage:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError or EOFError by cause
        raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
    array = _to_float32(array, path)
    if array.size == 0:
        raise DataError(f"{path}: holds an empty array of shape {array.shape}")
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        raise DataError(
            f"{path}: expected a 2D (H, W) or 3D (D, H, W) array, got shape {array.shape}"
        )
    return LoadedImage(
        array=array,
        spacing=(1.0,) * array.ndim,
        source=path,
        meta={"format": "npy", "spacing_units": "voxel", "units": None},
    )


def _load_pillow(path: Path, frame: int | None) -> LoadedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
                pixels = np.asarray(img)
            elif mode in ("LA", "La"):
                pixels = np.asarray(img.getchannel("L"))
            else:  # palette, RGBA, CMYK, YCbCr, ...: as displayed, without transparency
                pixels = np.moveaxis(np.asarray(img.convert("RGB")), -1, 0)
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{path}: refused as a possible decompression bomb: it claims more pixels than "
            f"Pillow's limit of {Image.MAX_IMAGE_PIXELS} ({exc})"
        ) from exc
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        # Pillow reports truncated or garbled files as OSError or SyntaxError.
        raise DataError(f"{path}: not a readable image file ({exc})") from exc
    except Exception as exc:  # Pillow's decoders raise other types on fuzzed data too
        raise DataError(f"{path}: not a readable image file ({type(exc).__name__}: {exc})") from exc
    array = _to_float32(pixels, path)
    is_color = array.ndim == 3
    return LoadedImage(
        array=array,
        spacing=(1.0, 1.0),
        source=path,
        meta={"format": path.suffix.lower().lstrip("."), "mode": mode, "spacing_units": "pixel"},
        is_color=is_color,
    )


# ---------------------------------------------------------------------------------------
# NIfTI


def _load_nifti(path: Path, frame: int | None) -> LoadedImage:
    import nibabel as nib

    try:
        # nibabel "fixes" a zero voxel size to 1 with a message on stderr; we refuse it.
        with _quiet_nibabel():
            img = nib.load(path)
        if 0 in img.shape:
            raise DataError(f"{path}: holds an empty image, its dimensions are {img.shape}")
        _check_nifti_pixdim(path, type(img.header), len(img.shape))
        data = np.asarray(img.dataobj)
    except DataError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib each raise their own types
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    zooms = tuple(float(z) for z in img.header.get_zooms())
    # The spatial unit code is the low 3 bits of xyzt_units (the time code, which we do
    # not use and nibabel's get_xyzt_units chokes on when unknown, is above them).
    code = int(img.header["xyzt_units"]) & 0x07
    spatial_units = _NIFTI_UNITS.get(code)
    if spatial_units is None:
        raise DataError(
            f"{path}: xyzt_units holds the unknown spatial unit code {code} (NIfTI knows 0 "
            "unknown, 1 m, 2 mm, 3 um)"
        )
    # Trailing axes of size one (e.g. (X, Y, Z, 1)) carry nothing.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        if frame is None:
            raise DataError(
                f"{path}: is 4D with {data.shape[3]} volumes; pick one with frame=0..."
                f"{data.shape[3] - 1}"
            )
        if frame >= data.shape[3]:
            raise DataError(f"{path}: frame {frame} out of range, it has {data.shape[3]} volumes")
        data = data[..., frame]
    elif frame is not None:
        raise DataError(f"{path}: frame= needs a 4D NIfTI file, this one is {data.ndim}D")
    if data.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D or 3D image, got shape {data.shape}")
    array = np.ascontiguousarray(_to_float32(data, path).T)
    spacing = zooms[: data.ndim][::-1]
    affine = np.asarray(img.affine, dtype=np.float64)
    check_geometry(
        spacing[::-1],
        affine,
        data.ndim,
        path,
        spacing_field=f"pixdim[1:{data.ndim + 1}] (the voxel size)",
        affine_field=_nifti_affine_field(img.header),
    )
    return LoadedImage(
        array=array,
        spacing=spacing,
        affine=_swap_affine_axes(affine, data.ndim),
        source=path,
        meta={
            "format": "nifti",
            "spacing_units": spatial_units,
            "units": None,
            "stored_shape": tuple(int(n) for n in data.shape),
            "frame": frame,
        },
    )


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-fix messages for the block (its own suppressor loses the
    logger's handler for good)."""
    from nibabel.imageglobals import logger

    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


#: NIfTI-1 spatial unit codes, with nibabel's names for them.
_NIFTI_UNITS = {0: "unknown", 1: "meter", 2: "mm", 3: "micron"}


def _check_nifti_pixdim(path: Path, header_class: Any, ndim: int) -> None:
    """The stored voxel size must be finite and non-zero (nibabel would make a zero 1)."""
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as handle:
        header = header_class.from_fileobj(handle, check=False)
    axes = min(ndim, 3)
    pixdim = np.asarray(header["pixdim"][1 : axes + 1], dtype=np.float64)
    if not (np.isfinite(pixdim).all() and (pixdim != 0).all()):
        raise DataError(
            f"{path}: pixdim[1:{axes + 1}] (the voxel size) is {tuple(pixdim.tolist())}; a "
            "voxel size must be a non-zero finite number"
        )


def _nifti_affine_field(header: Any) -> str:
    """Which header fields nibabel built the affine from (as it chooses: sform first)."""
    try:
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    except (KeyError, TypeError, ValueError):
        return "the affine"
    if sform_code > 0:
        return "the sform affine (srow_x, srow_y, srow_z)"
    if qform_code > 0:
        return "the qform affine (quatern_b/c/d, qoffset_x/y/z, pixdim)"
    return "the affine from pixdim"


# ---------------------------------------------------------------------------------------
# DICOM


def _read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Any:
    """Read one DICOM file, also raw datasets without the preamble and file meta."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forced reads of noise warn on every element
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
                forced = False
            except InvalidDicomError:
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
                forced = True
    except Exception as exc:  # pydicom raises many types on garbage input
        raise DataError(
            f"{path}: not a valid DICOM file, it is corrupt or truncated ({exc})"
        ) from exc
    if forced and "SOPClassUID" not in ds and not _has_pixels(ds):
        # force=True reads almost any bytes as some dataset; without an SOP class or
        # pixels the "dataset" is noise.
        raise DataError(f"{path}: not a valid DICOM file, it is corrupt or truncated")
    if "TransferSyntaxUID" not in ds.file_meta:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        # A raw dataset (no file meta): the encoding it was read with is its syntax.
        implicit = getattr(ds, "original_encoding", (True, True))[0]
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    return ds


def _has_pixels(ds: Any) -> bool:
    return any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _sop_name(ds: Any) -> str:
    """The SOP class's name; a corrupt SOPClassUID (another VR, bytes) counts as unknown."""
    try:
        uid = ds.get("SOPClassUID")
        return str(uid.name) if uid is not None else "unknown SOP class"
    except Exception:  # pydicom raises AttributeError, NotImplementedError, ... here
        return "unknown SOP class"


def _tag_name(keyword: str) -> str:
    """``"RescaleSlope (0028,1053)"``: the keyword and its tag, for error messages."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _source(ds: Any) -> str:
    return str(getattr(ds, "filename", None) or "the DICOM file")


def _value(ds: Any, keyword: str, index: int = 0, sequence: str | None = None) -> Any:
    """An element's value (see :func:`_attr`); a corrupt element raises naming the tag."""
    try:
        return _attr(ds, keyword, index, sequence)
    except Exception as exc:  # a wrong VR, undecodable bytes: pydicom's types vary
        raise DataError(
            f"{_source(ds)}: tag {_tag_name(keyword)} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def _numbers(ds: Any, keyword: str, index: int = 0, sequence: str | None = None) -> list | None:
    """A numeric element as a list of finite floats (None when absent or empty)."""
    value = _value(ds, keyword, index, sequence)
    if value is None or (isinstance(value, str | bytes) and not value.strip()):
        return None
    items = (
        list(value)
        if isinstance(value, Sequence) and not isinstance(value, str | bytes)
        else [value]
    )
    if not items:
        return None
    out = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError, OverflowError):
            raise DataError(
                f"{_source(ds)}: tag {_tag_name(keyword)} is {_shown(value)}, not a number"
            ) from None
        if not math.isfinite(number):
            raise DataError(
                f"{_source(ds)}: tag {_tag_name(keyword)} is {_shown(value)}, not a finite number"
            )
        out.append(number)
    return out


def _number(
    ds: Any, keyword: str, index: int = 0, sequence: str | None = None, *, count: int = 1
) -> Any:
    """A numeric element with ``count`` values: a float (count 1), an array, or None."""
    values = _numbers(ds, keyword, index, sequence)
    if values is None:
        return None
    if count == 1:
        return values[0]  # WindowCenter may hold several; the first is the default
    if len(values) != count:
        raise DataError(
            f"{_source(ds)}: tag {_tag_name(keyword)} has {len(values)} values "
            f"({_shown(values)}), expected {count}"
        )
    return np.asarray(values, dtype=np.float64)


def _integer(ds: Any, keyword: str, default: int) -> int:
    """An integer element (Rows, BitsStored, NumberOfFrames, ...), ``default`` if absent."""
    value = _number(ds, keyword)
    if value is None:
        return default
    if value != int(value) or abs(value) > 2**31:
        raise DataError(
            f"{_source(ds)}: tag {_tag_name(keyword)} is {_shown(value)}, not an integer"
        )
    return int(value)


def _text(ds: Any, keyword: str, default: str = "") -> str:
    value = _value(ds, keyword)
    return default if value is None else str(value).strip()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require_pixels(ds: Any, path: Path) -> None:
    if _has_pixels(ds):
        return
    name = _sop_name(ds)
    if "Image" in name:
        # An image SOP class must carry pixels; a file cut short loses them first.
        raise DataError(
            f"{path}: has no pixel data although it is a {name} object; the file is "
            "probably truncated or corrupt"
        )
    raise DataError(f"{path}: has no pixel data ({name}); it is not an image")


def _pixels(ds: Any, path: Path) -> np.ndarray:
    _require_pixels(ds, path)
    _check_jpeg2000(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about fixable tag quirks
            return ds.pixel_array
    except Exception as exc:  # pydicom and its decoders raise many types on bad data
        raise DataError(
            f"{path}: cannot decode the pixel data ({_syntax_name(ds)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


#: The JP2 file signature box (ISO/IEC 15444-1 Annex I.5.1) and the contiguous codestream
#: box type.
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JP2C = b"jp2c"


def _check_jpeg2000(ds: Any, path: Path) -> None:
    """Refuse JPEG 2000 frames whose JP2 header pydicom cannot walk.

    pydicom 3.0 looks for the codestream by adding each box's length to its offset
    (``pydicom.pixels.utils.get_j2k_parameters``); a box of length 0 other than the
    codestream itself (legal only for the last box) never moves it on, and the read never
    ends. Such a frame is reported instead, naming the file, frame and byte.
    """
    from pydicom.uid import JPEG2000TransferSyntaxes

    if ds.file_meta.get("TransferSyntaxUID") not in JPEG2000TransferSyntaxes:
        return
    from pydicom.encaps import generate_frames

    n_frames = _integer(ds, "NumberOfFrames", 1) or 1
    try:
        for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames)):
            if not frame.startswith(_JP2_SIGNATURE[:8]):
                continue
            offset = 12
            while offset < len(frame):
                length = int.from_bytes(frame[offset : offset + 4], byteorder="big")
                if frame[offset + 4 : offset + 8] == _JP2C:
                    break
                if length == 0:
                    raise DataError(
                        f"{path}: frame {k}: the JPEG 2000 box at byte {offset} has length "
                        "0 but is not the last (codestream) box; the pixel data is corrupt"
                    )
                offset += length
    except DataError:
        raise
    except Exception as exc:  # pydicom's fragment parser on corrupt item tags or offsets
        raise DataError(
            f"{path}: the encapsulated pixel data cannot be split into frames "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _frame_item(ds: Any, index: int, sequence: str) -> Any:
    """The item of a functional group macro for one frame (per-frame first, then shared)."""
    for groups, item_index in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        seq = ds.get(groups)
        if seq is not None and len(seq) > item_index:
            inner = seq[item_index].get(sequence)
            if inner:
                return inner[0]
    return None


def _attr(ds: Any, keyword: str, index: int = 0, sequence: str | None = None) -> Any:
    """A value from the dataset, or from the enhanced multi-frame functional groups."""
    value = ds.get(keyword)
    if value is None and sequence is not None:
        item = _frame_item(ds, index, sequence)
        value = item.get(keyword) if item is not None else None
    return value


def _rescale(ds: Any, index: int) -> tuple[float, float, bool]:
    seq = "PixelValueTransformationSequence"
    slope = _number(ds, "RescaleSlope", index, seq)
    intercept = _number(ds, "RescaleIntercept", index, seq)
    present = slope is not None or intercept is not None
    if slope == 0:
        raise DataError(f"{_source(ds)}: tag {_tag_name('RescaleSlope')} is 0")
    return (
        slope if slope is not None else 1.0,
        intercept if intercept is not None else 0.0,
        present,
    )


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = _integer(ds, "BitsStored", _integer(ds, "BitsAllocated", 16))
    if not 1 <= bits <= 64:
        raise DataError(f"{_source(ds)}: tag {_tag_name('BitsStored')} is {bits}, not 1...64")
    if _integer(ds, "PixelRepresentation", 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _photometric(ds: Any) -> str:
    return _text(ds, "PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2"


def _is_colour(ds: Any) -> bool:
    return _integer(ds, "SamplesPerPixel", 1) == 3 or _photometric(ds) == "PALETTE COLOR"


def _modality_transform(
    pixels: np.ndarray, ds: Any, index: int, path: Path
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rescale one frame, invert MONOCHROME1, and return it with its display tags."""
    slope, intercept, present = _rescale(ds, index)
    values = pixels.astype(np.float64) * slope + intercept
    seq = "FrameVOILUTSequence"
    center = _number(ds, "WindowCenter", index, seq)
    width = _number(ds, "WindowWidth", index, seq)
    photometric = _photometric(ds)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        # MONOCHROME1 shows low values bright. Reflect the values within the range the
        # stored bits can represent (after rescaling), so that bright means dense as for
        # MONOCHROME2, and reflect the file's window with them: window(v') = 1 - window(v).
        low, high = sorted(v * slope + intercept for v in _stored_range(ds))
        values = (low + high) - values
        if center is not None:
            center = (low + high) - center
    modality = _text(ds, "Modality")
    scaling = _number(ds, "DoseGridScaling")
    if scaling is not None:
        # RT Dose stores dose / DoseGridScaling as integers.
        values = values * scaling
    if scaling is not None and _text(ds, "DoseUnits"):
        units = _text(ds, "DoseUnits")
    elif present and modality == "CT":
        units = "HU"
    elif present and _text(ds, "RescaleType"):
        units = _text(ds, "RescaleType")
    elif modality == "PT" and _text(ds, "Units"):
        units = _text(ds, "Units")
    else:
        units = None
    meta = {
        "rescale_slope": slope,
        "rescale_intercept": intercept,
        "units": units,
        "window_center": center,
        "window_width": width,
        "photometric_interpretation": photometric,
        "inverted": inverted,
    }
    return values.astype(np.float32), meta


def _geometry(ds: Any, index: int) -> tuple[np.ndarray | None, np.ndarray | None, tuple]:
    """Orientation (6,), position (3,) and pixel spacing (row, column) of one frame.

    Raises naming the tag for a spacing that is not positive, or direction cosines that
    are not two non-parallel vectors.
    """
    orientation = _number(ds, "ImageOrientationPatient", index, "PlaneOrientationSequence", count=6)
    position = _number(ds, "ImagePositionPatient", index, "PlanePositionSequence", count=3)
    keyword = "PixelSpacing"
    spacing = _number(ds, keyword, index, "PixelMeasuresSequence", count=2)
    if spacing is None:
        keyword = "ImagerPixelSpacing"
        spacing = _number(ds, keyword, count=2)
    if spacing is not None and not (spacing > 0).all():
        raise DataError(
            f"{_source(ds)}: tag {_tag_name(keyword)} is {_shown(spacing.tolist())}; pixel "
            "spacing must be positive"
        )
    if orientation is not None:
        row, col = orientation[:3], orientation[3:]
        normal = np.cross(row, col)
        if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-6 or np.linalg.norm(normal) < 1e-6:
            raise DataError(
                f"{_source(ds)}: tag {_tag_name('ImageOrientationPatient')} is "
                f"{_shown(orientation.tolist())}; it must hold two non-parallel direction "
                "vectors"
            )
    pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None else None
    return orientation, position, pixel_spacing


def _slice_step(ds: Any, index: int = 0) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _number(ds, keyword, index, "PixelMeasuresSequence")
        if value is not None and value > 0:
            return value
    return None


def _affine(
    orientation: np.ndarray, origin: np.ndarray, pixel_spacing: tuple, step: np.ndarray
) -> np.ndarray:
    """RAS affine for index ``(slice, row, column)``; ``step`` is the slice offset in LPS."""
    row_dir, col_dir = orientation[:3], orientation[3:]
    matrix = np.eye(4)
    matrix[:3, 0] = step
    # A row index moves down a column, i.e. along the column direction cosines, by the
    # row spacing PixelSpacing[0]; a column index moves along the row direction.
    matrix[:3, 1] = col_dir * pixel_spacing[0]
    matrix[:3, 2] = row_dir * pixel_spacing[1]
    matrix[:3, 3] = origin
    return _LPS_TO_RAS @ matrix


def _ds_meta(ds: Any, path: Path) -> dict[str, Any]:
    return {
        "format": "dicom",
        "sop_class": _sop_name(ds),
        "transfer_syntax": _syntax_name(ds),
        "series_description": _text(ds, "SeriesDescription") or None,
        "bits_stored": _integer(ds, "BitsStored", 0) or None,
    }


def _syntax_name(ds: Any) -> str:
    try:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        return str(syntax.name) if syntax is not None else "unknown transfer syntax"
    except Exception:  # a corrupt UID in the file meta
        return "unknown transfer syntax"


def _to_2d_image(
    pixels: np.ndarray, ds: Any, index: int, path: Path
) -> tuple[np.ndarray, dict[str, Any], bool]:
    """One frame: colour frames become (3, H, W); grey ones get the modality transform."""
    samples = _integer(ds, "SamplesPerPixel", 1)
    if samples == 1 and _photometric(ds) == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
        samples = 3
    if samples == 3:
        return np.moveaxis(pixels, -1, 0).astype(np.float32), {"units": None}, True
    if samples != 1:
        raise DataError(f"{path}: {samples} samples per pixel are not supported")
    values, meta = _modality_transform(pixels, ds, index, path)
    return values, meta, False


def _load_dicom_file(path: Path, frame: int | None) -> LoadedImage:
    ds = _read_dataset(path)
    pixels = _pixels(ds, path)
    n_frames = _integer(ds, "NumberOfFrames", 1) or 1
    meta = _ds_meta(ds, path)
    meta["n_frames"] = n_frames
    if n_frames == 1:
        if frame is not None:
            raise DataError(f"{path}: frame={frame} given but the file has a single frame")
        indices = [0]
        pixels = pixels[None]
    elif frame is not None:
        if frame >= n_frames:
            raise DataError(f"{path}: frame {frame} out of range, the file has {n_frames}")
        indices = [frame]
        pixels = pixels[frame][None]
    else:
        if _is_colour(ds):
            raise DataError(
                f"{path}: a colour multi-frame file cannot be one array; pick a frame with "
                f"frame=0...{n_frames - 1}"
            )
        indices = list(range(n_frames))
    meta["frame"] = frame

    frames, frame_meta, is_color = [], {}, False
    for k, index in enumerate(indices):
        values, frame_meta_k, is_color = _to_2d_image(pixels[k], ds, index, path)
        frames.append(values)
        frame_meta = frame_meta or frame_meta_k
    meta.update(frame_meta)
    modality = _text(ds, "Modality") or None

    orientation, position, pixel_spacing = _geometry(ds, indices[0])
    meta["spacing_units"] = "mm" if pixel_spacing is not None else "pixel"
    in_plane = pixel_spacing if pixel_spacing is not None else (1.0, 1.0)
    geometry_known = orientation is not None and position is not None
    if len(frames) == 1:
        array = frames[0]
        spacing = in_plane
        normal_step = _slice_step(ds, indices[0]) or 1.0
        affine = None
        if geometry_known and pixel_spacing is not None:
            normal = np.cross(orientation[:3], orientation[3:])
            # (h, w, 0) convention: the third affine column is the slice normal.
            three = _affine(orientation, position, pixel_spacing, normal * normal_step)
            affine = three[:, [1, 2, 0, 3]]
        return LoadedImage(array, tuple(spacing), affine, modality, path, meta, is_color)

    array = np.stack(frames)
    positions = [_geometry(ds, i)[1] for i in indices]
    offsets = _numbers(ds, "GridFrameOffsetVector")
    if geometry_known and offsets is not None and len(offsets) == n_frames:
        # RT Dose: frames share ImagePositionPatient and sit at these offsets along the
        # normal (PS3.3 C.8.8.3.2).
        normal = np.cross(orientation[:3], orientation[3:])
        positions = [position + normal * offsets[i] for i in indices]
    step_vector, slice_spacing = None, _slice_step(ds) or 1.0
    if geometry_known and all(p is not None for p in positions):
        normal = np.cross(orientation[:3], orientation[3:])
        distances = np.array([float(p @ normal) for p in positions])
        gaps = np.diff(distances)
        if len(gaps) and np.all(gaps != 0):
            slice_spacing = float(np.median(np.abs(gaps)))
            step_vector = (positions[-1] - positions[0]) / (len(positions) - 1)
            meta["uniform_spacing"] = bool(np.ptp(gaps) <= 1e-3 * slice_spacing)
    affine = None
    if geometry_known and pixel_spacing is not None:
        if step_vector is None:
            step_vector = np.cross(orientation[:3], orientation[3:]) * slice_spacing
        affine = _affine(orientation, position, pixel_spacing, step_vector)
    spacing = (slice_spacing, *in_plane)
    return LoadedImage(array, spacing, affine, modality, path, meta, False)


def _is_dicom_candidate(path: Path) -> bool:
    return (
        path.is_file()
        and not path.name.startswith(".")
        and (_suffix_of(path) in _DICOM or _has_dicom_preamble(path))
    )


def _load_dicom_series(folder: Path, frame: int | None) -> LoadedImage:
    if frame is not None:
        raise DataError(f"{folder}: frame= applies to a multi-frame DICOM file, not a folder")
    files = sorted(p for p in folder.iterdir() if _is_dicom_candidate(p))
    if not files:
        raise DataError(f"{folder}: contains no DICOM files (.dcm or with the DICM marker)")
    slices, skipped = [], []
    for file in files:
        ds = _read_dataset(file)
        if not _has_pixels(ds):
            # A DICOMDIR or a structured report next to the images is common and harmless.
            if "Image" in _sop_name(ds):
                _require_pixels(ds, file)
            skipped.append(file.name)
            continue
        slices.append((file, ds))
    if not slices:
        raise DataError(f"{folder}: has no pixel data in any of its {len(files)} DICOM files")
    series = {_text(ds, "SeriesInstanceUID") for _, ds in slices}
    if len(series) > 1:
        raise DataError(
            f"{folder}: holds {len(series)} series; put one series per folder or load files "
            "one by one"
        )
    if len(slices) == 1:
        image = _load_dicom_file(slices[0][0], None)
        return LoadedImage(
            image.array,
            image.spacing,
            image.affine,
            image.modality,
            folder,
            {**image.meta, "n_slices": 1, "skipped_files": skipped},
            image.is_color,
        )
    for file, ds in slices:
        if (_integer(ds, "NumberOfFrames", 1) or 1) > 1 or _is_colour(ds):
            raise DataError(
                f"{folder}: {file.name} is multi-frame or colour; a folder must hold "
                "single-frame greyscale slices"
            )
    shapes = {(_integer(ds, "Rows", 0), _integer(ds, "Columns", 0)) for _, ds in slices}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices have different sizes {sorted(shapes)}")

    ordered, spacing_0, step_vector, meta = _order_slices(folder, slices)
    frames, first_meta = [], {}
    for file, ds in ordered:
        values, frame_meta = _modality_transform(_pixels(ds, file), ds, 0, file)
        frames.append(values)
        first_meta = first_meta or frame_meta
    array = np.stack(frames)
    first = ordered[0][1]
    orientation, position, pixel_spacing = _geometry(first, 0)
    in_plane = pixel_spacing if pixel_spacing is not None else (1.0, 1.0)
    affine = None
    if step_vector is not None and pixel_spacing is not None:
        affine = _affine(orientation, position, pixel_spacing, step_vector)
    meta = {
        **_ds_meta(first, folder),
        **first_meta,
        **meta,
        "n_slices": len(ordered),
        "files": [file.name for file, _ in ordered],
        "skipped_files": skipped,
        "spacing_units": "mm" if pixel_spacing is not None else "pixel",
    }
    modality = _text(first, "Modality") or None
    return LoadedImage(array, (spacing_0, *in_plane), affine, modality, folder, meta, False)


def _order_slices(
    folder: Path, slices: list[tuple[Path, Any]]
) -> tuple[list[tuple[Path, Any]], float, np.ndarray | None, dict[str, Any]]:
    """Sort slices along the normal; return them, the slice spacing, step vector and notes."""
    geometry = [_geometry(ds, 0) for _, ds in slices]
    if all(o is not None and p is not None for o, p, _ in geometry):
        orientation = geometry[0][0]
        if any(not np.allclose(o, orientation, atol=1e-4) for o, _, _ in geometry):
            raise DataError(f"{folder}: slices have different ImageOrientationPatient")
        normal = np.cross(orientation[:3], orientation[3:])
        distances = np.array([float(p @ normal) for _, p, _ in geometry])
        order = np.argsort(distances, kind="stable")
        gaps = np.diff(distances[order])
        if np.any(np.abs(gaps) < 1e-4):
            raise DataError(
                f"{folder}: two slices share a position along the normal; the folder may "
                "mix acquisitions (echoes, time points)"
            )
        ordered = [slices[i] for i in order]
        positions = [geometry[i][1] for i in order]
        spacing = float(np.median(gaps))
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        notes = {
            "slice_order": "ImagePositionPatient",
            "uniform_spacing": bool(np.ptp(gaps) <= 1e-3 * spacing),
        }
        return ordered, spacing, step, notes
    numbers = [_number(ds, "InstanceNumber") for _, ds in slices]
    if all(n is not None for n in numbers) and len(set(numbers)) == len(numbers):
        order = np.argsort(numbers, kind="stable")
        ordered = [slices[i] for i in order]
        notes = {"slice_order": "InstanceNumber"}
    else:
        ordered = list(slices)
        notes = {"slice_order": "file name"}
    spacing = _slice_step(ordered[0][1]) or 1.0
    return ordered, spacing, None, notes
