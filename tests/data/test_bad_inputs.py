"""Bad files and labels: one documented error naming the file (and row, tag or field),
never a hang, a silent wrong result or an undocumented exception (issue 19)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR

from tests.data.test_loaders import make_folder, make_rsna, make_siim
from trustmap.data.datasets import open_dataset
from trustmap.data.labels import boxes_to_mask, rle_decode
from trustmap.data.loaders import MedMNISTDataset
from trustmap.io import load


def documented(exc_info) -> None:
    from trustmap.errors import TrustmapError

    assert isinstance(exc_info.value, TrustmapError), type(exc_info.value)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the defects this guards against blocked forever)."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- DICOM: malformed tags and geometry ---------------------------------------------------


def patched_dicom(tmp_path: Path, name: str, group: int, elem: int, value=None, vr=None):
    """CT_small.dcm with one top-level explicit-VR element's value (or VR) replaced."""
    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    std = dictionary_VR((group << 16) | elem).encode()
    i = raw.find(struct.pack("<HH", group, elem) + std, 132)
    assert i > 0
    length = struct.unpack("<H", raw[i + 6 : i + 8])[0]
    new = raw[i + 8 : i + 8 + length] if value is None else value
    new += b" " * (len(new) % 2)
    raw = raw[: i + 4] + (vr or std) + struct.pack("<H", len(new)) + new + raw[i + 8 + length :]
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize(
    ("group", "elem", "value", "vr", "message"),
    [
        (0x28, 0x1053, b"ab", None, r"RescaleSlope \(0028,1053\) is 'ab', not a number"),
        (0x28, 0x1052, b"x1", None, r"RescaleIntercept \(0028,1052\) is 'x1', not a number"),
        (0x18, 0x88, b"five", None, r"SpacingBetweenSlices \(0018,0088\) is 'five'"),
        (0x20, 0x32, b"a\\b\\c", None, r"ImagePositionPatient \(0020,0032\) is"),
        (0x28, 0x1053, None, b"ZZ", r"RescaleSlope \(0028,1053\) cannot be read"),
    ],
)
def test_malformed_numeric_dicom_tag_names_file_and_tag(tmp_path, group, elem, value, vr, message):
    path = patched_dicom(tmp_path, "bad", group, elem, value, vr)
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert "bad.dcm" in str(info.value)
    documented(info)


@pytest.mark.parametrize(
    ("group", "elem", "value", "message"),
    [
        (0x28, 0x30, b"0\\0", r"PixelSpacing \(0028,0030\) is \[0.0, 0.0\]; pixel spacing"),
        (0x28, 0x30, b"-1\\1", r"PixelSpacing .* must be positive"),
        (0x28, 0x30, b"nan\\1", r"PixelSpacing .* not a finite number"),
        (0x28, 0x30, b"1", r"PixelSpacing .* has 1 values"),
        (0x20, 0x37, b"0\\0\\0\\0\\1\\0", r"ImageOrientationPatient .* non-parallel"),
        (0x20, 0x37, b"1\\0\\0\\1\\0\\0", r"ImageOrientationPatient .* non-parallel"),
        (0x20, 0x32, b"nan\\0\\0", r"ImagePositionPatient .* not a finite number"),
    ],
)
def test_dicom_geometry_is_checked_at_load(tmp_path, group, elem, value, message):
    path = patched_dicom(tmp_path, "geometry", group, elem, value)
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert "geometry.dcm" in str(info.value)
    documented(info)


@pytest.mark.parametrize("vr", [b"US", b"ZZ", b"DS"])
def test_corrupt_sop_class_uid_is_not_an_attribute_error(tmp_path, vr):
    # Another VR for SOPClassUID: the image itself is fine and loads.
    path = patched_dicom(tmp_path, "sop", 0x8, 0x16, None, vr)
    image = load(path)
    assert image.array.shape == (128, 128) and np.isfinite(image.array).all()


