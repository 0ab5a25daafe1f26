"""Image I/O: DICOM (files, series, multi-frame), NIfTI, PNG/JPEG, NPY, and atomic writes."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from trustmap import io as tio
from trustmap.core.atomic import atomic_path, save_npy_atomic, write_bytes_atomic, write_text_atomic
from trustmap.data.io import WINDOW_PRESETS, LoadedImage, load, save_map

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def _ct_copy(path: Path, pixels: np.ndarray, **attrs: object) -> Path:
    """CT_small with its pixels replaced by ``pixels`` (frames first if 3D), saved to path."""
    ds = pydicom.dcmread(CT)
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    unsigned = pixels.dtype.kind == "u"
    ds.PixelRepresentation = 0 if unsigned else 1
    ds.PixelData = pixels.astype(np.uint16 if unsigned else np.int16).tobytes()
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)
    return path


# ---------------------------------------------------------------------------------------
# atomic writes


def test_atomic_path_keeps_double_suffix_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "map.nii.gz"
    target.write_bytes(b"old")
    with atomic_path(target) as temp:
        assert temp.parent == tmp_path
        assert temp.name.endswith(".nii.gz")
        assert temp != target
        temp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible until the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]


def test_atomic_failure_leaves_no_target_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.npy"

    def half_write() -> None:
        with atomic_path(target) as temp, open(temp, "wb") as handle:
            handle.write(b"\x93NUMPY half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        half_write()
    assert list(tmp_path.iterdir()) == []


def test_atomic_failure_keeps_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "report.txt"
    write_text_atomic(target, "complete report")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as temp:
        temp.write_text("half a rep")
        raise KeyboardInterrupt
    assert target.read_text() == "complete report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


def test_atomic_helpers_write_content(tmp_path: Path) -> None:
    assert write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    # A suffix numpy would otherwise extend to ".map.npy".
    np.testing.assert_array_equal(np.load(save_npy_atomic(tmp_path / "x.map", array)), array)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_text_atomic(tmp_path / "missing" / "a.txt", "x")


# ---------------------------------------------------------------------------------------
# DICOM: single files


def test_ct_small_is_rescaled_to_hounsfield_units() -> None:
    ds = pydicom.dcmread(CT)
    img = load(CT)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array, expected.astype(np.float32))
    assert float(ds.RescaleIntercept) == -1024.0  # the test means something only if != 0
    assert img.meta["units"] == "HU"
    assert img.modality == "CT"
    assert img.spacing == pytest.approx((0.661468, 0.661468))
    # Row index moves along the column cosines (0, 1, 0) LPS = (0, -1, 0) RAS.
    np.testing.assert_allclose(img.affine[:3, 0], [0.0, -0.661468, 0.0])
    np.testing.assert_allclose(img.affine[:3, 1], [-0.661468, 0.0, 0.0])
    np.testing.assert_allclose(img.affine[:3, 3], [158.135803, 179.035797, -75.699997])
    x = img.to_tensor()
    assert x.shape == (1, 1, 128, 128) and x.dtype == torch.float32
    assert "PatientName" not in img.meta and "patient_name" not in img.meta


def test_mr_small_and_its_own_window() -> None:
    ds = pydicom.dcmread(MR)
    raw = load(MR)
    np.testing.assert_array_equal(raw.array, ds.pixel_array.astype(np.float32))
    assert raw.modality == "MR" and raw.meta["units"] is None
    windowed = load(MR, window="dicom")
    center, width = 600.0, 1600.0  # MR_small's WindowCenter / WindowWidth
    expected = np.clip((ds.pixel_array - (center - width / 2)) / width, 0, 1)
    np.testing.assert_allclose(windowed.array, expected, atol=1e-6)
    assert windowed.meta["window"] == (center, width)


def test_rescale_and_presets_on_known_numbers(tmp_path: Path) -> None:
    stored = np.array([[0, 100, 200, 300], [400, 500, 575, 1000]], dtype=np.int16)
    path = _ct_copy(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1750)
    hu = load(path).array
    np.testing.assert_array_equal(hu, 2.0 * stored - 1750)
    # Lung window W1500/L-600 spans [-1350, 150]: -1750 and -1550 clip to 0, -1350 is
    # the edge, -600 (stored 575) is the middle, 250 clips to 1.
    lung = load(path, window="lung").array
    np.testing.assert_allclose(lung[0], [0.0, 0.0, 0.0, (-1150 + 1350) / 1500])
    np.testing.assert_allclose(lung[1], [(-950 + 1350) / 1500, (-750 + 1350) / 1500, 0.5, 1.0])
    tuple_window = load(path, window=(-1000.0, 400.0)).array
    np.testing.assert_allclose(tuple_window, np.clip((hu + 1200) / 400, 0, 1), atol=1e-6)
    assert WINDOW_PRESETS["bone"] == (400.0, 1800.0)


def test_monochrome1_is_inverted_with_its_window(tmp_path: Path) -> None:
    stored = np.array([[0, 1, 2048], [4000, 4095, 17]], dtype=np.uint16)
    path = _ct_copy(
        tmp_path / "cr.dcm",
        stored,
        PhotometricInterpretation="MONOCHROME1",
        BitsStored=12,
        HighBit=11,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=1000,
        WindowWidth=2000,
        Modality="CR",
    )
    img = load(path)
    # Rescaled range of 12-bit values is [-100, 8090]; v -> (-100 + 8090) - (2 s - 100).
    np.testing.assert_array_equal(img.array, 8090.0 - 2.0 * stored)
    assert img.meta["inverted"] and img.meta["units"] is None
    # Display semantics are kept: the file's window on inverted values is 1 - the window
    # on the original values.
    original = np.clip((2.0 * stored - 100 - (1000 - 1000)) / 2000, 0, 1)
    np.testing.assert_allclose(load(path, window="dicom").array, 1.0 - original, atol=1e-6)


def test_multiframe_volume_and_frame_selection(tmp_path: Path) -> None:
    frames = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    path = _ct_copy(tmp_path / "mf.dcm", frames, RescaleSlope=1, RescaleIntercept=0)
    volume = load(path)
    assert volume.array.shape == (3, 4, 5)
    np.testing.assert_array_equal(volume.array, frames)
    assert volume.to_tensor().shape == (1, 1, 3, 4, 5)
    second = load(path, frame=1)
    np.testing.assert_array_equal(second.array, frames[1])
    with pytest.raises(ValueError, match="frame 3 out of range"):
        load(path, frame=3)
    with pytest.raises(ValueError, match="single frame"):
        load(CT, frame=0)


def test_rt_dose_multiframe_uses_scaling_and_frame_offsets() -> None:
    path = get_testdata_file("rtdose.dcm")  # 15 frames, offsets 0, 5, ..., 70 mm
    ds = pydicom.dcmread(path)
    dose = load(path)
    assert dose.array.shape == (15, 10, 10)
    expected = ds.pixel_array * float(ds.DoseGridScaling)
    np.testing.assert_allclose(dose.array, expected, rtol=1e-6)
    assert dose.meta["units"] == str(ds.DoseUnits)
    assert dose.spacing == pytest.approx((5.0, 10.0, 10.0))
    np.testing.assert_allclose(dose.affine[:3, 0], [0.0, 0.0, 5.0])


def test_palette_colour_dicom_becomes_rgb() -> None:
    from pydicom.pixels import apply_color_lut

    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    img = load(path)
    assert img.is_color and img.array.shape == (3, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(
        img.array, np.moveaxis(apply_color_lut(ds.pixel_array, ds), -1, 0)
    )


def test_raw_dicom_without_preamble_is_read(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "raw.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(load(path).array, load(CT).array)


def test_dicom_found_by_content_without_suffix(tmp_path: Path) -> None:
    path = tmp_path / "IM0001"
    path.write_bytes(Path(CT).read_bytes())
    assert load(path).modality == "CT"


# ---------------------------------------------------------------------------------------
# DICOM: series


@pytest.mark.parametrize(
    ("orientation", "axis"),
    [([1, 0, 0, 0, 1, 0], 2), ([1, 0, 0, 0, 0, -1], 1)],  # axial (normal +z), coronal (+y)
)
def test_series_sorted_by_position_along_normal(
    tmp_path: Path, orientation: list[int], axis: int
) -> None:
    # File names and InstanceNumbers both disagree with the positions, which must win.
    offsets = {"a.dcm": 10.0, "b.dcm": 0.0, "c.dcm": 5.0}
    for number, (name, offset) in enumerate(offsets.items(), start=1):
        position = [-5.0, 7.0, 3.0]
        position[axis] += offset
        pixels = np.full((4, 6), int(offset), dtype=np.int16)
        _ct_copy(
            tmp_path / name,
            pixels,
            ImagePositionPatient=position,
            ImageOrientationPatient=orientation,
            InstanceNumber=number,
            PixelSpacing=[0.5, 0.25],
        )
    (tmp_path / "notes.txt").write_text("not an image")
    vol = load(tmp_path)
    assert vol.array.shape == (3, 4, 6)
    np.testing.assert_array_equal(vol.array[:, 0, 0], np.array([0, 5, 10]) - 1024.0)
    assert vol.meta["files"] == ["b.dcm", "c.dcm", "a.dcm"]
    assert vol.spacing == pytest.approx((5.0, 0.5, 0.25))
    step = np.zeros(3)
    step[axis] = 5.0
    np.testing.assert_allclose(vol.affine[:3, 0], np.diag([-1, -1, 1]) @ step)
    np.testing.assert_allclose(vol.affine[:3, 3], [5.0, -7.0, 3.0])
    assert vol.meta["units"] == "HU" and vol.meta["slice_order"] == "ImagePositionPatient"


def test_series_falls_back_to_instance_number_and_skips_non_images(tmp_path: Path) -> None:
    for name, number in (("x.dcm", 3), ("y.dcm", 1), ("z.dcm", 2)):
        pixels = np.full((2, 2), number, dtype=np.int16)
        _ct_copy(
            tmp_path / name,
            pixels,
            InstanceNumber=number,
            ImagePositionPatient=None,
            RescaleIntercept=0,
        )
    _write_report(tmp_path / "sr.dcm")
    vol = load(tmp_path)
    np.testing.assert_array_equal(vol.array[:, 0, 0], [1, 2, 3])
    assert vol.meta["slice_order"] == "InstanceNumber"
    assert vol.spacing[0] == 5.0  # CT_small's SliceThickness
    assert vol.meta["skipped_files"] == ["sr.dcm"]


def test_series_rejects_duplicate_positions(tmp_path: Path) -> None:
    for name in ("a.dcm", "b.dcm"):
        _ct_copy(tmp_path / name, np.zeros((2, 2), dtype=np.int16))
    with pytest.raises(ValueError, match="share a position"):
        load(tmp_path)


# ---------------------------------------------------------------------------------------
# NIfTI


def _rotated_affine() -> np.ndarray:
    # 90 degrees about z, anisotropic voxels, an offset; all exact in float32, as NIfTI
    # headers store them.
    return np.array(
        [
            [0.0, -1.25, 0.0, -10.5],
            [0.5, 0.0, 0.0, 20.25],
            [0.0, 0.0, 2.0, 3.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.standard_normal((4, 5, 6)).astype(np.float32)
    path = save_map(array, tmp_path / f"map{suffix}", affine=_rotated_affine())
    img = load(path)
    np.testing.assert_array_equal(img.array, array)
    np.testing.assert_array_equal(img.affine, _rotated_affine())
    assert img.spacing == (0.5, 1.25, 2.0)  # the norms of the affine's index columns
    # On disk the NIfTI axes are (i, j, k) = (w, h, d).
    stored = nib.load(path)
    np.testing.assert_array_equal(stored.get_fdata(), array.T)
    assert stored.header.get_zooms() == (2.0, 1.25, 0.5)
    assert list(tmp_path.iterdir()) == [path]


def test_nifti_written_by_nibabel_is_transposed(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (i, j, k)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.9, 3.0, 1.0])), path)
    img = load(path)
    assert img.array.shape == (4, 3, 2)
    assert img.array[3, 2, 1] == data[1, 2, 3]
    assert img.spacing == pytest.approx((3.0, 0.9, 0.8))
    # The affine maps the returned indices (d, h, w) = (k, j, i) to the same world point.
    np.testing.assert_allclose(img.affine @ [3, 2, 1, 1], [0.8, 1.8, 9.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(img.affine[:3, 0], [0.0, 0.0, 3.0])


def test_save_map_like_dicom_keeps_geometry(tmp_path: Path) -> None:
    ct = load(CT)
    attribution = torch.linspace(-1, 1, 128 * 128).reshape(1, 1, 128, 128)
    path = save_map(attribution, tmp_path / "attr.nii.gz", like=ct)
    back = load(path)
    np.testing.assert_array_equal(back.array, attribution[0, 0].numpy())
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-5)
    with pytest.raises(ValueError, match=r"does not match the image shape \(128, 128\)"):
        save_map(np.zeros((64, 64)), tmp_path / "bad.nii", like=ct)


def test_save_map_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unsupported file type \.png"):
        save_map(np.zeros((4, 4)), tmp_path / "map.png")
    with pytest.raises(ValueError, match="sum over the channel axis"):
        save_map(np.zeros((2, 3, 4, 5)), tmp_path / "map.nii")
    with pytest.raises(ValueError, match="not both"):
        save_map(np.zeros((4, 4)), tmp_path / "m.nii", like=load(CT), affine=np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_nifti_4d_needs_a_frame(tmp_path: Path) -> None:
    data = np.stack([np.full((2, 3, 4), t, dtype=np.float32) for t in range(3)], axis=-1)
    path = tmp_path / "fmri.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(ValueError, match="4D with 3 volumes"):
        load(path)
    img = load(path, frame=2)
    assert img.array.shape == (4, 3, 2)
    assert np.all(img.array == 2.0)


# ---------------------------------------------------------------------------------------
# PNG, JPEG, NPY


def test_png_grey_16bit_and_colour(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "g.png")
    img = load(tmp_path / "g.png")
    np.testing.assert_array_equal(img.array, grey)
    assert not img.is_color and img.to_tensor().shape == (1, 1, 3, 4)

    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_array_equal(load(tmp_path / "d.png").array, deep)

    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 7
    Image.fromarray(rgb).save(tmp_path / "c.png")
    colour = load(tmp_path / "c.png")
    assert colour.is_color and colour.array.shape == (3, 3, 4)
    assert colour.spatial_shape == (3, 4)
    np.testing.assert_array_equal(colour.array[:, 0, 0], [255, 0, 7])
    assert colour.to_tensor().shape == (1, 3, 3, 4)


def test_jpeg_loads(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(tmp_path / "x.jpg")
    img = load(tmp_path / "x.jpg")
    assert img.array.shape == (8, 8)
    np.testing.assert_allclose(img.array, 128, atol=2)


def test_npy_round_trip_drops_leading_unit_axes(tmp_path: Path) -> None:
    array = np.random.default_rng(1).random((1, 1, 5, 6)).astype(np.float32)
    path = save_map(array, tmp_path / "m.npy")
    np.testing.assert_array_equal(np.load(path), array)  # saved as given
    img = tio.load(path)
    assert isinstance(img, LoadedImage)
    np.testing.assert_array_equal(img.array, array[0, 0])
    assert img.affine is None and img.spacing == (1.0, 1.0)


# ---------------------------------------------------------------------------------------
# errors


def _write_report(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing-here\.dcm"):
        load(tmp_path / "nothing-here.dcm")


def test_corrupt_dicom(tmp_path: Path) -> None:
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"noise\.dcm: not a valid DICOM file"):
        load(noise)
    data = Path(CT).read_bytes()
    half = tmp_path / "half.dcm"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"half\.dcm: cannot decode the pixel data"):
        load(half)
    head = tmp_path / "head.dcm"
    head.write_bytes(data[:600])
    with pytest.raises(ValueError, match=r"head\.dcm: .*probably truncated"):
        load(head)


def test_dicom_without_pixels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sr\.dcm: has no pixel data \(Basic Text SR"):
        load(_write_report(tmp_path / "sr.dcm"))
    with pytest.raises(ValueError, match="has no pixel data in any"):
        load(tmp_path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_corrupt_nifti(tmp_path: Path, suffix: str) -> None:
    garbage = tmp_path / f"garbage{suffix}"
    payload = os.urandom(600)
    garbage.write_bytes(gzip.compress(payload) if suffix == ".nii.gz" else payload)
    with pytest.raises(ValueError, match=f"garbage{suffix}: not a readable NIfTI"):
        load(garbage)
    good = save_map(np.ones((8, 8, 8), np.float32), tmp_path / f"good{suffix}")
    truncated = tmp_path / f"cut{suffix}"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"cut{suffix}: not a readable NIfTI"):
        load(truncated)


def test_corrupt_png(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        load(path)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "scan.mha"
    path.write_bytes(b"ObjectType = Image\n")
    with pytest.raises(
        ValueError, match=r"scan\.mha: unsupported file type \.mha, expected one of \.dcm"
    ):
        load(path)


def test_nan_values_are_refused(tmp_path: Path) -> None:
    array = np.zeros((4, 4), np.float32)
    array[0, 0] = array[1, 2] = np.nan
    np.save(tmp_path / "nan.npy", array)
    with pytest.raises(ValueError, match=r"nan\.npy: contains 2 NaN values"):
        load(tmp_path / "nan.npy")
    volume = np.zeros((3, 3, 3), np.float32)
    volume[1, 1, 1] = np.nan
    volume[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(ValueError, match="contains 1 NaN values and 1 Inf values"):
        load(tmp_path / "nan.nii")


def test_bad_windows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown window 'lungs'"):
        load(CT, window="lungs")
    with pytest.raises(ValueError, match="width > 0"):
        load(CT, window=(40, 0))
    with pytest.raises(ValueError, match="no WindowCenter"):
        load(CT, window="dicom")
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="needs a DICOM file"):
        load(tmp_path / "a.npy", window="dicom")
