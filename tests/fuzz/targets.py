"""Fuzz targets and their oracle (issue 19).

Every target takes raw bytes, turns them into the input of one reader (a file with the
right suffix, a run-length string, a labels CSV, a MedMNIST archive, a trust config) and
checks the oracle:

* the reader returns a valid result: a non-empty, finite float32 array of a 2D or 3D image
  (``(3, H, W)`` for colour) with one positive finite voxel size per axis and, if any, a
  finite affine whose voxel axes are linearly independent (a mask of the right shape and
  type for run-lengths and boxes; samples of the declared shape for MedMNIST); or
* it raises one of trustmap's documented errors (:class:`trustmap.errors.TrustmapError`)
  whose message names the file (file readers) or the config file (configs);
* within :data:`HANG_SECONDS`.

A violation raises :class:`Finding` (``kind`` is ``"crash"``: another exception type,
``"unnamed"``: a documented error that does not name the file, ``"invalid"``: a silently
invalid result, or ``"hang"``). The same targets serve the seeded short run in the test
suite (hypothesis) and the long coverage-guided runs of ``make fuzz`` (atheris).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

#: An input that takes longer than this is a hang.
HANG_SECONDS = 5


class Finding(Exception):
    """An input that breaks the oracle."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no reader's ``except Exception``
    swallows it."""


_WARMING = False


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    if _WARMING:  # first imports (torch, MONAI) may take longer; an alarm there breaks them
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise _Hang

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_WORKDIR: Path | None = None


def _workdir() -> Path:
    """A private folder for the files the targets write (in memory where possible)."""
    global _WORKDIR
    if _WORKDIR is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _WORKDIR = Path(tempfile.mkdtemp(prefix="trustmap-fuzz-", dir=base))
    return _WORKDIR


def _check(call: Callable[[], object], *, names: str | None) -> object:
    """Run ``call`` under the deadline; map its outcome onto the oracle."""
    from trustmap.errors import TrustmapError

    try:
        with _deadline(HANG_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call()
    except _Hang:
        raise Finding("hang", f"no answer within {HANG_SECONDS} s") from None
    except TrustmapError as err:
        if names is not None and names not in str(err):
            raise Finding("unnamed", f"{type(err).__name__} without {names!r}: {err}") from err
        return err
    except Finding:
        raise
    except Exception as err:
        raise Finding("crash", f"{type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------
# trustmap.io.load on every format


def check_image(image: object, where: str) -> None:
    """The oracle for a loaded image (see the module docstring)."""
    from trustmap.data.io import LoadedImage

    if not isinstance(image, LoadedImage):
        raise Finding("invalid", f"{where}: load returned {type(image).__name__}")
    array = image.array
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise Finding("invalid", f"{where}: array of type {getattr(array, 'dtype', type(array))}")
    spatial = array.shape[1:] if image.is_color else array.shape
    if image.is_color and (array.ndim != 3 or array.shape[0] != 3):
        raise Finding("invalid", f"{where}: colour image of shape {array.shape}")
    if len(spatial) not in (2, 3) or array.size == 0 or min(spatial) < 1:
        raise Finding("invalid", f"{where}: image of shape {array.shape}")
    if not np.isfinite(array).all():
        raise Finding("invalid", f"{where}: NaN or Inf in the array")
    spacing = [float(s) for s in image.spacing]
    if len(spacing) != len(spatial) or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise Finding("invalid", f"{where}: spacing {image.spacing} for shape {array.shape}")
    if image.affine is not None:
        affine = np.asarray(image.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise Finding("invalid", f"{where}: affine {affine.tolist()}")
        columns = affine[:3, : len(spatial)]
        scale = float(np.abs(columns).max())
        if scale == 0 or np.linalg.matrix_rank(columns / scale, tol=1e-9) < len(spatial):
            raise Finding("invalid", f"{where}: singular affine {affine.tolist()}")


def _load_target(suffix: str) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        from trustmap.io import load

        path = _workdir() / f"input{suffix}"
        path.write_bytes(data)
        try:
            result = _check(lambda: load(path), names=path.name)
            if not isinstance(result, Exception):
                check_image(result, path.name)
        finally:
            path.unlink(missing_ok=True)

    target.__name__ = f"load{suffix.replace('.', '_')}"
    return target


# ---------------------------------------------------------------------------------------
# Labels: run-length strings, RSNA boxes


def rle(data: bytes) -> None:
    """``rle_decode`` on a fuzzed string and image size (the first two bytes)."""
    from trustmap.data.labels import rle_decode

    height, width = (data[0] % 64) + 1 if data else 8, (data[1] % 64) + 1 if len(data) > 1 else 8
    text = data[2:].decode("utf-8", errors="replace")
    for relative in (True, False):
        mask = _check(lambda r=relative: rle_decode(text, height, width, relative=r), names=None)
        if isinstance(mask, Exception):
            continue
        if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape != (height, width):
            raise Finding("invalid", f"rle_decode gave {getattr(mask, 'shape', mask)}")


def rsna(data: bytes) -> None:
    """``parse_rsna`` on a fuzzed labels CSV, then the masks of its boxes."""
    from trustmap.data.labels import boxes_to_mask, parse_rsna

    path = _workdir() / "stage_2_train_labels.csv"
    path.write_bytes(data)
    try:
        patients = _check(lambda: parse_rsna(path), names=path.name)
        if isinstance(patients, Exception):
            return
        for patient in list(patients.values())[:16]:
            if patient.target == 1 and not patient.boxes:
                raise Finding("invalid", "a positive patient without boxes")
            mask = _check(lambda p=patient: boxes_to_mask(p.boxes, 32, 32), names=None)
            if not isinstance(mask, Exception) and mask.shape != (32, 32):
                raise Finding("invalid", f"mask of shape {mask.shape}")
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# MedMNIST archives


def medmnist(data: bytes) -> None:
    """A fuzzed ``.npz`` opened as a MedMNIST dataset; its first samples loaded."""
    import torch

    from trustmap.data.loaders import MedMNISTDataset

    path = _workdir() / "fuzz.npz"
    path.write_bytes(data)
    try:
        ds = _check(lambda: MedMNISTDataset(path), names=path.name)
        if isinstance(ds, Exception):
            return
        for index in range(min(len(ds), 4)):
            sample = _check(lambda i=index: ds[i], names=path.name)
            if isinstance(sample, Exception):
                continue
            image = sample.image
            shape_ok = image.ndim == ds.spatial_dims + 1 and image.shape[0] == ds.in_channels
            if not (image.dtype == torch.float32 and shape_ok and image.numel() > 0):
                raise Finding("invalid", f"sample {index}: {tuple(image.shape)} {image.dtype}")
            if not torch.isfinite(image).all():
                raise Finding("invalid", f"sample {index}: NaN or Inf")
            if not 0 <= sample.label < len(ds.classes):
                raise Finding("invalid", f"sample {index}: label {sample.label}")
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Trust configs


def trust_config(data: bytes) -> None:
    """A fuzzed TOML file read by ``load_config`` (which checks it, and starts no work)."""
    from trustmap.trust.config import TrustConfig, load_config

    path = _workdir() / "study.toml"
    path.write_bytes(data)
    try:
        cfg = _check(lambda: load_config(path), names=path.name)
        if not isinstance(cfg, Exception) and not isinstance(cfg, TrustConfig):
            raise Finding("invalid", f"load_config returned {type(cfg).__name__}")
    finally:
        path.unlink(missing_ok=True)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "load_dicom": _load_target(".dcm"),
    "load_nifti": _load_target(".nii"),
    "load_nifti_gz": _load_target(".nii.gz"),
    "load_png": _load_target(".png"),
    "load_jpeg": _load_target(".jpg"),
    "load_npy": _load_target(".npy"),
    "rle": rle,
    "rsna": rsna,
    "medmnist": medmnist,
    "trust_config": trust_config,
}


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def warm_up(name: str, seeds: tuple[bytes, ...]) -> None:
    """Run ``name`` on its seeds without the deadline: the first calls import torch,
    pydicom's decoders and MONAI, which must not be cut short by the hang alarm."""
    global _WARMING
    _WARMING = True
    try:
        for data in seeds:
            with contextlib.suppress(Finding):
                TARGETS[name](data)
    finally:
        _WARMING = False