def test_unknown_vr_on_an_image_tag_is_a_data_error(tmp_path):
    path = patched_dicom(tmp_path, "rows", 0x28, 0x10, None, b"ZZ")
    with pytest.raises(ValueError, match=r"rows\.dcm") as info:
        load(path)
    documented(info)


# -- NIfTI geometry and empty images --------------------------------------------------------


def nifti(tmp_path: Path, name: str, patches=(), codes=(1, 0), data=None) -> Path:
    """A 4^3 NIfTI-1 file with header floats overwritten at byte offsets."""
    data = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32) if data is None else data
    path = tmp_path / f"{name}.nii"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 1.0, 1.0, 1.0])), path)
    raw = bytearray(path.read_bytes())
    raw[252:256] = struct.pack("<hh", codes[1], codes[0])  # qform_code, sform_code
    for offset, value in patches:
        raw[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    return path


PIXDIM1, SROW_X0 = 80, 280


@pytest.mark.parametrize(
    ("patches", "codes", "message"),
    [
        ([(PIXDIM1, 0.0)], (0, 1), r"pixdim\[1:4\] \(the voxel size\) is \(0.0, 1.0, 1.0\)"),
        ([(PIXDIM1, float("nan"))], (0, 1), r"pixdim\[1:4\] .* is \(nan"),
        ([(PIXDIM1, 0.0)], (1, 0), r"pixdim\[1:4\]"),
        ([(SROW_X0, float("nan"))], (1, 0), r"sform affine .* must be a finite"),
        ([(SROW_X0, 0.0)], (1, 0), r"sform affine .* is singular"),
    ],
)
def test_nifti_geometry_is_checked_at_load(tmp_path, patches, codes, message):
    path = nifti(tmp_path, "geometry", patches, codes)
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert "geometry.nii" in str(info.value)
    documented(info)


def test_nifti_zero_dimension(tmp_path):
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 4), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match=r"empty.nii.gz: holds an empty image") as info:
        load(path)
    documented(info)


def test_npy_of_shape_0_by_64(tmp_path):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0, 64), np.float32))
    with pytest.raises(ValueError, match=r"empty.npy: holds an empty array") as info:
        load(path)
    documented(info)


# -- files that are not regular files -------------------------------------------------------


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(ValueError, match=r"pipe\.dcm: not a regular file") as info:
        load(fifo)
    documented(info)


def test_dev_urandom_is_refused(tmp_path):
    link = tmp_path / "random.npy"
    link.symlink_to("/dev/urandom")
    with deadline(10), pytest.raises(ValueError, match="not a regular file"):
        load(link)
    with deadline(10), pytest.raises(ValueError, match="not a regular file"):
        load("/dev/urandom")


# -- Pillow ---------------------------------------------------------------------------------


def test_png_decompression_bomb_is_a_data_error(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    assert path.stat().st_size < 100
    with pytest.raises(ValueError, match=r"bomb\.png: refused as a possible decompression") as info:
        load(path)
    documented(info)


# -- MedMNIST --------------------------------------------------------------------------------


def medmnist(tmp_path: Path, images: np.ndarray, labels: np.ndarray, name="m.npz") -> Path:
    path = tmp_path / name
    np.savez(path, train_images=images, train_labels=labels)
    return path


@pytest.mark.parametrize(("channels", "expected"), [(1, 1), (3, 3), (4, 3)])
def test_medmnist_channel_last_is_2d(tmp_path, channels, expected):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 12, 10, channels), dtype=np.uint8)
    ds = MedMNISTDataset(medmnist(tmp_path, images, np.arange(5)[:, None] % 2))
    assert ds.spatial_dims == 2 and ds.in_channels == expected
    sample = ds[2]
    assert tuple(sample.image.shape) == (expected, 12, 10)
    want = np.moveaxis(images[2][..., :expected], -1, 0) / 255.0
    np.testing.assert_allclose(sample.image.numpy(), want, atol=1e-6)


def test_medmnist_grey_volume_with_a_channel_axis(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 6, 7, 8, 1), dtype=np.uint8)
    ds = MedMNISTDataset(medmnist(tmp_path, images, np.zeros((3, 1), np.int64)))
    assert ds.spatial_dims == 3 and tuple(ds[0].image.shape) == (1, 6, 7, 8)


