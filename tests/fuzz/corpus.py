"""Seed corpora for the fuzz targets: pydicom's bundled test files and files written by
trustmap's own writers (``save_map``, the phantom writer's PNGs, ``rle_encode``), all made
on the fly and deterministic, so nothing is downloaded and nothing large is committed."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from tests.fuzz.targets import _workdir, npz_bytes

#: pydicom's bundled files larger than this are left out (the fuzzer mutates small inputs
#: faster; the large ones add compressed transfer syntaxes, which smaller files also have).
MAX_DICOM_BYTES = 64 * 1024


def _pydicom_files() -> list[bytes]:
    import pydicom.data

    # The package folder itself: pydicom's get_testdata_files() would try to download.
    folder = Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(p for p in folder.rglob("*.dcm") if p.stat().st_size <= MAX_DICOM_BYTES)
    return [p.read_bytes() for p in files]


def _saved_map(array: np.ndarray, suffix: str, affine: np.ndarray | None = None) -> bytes:
    from trustmap.io import save_map

    path = _workdir() / f"seed{suffix}"
    save_map(array, path, affine=affine) if suffix != ".npy" else save_map(array, path)
    data = path.read_bytes()
    path.unlink()
    return data


def _image_bytes(array: np.ndarray, fmt: str, **options: object) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.random((8, 8), dtype=np.float32),
        rng.random((4, 6, 5), dtype=np.float32),
        np.arange(12, dtype=np.float32).reshape(3, 4),
    ]


@functools.cache
def seeds(target: str) -> tuple[bytes, ...]:
    """The seed inputs of ``target`` (see :data:`tests.fuzz.targets.TARGETS`)."""
    rng = np.random.default_rng(0)
    if target == "load_dicom":
        return tuple(_pydicom_files())
    if target in ("load_nifti", "load_nifti_gz"):
        suffix = ".nii" if target == "load_nifti" else ".nii.gz"
        affine = np.array([[0, 0, 2.0, 10], [0, 1.5, 0, -3], [1.0, 0, 0, 4], [0, 0, 0, 1]])
        return tuple(_saved_map(a, suffix, affine if a.ndim == 3 else None) for a in _arrays())
    if target == "load_npy":
        out = [_saved_map(a, ".npy") for a in _arrays()]
        out.append(_saved_map(np.arange(16, dtype=np.uint8).reshape(4, 4), ".npy"))
        return tuple(out)
    if target in ("load_png", "load_jpeg"):
        fmt = "PNG" if target == "load_png" else "JPEG"
        grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
        colour = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
        out = [_image_bytes(grey, fmt), _image_bytes(colour, fmt)]
        if fmt == "PNG":
            out.append(_image_bytes(rng.integers(0, 65535, (5, 5), dtype=np.uint16), fmt))
            out.append(_image_bytes(np.dstack([colour, colour[..., :1]]), fmt))  # RGBA
        else:
            out.append(_image_bytes(grey, fmt, progressive=True, quality=50))
        return tuple(out)
    if target == "rle":
        from trustmap.data.labels import rle_encode

        out = []
        for height, width in ((8, 8), (5, 12), (16, 3)):
            mask = rng.random((height, width)) > 0.6
            for relative in (True, False):
                text = rle_encode(mask, relative=relative)
                out.append(bytes([height - 1, width - 1]) + text.encode())
        out.append(b"\x07\x07-1")
        return tuple(out)
    if target == "rsna":
        return (
            b"patientId,x,y,width,height,Target\npa,2.0,3.0,5.0,4.0,1\npb,,,,,0\n"
            b"pa,10,12,20,20,1\npc,0,0,1,1,1\n",
            b"patientId,x,y,width,height,Target\r\nq,,,,,0\r\n",
        )
    if target == "medmnist":
        images = rng.integers(0, 256, (3, 6, 6), dtype=np.uint8)
        labels = np.array([[0], [1], [0]])
        return (
            npz_bytes(train_images=images, train_labels=labels),
            npz_bytes(
                train_images=rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8),
                train_labels=np.array([[1], [2]]),
                test_images=rng.integers(0, 256, (1, 5, 5, 3), dtype=np.uint8),
                test_labels=np.array([[0]]),
            ),
            npz_bytes(train_images=rng.random((2, 4, 4, 4)), train_labels=np.array([0, 1])),
        )
    if target == "trust_config":
        return (
            b'preset = "quick"\ndataset = "cxr-pneumothorax"\nsize = 32\nn_images = 4\n'
            b'methods = ["gradient", "grad_cam"]\n[models.A]\narch = "small_cnn"\n'
            b"seeds = [0, 1]\n[method_params.integrated_gradients]\nn_steps = 8\n",
            b'dataset = "cxr-pneumothorax"\n[randomization]\nindependent = false\nn_pairs = 5\n'
            b"[faithfulness]\nenabled = false\n",
            b'preset = "default"\nmethods = ["gradient"]\n[training]\nepochs = 2\n',
        )
    raise KeyError(f"no seeds for target {target!r}")