def test_medmnist_huge_label_fails_at_once(tmp_path):
    labels = np.array([[0], [1], [2**40]], dtype=np.int64)
    path = medmnist(tmp_path, np.zeros((3, 8, 8), np.uint8), labels)
    with deadline(2), pytest.raises(ValueError, match=r"train_labels\[2\] is 1099511627776"):
        open_dataset(path)
    float_labels = np.array([[0.0], [1e30], [1.0]])
    path = medmnist(tmp_path, np.zeros((3, 8, 8), np.uint8), float_labels, "f.npz")
    with deadline(20), pytest.raises(ValueError, match=r"train_labels\[1\]") as info:
        open_dataset(path)
    documented(info)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((4, 0, 28), np.uint8), np.zeros(4, np.int64), "an empty image size"),
        (np.array(3.0), np.zeros(1, np.int64), r"train_images has shape \(\)"),
        (np.array(["a", "b", "c"]), np.zeros(3, np.int64), r"train_images has shape \(3,\)"),
        (np.full((2, 4, 4), "x"), np.zeros(2, np.int64), "must hold numbers, got dtype <U1"),
        (np.zeros((2, 4, 4), np.uint8), np.array(1), "train_labels is a single value"),
        (np.zeros((2, 4, 4), np.uint8), np.array(["a", "b"]), "must hold integers"),
    ],
)
def test_medmnist_bad_arrays(tmp_path, images, labels, message):
    with pytest.raises(ValueError, match=message) as info:
        open_dataset(medmnist(tmp_path, images, labels))
    assert "m.npz" in str(info.value)
    documented(info)


# -- run-length masks and boxes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 " + "9" * 30, "RLE number 2 .* is larger than any image"),
        ("99999999999999999999 1", "RLE number 1 .* is larger than any image"),
        (" ".join(["1099511627776 1"] * 4), "add up to more than"),
        ("0 1 " * 3 + "9223372036854775807 9223372036854775807", "larger than any image"),
    ],
)
def test_rle_overflow_names_file_and_row(tmp_path, rle, message):
    root = tmp_path / "siim"
    make_siim(root)
    csv = root / "train-rle.csv"
    uid = csv.read_text().splitlines()[1].split(",")[0]
    csv.write_text(f"ImageId, EncodedPixels\n{uid}, {rle}\n")
    with pytest.raises(ValueError, match=message) as info:
        open_dataset(root, missing="skip")
    assert "train-rle.csv row 2" in str(info.value)
    documented(info)
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, 16, 12)


def test_rsna_box_whose_far_edge_overflows(tmp_path):
    root = tmp_path / "rsna"
    make_rsna(root)
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\npa,1e308,3,1e308,4,1\npb,,,,,0\n"
    )
    with pytest.raises(ValueError, match=r"row 2: the box's x \+ width .* is not finite") as info:
        open_dataset(root, missing="skip")
    documented(info)
    with pytest.raises(ValueError, match="not finite"):
        boxes_to_mask([(1e308, 0, 1e308, 1)], 8, 8)


def test_rsna_positive_box_outside_the_image(tmp_path):
    root = tmp_path / "rsna"
    make_rsna(root)  # images are 20 x 24
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\npa,2,3,5,4,1\npa,500,600,10,10,1\npb,,,,,0\n"
    )
    ds = open_dataset(root, missing="skip")
    with pytest.raises(ValueError, match=r"row 3 \(patientId pa\): box .* lies outside") as info:
        ds[0]
    documented(info)


def test_folder_box_outside_the_image(tmp_path):
    root = tmp_path / "folder"
    make_folder(root)  # 16 x 12 images; boxes of positives
    rows = (root / "boxes.csv").read_text().splitlines()
    first = rows[1].split(",")
    rows[1] = ",".join([first[0], "100", "100", "3", "3"])
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    ds = open_dataset(root)
    index = ds.ids.index(Path(first[0]).stem)
    with pytest.raises(ValueError, match="lies outside the 16x12 image") as info:
        ds[index]
    documented(info)


# -- labels and the dataset card --------------------------------------------------------------


def test_superscript_two_is_an_unknown_label(tmp_path):
    root = tmp_path / "folder"
    make_folder(root)
    lines = (root / "manifest.csv").read_text().splitlines()
    parts = lines[1].split(",")
    parts[1] = "²"
    lines[1] = ",".join(parts)
    (root / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"manifest.csv row 2: unknown label '²'") as info:
        open_dataset(root)
    documented(info)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("in_channels", "abc", "in_channels must be a positive integer, got 'abc'"),
        ("in_channels", 0, "in_channels must be a positive integer"),
        ("spacing", ["a", 1], "spacing must list 2 positive voxel sizes"),
        ("spacing", [0.7, -1], "spacing must list 2 positive voxel sizes"),
        ("spacing", [0.7], "spacing must list 2"),
        ("spatial_dims", "2", "spatial_dims must be 2 or 3"),
        ("classes", ["a", 3], "classes must list at least two names"),
    ],
)
def test_bad_dataset_card_values_name_the_key(tmp_path, key, value, message):
    root = tmp_path / "folder"
    make_folder(root)
    card = json.loads((root / "dataset.json").read_text())
    card[key] = value
    (root / "dataset.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=message) as info:
        open_dataset(root)
    assert "dataset.json" in str(info.value)
    documented(info)


def test_jpeg2000_box_of_length_zero_does_not_hang(tmp_path):
    # Found by `make fuzz`: pydicom walks the JP2 boxes by their lengths, and a box of
    # length 0 before the codestream kept it in place forever.
    import pydicom.data

    source = Path(pydicom.data.__file__).parent / "test_files" / "GDCMJ2K_TextGBR.dcm"
    raw = bytearray(source.read_bytes())
    start = raw.find(b"\x00\x00\x00\x0cjP  \r\n\x87\n")
    assert start > 0 and raw[start + 16 : start + 20] == b"ftyp"
    raw[start + 12 : start + 16] = b"\x00\x00\x00\x00"  # the ftyp box's length
    path = tmp_path / "j2k.dcm"
    path.write_bytes(bytes(raw))
    with deadline(20), pytest.raises(ValueError, match=r"j2k\.dcm: frame 0: the JPEG 2000 box"):
        load(path)


def test_nifti_unit_codes(tmp_path):
    # Found by `make fuzz`: an unknown unit code made nibabel raise KeyError. The time
    # code (bits 3-5 of xyzt_units) is not used; an unknown spatial code is refused.
    path = nifti(tmp_path, "units")
    raw = bytearray(path.read_bytes())
    raw[123] = 2 | 0b111000  # mm, and a time code NIfTI does not define
    path.write_bytes(bytes(raw))
    image = load(path)
    assert image.meta["spacing_units"] == "mm" and image.spacing == (1.0, 1.0, 2.0)
    raw[123] = 5  # no such spatial unit
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"units\.nii: xyzt_units holds the unknown") as info:
        load(path)
    documented(info)


@pytest.mark.parametrize("text", ["   ,  \n", ",,,\n,\n", "\t,\r\n"])
def test_csv_of_empty_fields_only(tmp_path, text):
    # Found by `make fuzz`: a file of blanks and commas passed the emptiness check and
    # ended in an AssertionError.
    from trustmap.data.labels import parse_rsna

    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"labels\.csv: has no header row") as info:
        parse_rsna(path)
    documented(info)


def test_medmnist_member_that_is_not_an_array(tmp_path):
    # Found by `make fuzz`: numpy returns the raw bytes of a member that is not an .npy
    # file, which then failed with AttributeError.
    import zipfile

    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train_images.npy", b"not an array")
        archive.writestr("train_labels.npy", b"nor this")
    with pytest.raises(ValueError, match=r"m\.npz: member 'train_images' is not a NumPy") as info:
        open_dataset(path)
    documented(info)
