"""Loaders on small fixture files written in the real formats: the trustmap layout (PNG and
NIfTI), SIIM-ACR (DICOM + run-length CSV), RSNA (DICOM + boxes CSV), MedMNIST (.npz) and
NIfTI image/mask pairs; and their errors, which name the file and the row."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from trustmap.data.datasets import collate, open_dataset
from trustmap.data.io import save_map
from trustmap.data.labels import boxes_to_mask
from trustmap.data.loaders import (
    FolderDataset,
    MedMNISTDataset,
    NiftiPairsDataset,
    RSNADataset,
    SIIMDataset,
    detect_kind,
)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_dicom(path: Path, pixels: np.ndarray, uid: str, **attrs: object) -> Path:
    """A minimal valid CR DICOM file (8- or 16-bit greyscale) like the challenges ship."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.5, 0.25]
    ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def minmax(array: np.ndarray) -> np.ndarray:
    a = array.astype(np.float64)
    return ((a - a.min()) / (a.max() - a.min())).astype(np.float32)


def make_folder(
    root: Path,
    n: int = 6,
    size: tuple[int, int] = (16, 12),
    *,
    card: dict | None = None,
    boxes: bool = True,
) -> dict:
    """A 2D trustmap layout: 8-bit PNG images, 0/255 masks, token masks on odd rows,
    boxes of positives, a card; returns what was written."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    images, masks, tokens, labels, box_rows = [], [], [], [], []
    rows = []
    for i in range(n):
        image = rng.integers(0, 256, size, dtype=np.uint8)
        label = i % 2
        mask = np.zeros(size, dtype=np.uint8)
        if label:
            mask[2 + i % 3 : 7, 3:9] = 255
            box_rows.append([f"images/case{i}.png", 3, 2 + i % 3, 6, 5 - i % 3])
        write_png(root / f"images/case{i}.png", image)
        mask_field = ""
        if label:
            write_png(root / f"masks/case{i}.png", mask)
            mask_field = f"masks/case{i}.png"
        token_field = ""
        token = np.zeros(size, dtype=bool)
        if i % 2:
            token[:3, -3:] = True
            write_png(root / f"masks/case{i}_token.png", token.astype(np.uint8) * 255)
            token_field = f"masks/case{i}_token.png"
        split = ["train", "train", "val", "val", "test", "test"][i % 6]
        rows.append([f"images/case{i}.png", label, split, mask_field, token_field, "rim"])
        images.append(image)
        masks.append(mask > 0)
        tokens.append(token if token_field else None)
        labels.append(label)
    write_csv(
        root / "manifest.csv",
        ["image", "label", "split", "mask", "token_mask", "lesion_type"],
        rows,
    )
    if boxes:
        write_csv(root / "boxes.csv", ["image", "x", "y", "width", "height"], box_rows)
    card = card or {
        "name": "toy-cxr",
        "format_version": 1,
        "classes": ["negative", "positive"],
        "spatial_dims": 2,
        "in_channels": 1,
        "image_size": list(size),
        "modality": "CR",
        "intensity": {"kind": "range", "min": 0, "max": 255},
        "ground_truth": "mask+boxes" if boxes else "mask",
        "spacing": [0.7, 0.7],
    }
    (root / "dataset.json").write_text(json.dumps(card))
    return {"images": images, "masks": masks, "tokens": tokens, "labels": labels, "rows": rows}


# ---------------------------------------------------------------------------------------
# the trustmap layout


def test_folder_dataset_reads_everything(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "ds")
    ds = open_dataset(tmp_path / "ds")
    assert isinstance(ds, FolderDataset)
    assert (ds.name, ds.classes, ds.spatial_dims, ds.in_channels) == (
        "toy-cxr",
        ("negative", "positive"),
        2,
        1,
    )
    assert ds.ground_truth == "mask+boxes"
    assert len(ds) == 6
    np.testing.assert_array_equal(ds.labels, written["labels"])
    assert list(ds.splits) == ["train", "train", "val", "val", "test", "test"]
    assert ds.ids == [f"case{i}" for i in range(6)]
    for i in range(6):
        sample = ds[i]
        assert sample.image.shape == (1, 16, 12) and sample.image.dtype == torch.float32
        np.testing.assert_allclose(sample.image[0].numpy(), written["images"][i] / 255.0, atol=1e-6)
        assert sample.mask.dtype == torch.bool
        np.testing.assert_array_equal(sample.mask.numpy(), written["masks"][i])
        assert sample.label == written["labels"][i]
        if written["tokens"][i] is None:
            assert sample.token_mask is None
        else:
            np.testing.assert_array_equal(sample.token_mask.numpy(), written["tokens"][i])
        assert sample.meta["row"] == i + 2  # the header is line 1
        assert sample.meta["id"] == f"case{i}"
        assert sample.meta["split"] == ds.splits[i]
        assert sample.meta["spacing"] == (0.7, 0.7)  # from the card: PNG has none
        assert sample.meta["lesion_type"] == "rim"
    assert ds[1].boxes == ((3.0, 3.0, 6.0, 4.0),)
    assert ds[0].boxes == ()
    assert ds[-1].meta["id"] == "case5"
    with pytest.raises(IndexError):
        ds[6]


def test_folder_tensors_collate_and_subsets(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "ds")
    ds = FolderDataset(tmp_path / "ds")
    calls = []
    data = ds.tensors(progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (6, 6) and len(calls) == 6
    assert data.images.shape == (6, 1, 16, 12)
    assert data.masks.shape == (6, 1, 16, 12) and data.masks.dtype == torch.float32
    np.testing.assert_array_equal(data.masks[:, 0].numpy() > 0, np.stack(written["masks"]))
    assert data.has_mask.all()  # negatives have an (empty) mask too
    assert data.token_masks is not None and data.token_masks[1].sum() == 9
    assert data.token_masks[0].sum() == 0
    assert ds.tensors() is data  # cached

    # After the first load nothing is read again: neither by splits nor by subsets.
    def refuse(index: int) -> None:
        raise AssertionError("loaded twice")

    ds._load = refuse  # type: ignore[method-assign]
    val = ds.tensors("val")
    assert val.ids == ["case2", "case3"]
    np.testing.assert_array_equal(val.indices, [2, 3])
    assert torch.equal(val.images, data.images[2:4])
    sub = ds.subset("test")
    assert len(sub) == 2 and list(sub.labels) == [0, 1] and sub.ids == ["case4", "case5"]
    assert torch.equal(sub.tensors().images, data.images[4:6])
    picked = ds.subset([5, 0])
    assert picked.ids == ["case5", "case0"]

    fresh = FolderDataset(tmp_path / "ds")
    loader = torch.utils.data.DataLoader(fresh, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 1, 16, 12)
    assert batch["labels"].tolist() == [0, 1, 0, 1]
    assert batch["masks"].shape == (4, 1, 16, 12)
    assert batch["ids"] == ["case0", "case1", "case2", "case3"]
    assert batch["boxes"][1] == [(3.0, 3.0, 6.0, 4.0)]
    assert torch.equal(batch["images"], data.images[:4])


def test_folder_resize_on_load(tmp_path: Path) -> None:
    make_folder(tmp_path / "ds")
    ds = FolderDataset(tmp_path / "ds", size=(8, 6))
    native = FolderDataset(tmp_path / "ds")[1]
    sample = ds[1]
    assert sample.image.shape == (1, 8, 6)
    assert sample.mask.shape == (8, 6) and sample.mask.dtype == torch.bool
    assert sample.token_mask.shape == (8, 6)
    assert sample.boxes == ((1.5, 1.5, 3.0, 2.0),)  # halved
    assert sample.meta["spacing"] == (1.4, 1.4)
    assert sample.meta["original_shape"] == (16, 12)
    # Halving with nearest-exact: output pixel i has its centre at input 2i + 1.
    np.testing.assert_array_equal(sample.mask.numpy(), native.mask.numpy()[1::2, 1::2])
    # Shrinking 2x with antialiasing: the triangle filter stretched by 2 weighs the four
    # input pixels around each output centre 1/8, 3/8, 3/8, 1/8 along each axis.
    x = native.image[0].double().numpy()
    w = np.array([1, 3, 3, 1]) / 8
    inner = np.array(
        [
            [w @ x[2 * i - 1 : 2 * i + 3, 2 * j - 1 : 2 * j + 3] @ w for j in range(1, 5)]
            for i in range(1, 7)
        ]
    )
    np.testing.assert_allclose(sample.image[0, 1:7, 1:5].numpy(), inner, atol=1e-5)
    assert FolderDataset(tmp_path / "ds", size=4)[0].image.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="size must be"):
        FolderDataset(tmp_path / "ds", size=(8, 6, 2))


def test_box_dataset_mask_is_union_of_boxes_also_after_resize(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_folder(root)
    card = json.loads((root / "dataset.json").read_text())
    card["ground_truth"] = "boxes"
    (root / "dataset.json").write_text(json.dumps(card))
    write_csv(
        root / "boxes.csv",
        ["image", "x", "y", "width", "height"],
        [["case1", 1, 2, 4, 3], ["images/case1.png", 7, 9, 3, 5], ["case3", 0, 0, 2, 2]],
    )
    ds = FolderDataset(root)
    sample = ds[1]
    expected = np.zeros((16, 12), dtype=bool)
    expected[2:5, 1:5] = True
    expected[9:14, 7:10] = True
    np.testing.assert_array_equal(sample.mask.numpy(), expected)
    assert not ds[0].mask.any() and ds[0].boxes == ()
    small = FolderDataset(root, size=(8, 6))[1]
    np.testing.assert_array_equal(small.mask.numpy(), boxes_to_mask(small.boxes, 8, 6))


def test_hand_made_folder_without_card(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        write_png(root / f"{name}.png", rng.integers(10, 200, (8, 8), dtype=np.uint8))
    write_csv(
        root / "manifest.csv",
        ["image", "label"],
        [["a.png", "healthy"], ["b.png", "sick"], ["c.png", "sick"]],
    )
    ds = open_dataset(root)
    assert ds.name == "mine" and ds.classes == ("healthy", "sick")
    assert list(ds.labels) == [0, 1, 1]
    assert ds.splits is None and ds.ground_truth == "none"
    sample = ds[0]
    assert sample.mask is None and sample.meta["split"] is None
    image = np.asarray(Image.open(root / "a.png"))
    np.testing.assert_allclose(sample.image[0].numpy(), minmax(image), atol=1e-6)
    parts = ds.split_indices(seed=0, fractions=(1 / 3, 1 / 3, 1 / 3))
    assert sorted(np.concatenate(list(parts.values())).tolist()) == [0, 1, 2]


def test_images_of_different_sizes_need_size(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    write_png(root / "a.png", np.zeros((8, 8), np.uint8))
    write_png(root / "b.png", np.full((6, 10), 255, np.uint8))
    write_csv(root / "manifest.csv", ["image", "label"], [["a.png", 0], ["b.png", 1]])
    with pytest.raises(
        ValueError, match=r"manifest\.csv row 3 \(b\): image shape \(1, 6, 10\) differs .*size="
    ):
        FolderDataset(root).tensors()
    data = FolderDataset(root, size=8).tensors()
    assert data.images.shape == (2, 1, 8, 8)


def test_folder_rgb_png_becomes_grey(tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 200
    write_png(root / "x.png", rgb)
    write_csv(root / "manifest.csv", ["image", "label"], [["x.png", 1]])
    (root / "dataset.json").write_text(
        json.dumps({"intensity": {"kind": "range", "min": 0, "max": 255}})
    )
    image = FolderDataset(root)[0].image
    assert image.shape == (1, 4, 4)
    assert torch.allclose(image, torch.full((1, 4, 4), (0.299 * 100 + 0.587 * 200) / 255))


def make_volume_folder(root: Path) -> list[np.ndarray]:
    """A 3D trustmap layout: NIfTI volumes and masks, boxes with z and depth."""
    rng = np.random.default_rng(3)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    volumes, rows = [], []
    for i in range(3):
        volume = rng.normal(100, 20, (6, 8, 10)).astype(np.float32)
        volume[:, :2] = 0  # background outside the head
        mask = np.zeros((6, 8, 10), dtype=np.float32)
        mask[2:4, 3:6, 4:7] = float(i > 0)
        save_map(volume, root / f"images/v{i}.nii.gz")
        save_map(mask, root / f"masks/v{i}.nii.gz")
        volumes.append(volume)
        rows.append([f"images/v{i}.nii.gz", int(i > 0), "train", f"masks/v{i}.nii.gz"])
    write_csv(root / "manifest.csv", ["image", "label", "split", "mask"], rows)
    write_csv(
        root / "boxes.csv",
        ["image", "x", "y", "width", "height", "z", "depth"],
        [["v1", 4, 3, 3, 3, 2, 2], ["v2", 4, 3, 3, 3, 2, 2]],
    )
    card = {
        "name": "toy-mri",
        "format_version": 1,
        "classes": ["negative", "positive"],
        "spatial_dims": 3,
        "in_channels": 1,
        "modality": "MR",
        "intensity": {"kind": "zscore"},
        "ground_truth": "mask+boxes",
    }
    (root / "dataset.json").write_text(json.dumps(card))
    return volumes


def test_folder_3d_nifti_zscore_and_boxes(tmp_path: Path) -> None:
    volumes = make_volume_folder(tmp_path / "mri")
    ds = open_dataset(tmp_path / "mri")
    assert ds.spatial_dims == 3
    sample = ds[1]
    assert sample.image.shape == (1, 6, 8, 10)
    v = volumes[1].astype(np.float64)
    inside = v[v != 0]
    expected = np.where(v != 0, (v - inside.mean()) / inside.std(), 0.0)
    np.testing.assert_allclose(sample.image[0].numpy(), expected, atol=1e-5)
    assert sample.mask.shape == (6, 8, 10) and sample.mask.sum() == 2 * 3 * 3
    assert sample.boxes == ((4.0, 3.0, 3.0, 3.0, 2.0, 2.0),)
    np.testing.assert_array_equal(boxes_to_mask(sample.boxes, 8, 10, depth=6), sample.mask.numpy())
    assert sample.meta["spacing"] == (1.0, 1.0, 1.0)
    small = FolderDataset(tmp_path / "mri", size=(3, 4, 5))[1]
    assert small.image.shape == (1, 3, 4, 5) and small.mask.shape == (3, 4, 5)
    assert small.boxes == ((2.0, 1.5, 1.5, 1.5, 1.0, 1.0),)
    assert ds.tensors().images.shape == (3, 1, 6, 8, 10)


# ---------------------------------------------------------------------------------------
# bad input in the trustmap layout: errors at open time (CSV) and at load time (files)


def test_corrupt_png_names_file_and_row(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_folder(root)
    data = (root / "images/case1.png").read_bytes()
    (root / "images/case1.png").write_bytes(data[: len(data) // 2])
    ds = FolderDataset(root)  # file problems appear when the file is read
    ds[0]
    with pytest.raises(ValueError, match=r"manifest\.csv row 3: cannot read images/case1\.png: "):
        ds[1]
    loaded = []
    with pytest.raises(ValueError, match=r"row 3: cannot read images/case1\.png"):
        ds.tensors(progress=lambda done, total: loaded.append(done))
    assert loaded == [1]  # stopped at the first bad file


_NOISE = np.random.default_rng(12).integers(0, 256, 600, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("scan.dcm", _NOISE[:400]),
        ("scan.nii.gz", gzip.compress(_NOISE[:500])),
        ("scan.png", b"\x89PNG\r\n\x1a\n" + _NOISE[:64]),
    ],
    ids=["dicom", "nifti", "png"],
)
def test_garbage_files_name_file_and_row(tmp_path: Path, name: str, payload: bytes) -> None:
    root = tmp_path / "ds"
    write_png(root / "ok.png", np.zeros((4, 4), np.uint8))
    (root / name).write_bytes(payload)
    write_csv(root / "manifest.csv", ["image", "label"], [["ok.png", 0], [name, 1]])
    ds = FolderDataset(root)
    with pytest.raises(ValueError, match=rf"manifest\.csv row 3: cannot read {name}: "):
        ds[1]


def test_mask_shape_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_folder(root)
    write_png(root / "masks/case3.png", np.zeros((8, 8), np.uint8))
    ds = FolderDataset(root)
    with pytest.raises(
        ValueError,
        match=r"manifest\.csv row 5: mask masks/case3\.png has shape \(8, 8\) but its image "
        r"images/case3\.png has \(16, 12\)",
    ):
        ds[3]


def test_nan_in_image(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    volume = np.ones((4, 5), np.float32)
    volume[1, 2] = np.nan
    root.mkdir()
    save_map(volume, root / "a.nii.gz")
    write_csv(root / "manifest.csv", ["image", "label"], [["a.nii.gz", 0]])
    with pytest.raises(ValueError, match=r"manifest\.csv row 2: cannot read a\.nii\.gz: .*1 NaN"):
        FolderDataset(root)[0]


def _manifest(root: Path, text: str) -> None:
    (root / "manifest.csv").write_text(text)


@pytest.mark.parametrize(
    ("manifest", "error", "message"),
    [
        ("", ValueError, r"manifest\.csv: is empty \(0 bytes\)"),
        ("image,label,split\n", ValueError, r"manifest\.csv: has a header .* but no data rows"),
        ("image,split\nimages/case0.png,train\n", ValueError, "lacks the required column"),
        (
            "image,label\nimages/case0.png,0\nimages/case1.png,maybe\n",
            ValueError,
            r"manifest\.csv row 3: unknown label 'maybe'; expected 0\.\.\.1 or one of",
        ),
        (
            "image,label\nimages/case0.png,0\nimages/case1.png,2\n",
            ValueError,
            r"row 3: unknown label '2'",
        ),
        (
            "image,label\nimages/case0.png,0\nimages/case1.png,\n",
            ValueError,
            r"row 3: unknown label empty",
        ),
        (
            "image,label\nimages/case0.png,0\nimages/case1.png,1\nimages/case0.png,1\n",
            ValueError,
            r"row 4: image images/case0\.png is listed twice \(also row 2\)",
        ),
        (
            "image,label\nimages/case0.png,0\nother/case0.png,1\n",
            ValueError,
            r"row 3: duplicate id 'case0'",
        ),
        (
            "image,label\nimages/case0.png,0\nimages/nothere.png,1\n",
            FileNotFoundError,
            r"manifest\.csv row 3: image images/nothere\.png does not exist",
        ),
        (
            "image,label,mask\nimages/case0.png,0,masks/gone.png\n",
            FileNotFoundError,
            r"row 2: mask masks/gone\.png does not exist",
        ),
        (
            "image,label,split\nimages/case0.png,0,train\nimages/case1.png,1,holdout\n",
            ValueError,
            r"row 3: unknown split 'holdout'",
        ),
        (
            "image,label,split\nimages/case0.png,0,train\nimages/case1.png,1,\n",
            ValueError,
            r"row 3: empty split while other rows have one",
        ),
    ],
)
def test_manifest_errors_at_open(
    tmp_path: Path, manifest: str, error: type[Exception], message: str
) -> None:
    root = tmp_path / "ds"
    make_folder(root, boxes=False)
    (root / "other").mkdir()
    (root / "other/case0.png").write_bytes((root / "images/case0.png").read_bytes())
    _manifest(root, manifest)
    with pytest.raises(error, match=message):
        FolderDataset(root)


def test_class_names_as_labels_and_boxes_errors(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_folder(root)
    _manifest(
        root,
        "image,label,mask\nimages/case0.png,negative,\nimages/case1.png,Positive,masks/case1.png\n",
    )
    write_csv(root / "boxes.csv", ["image", "x", "y", "width", "height"], [["case1", 1, 1, 2, 2]])
    assert list(FolderDataset(root).labels) == [0, 1]
    write_csv(root / "boxes.csv", ["image", "x", "y", "width", "height"], [["case7", 1, 1, 2, 2]])
    with pytest.raises(ValueError, match=r"boxes\.csv row 2: image 'case7' is not in manifest"):
        FolderDataset(root)
    write_csv(root / "boxes.csv", ["image", "x", "y", "width", "height"], [["case1", 1, "a", 2, 2]])
    with pytest.raises(ValueError, match=r"boxes\.csv row 2: y is 'a', not a number"):
        FolderDataset(root)
    write_csv(root / "boxes.csv", ["image", "x", "y", "width", "height"], [["case1", 1, 1, 0, 2]])
    with pytest.raises(ValueError, match=r"boxes\.csv row 2: box sizes must be positive"):
        FolderDataset(root)
    (root / "boxes.csv").unlink()
    with pytest.raises(ValueError, match=r"ground_truth 'mask\+boxes' but there is no boxes\.csv"):
        FolderDataset(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"dataset\.json: not valid JSON"):
        FolderDataset(root)


# ---------------------------------------------------------------------------------------
# SIIM-ACR


def reference_rle_mask(rle: str, height: int, width: int) -> np.ndarray:
    """Relative starts, pixels numbered down the columns from 0 (spelled out)."""
    mask = np.zeros((height, width), dtype=bool)
    numbers = [int(t) for t in rle.split()]
    position = 0
    for start, length in zip(numbers[0::2], numbers[1::2]):
        position += start
        for p in range(position, position + length):
            mask[p % height, p // height] = True
        position += length
    return mask


def make_siim(root: Path, height: int = 16, width: int = 12) -> dict:
    rng = np.random.default_rng(5)
    uids = [generate_uid() for _ in range(3)]
    pixels = {}
    for k, uid in enumerate(uids):
        image = rng.integers(20, 230, (height, width), dtype=np.uint8)
        # Nested like the challenge: dicom-images-train/<study>/<series>/<uid>.dcm
        write_dicom(root / f"dicom-images-train/study{k}/series{k}/{uid}.dcm", image, uid)
        pixels[uid] = image
    rles = {uids[0]: [" 20 5 30 3", " 100 4"], uids[1]: [" -1"], uids[2]: [" 0 16"]}
    # The challenge's header has a blank before EncodedPixels, as do its values.
    lines = ["ImageId, EncodedPixels"]
    for uid in uids:
        lines += [f"{uid},{text}" for text in rles[uid]]
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return {"uids": uids, "pixels": pixels, "rles": rles}


def test_siim_dicom_and_run_length_masks(tmp_path: Path) -> None:
    written = make_siim(tmp_path / "siim")
    ds = open_dataset(tmp_path / "siim")
    assert isinstance(ds, SIIMDataset)
    uids = written["uids"]
    assert ds.ids == uids
    assert list(ds.labels) == [1, 0, 1]
    assert ds.splits is None and ds.ground_truth == "mask"
    for k, uid in enumerate(uids):
        sample = ds[k]
        assert sample.image.shape == (1, 16, 12)
        np.testing.assert_allclose(
            sample.image[0].numpy(), minmax(written["pixels"][uid]), atol=1e-6
        )
        expected = np.zeros((16, 12), dtype=bool)
        for text in written["rles"][uid]:
            if text.strip() != "-1":
                expected |= reference_rle_mask(text, 16, 12)
        np.testing.assert_array_equal(sample.mask.numpy(), expected)
        assert sample.meta["spacing"] == (0.5, 0.25)
        assert sample.meta["path"].endswith(f"{uid}.dcm")
    # The two rows of the first image are unioned: 5 + 3 + 4 pixels.
    assert int(ds[0].mask.sum()) == 12
    assert ds[0].meta["rows"] == (2, 3) and ds[2].meta["row"] == 5
    assert not ds[1].mask.any()
    assert ds[2].mask[:, 0].all() and ds[2].mask.sum() == 16  # the whole first column
    parts = ds.split_indices(seed=1)
    assert sum(len(v) for v in parts.values()) == 3


def test_siim_errors(tmp_path: Path) -> None:
    root = tmp_path / "siim"
    written = make_siim(root)
    uids = written["uids"]
    csv_path = root / "train-rle.csv"
    good = csv_path.read_text()
    # Running past the 16x12 image (192 pixels) is found when the image is read.
    csv_path.write_text(good + f"{uids[2]}, 180 20\n")
    ds = SIIMDataset(root)
    with pytest.raises(
        ValueError,
        match=rf"train-rle\.csv row 6 \(ImageId {uids[2]}, image .*\): RLE pair 1 \(numbers 1-2\) "
        r"covers pixels 180-199, past the last pixel 191 of a 16x12 image",
    ):
        ds[2]
    csv_path.write_text(good + f"{uids[2]}, 4 x\n")
    with pytest.raises(ValueError, match=r"train-rle\.csv row 6 \(ImageId .*\): RLE number 2"):
        SIIMDataset(root)
    csv_path.write_text(good + "1.2.3.4, -1\n")
    with pytest.raises(FileNotFoundError, match=r"train-rle\.csv row 6: no DICOM file 1\.2\.3\.4"):
        SIIMDataset(root)
    skipping = SIIMDataset(root, missing="skip")
    assert len(skipping) == 3 and skipping.skipped == ["1.2.3.4"]
    csv_path.write_text("ImageId, EncodedPixels\n")
    with pytest.raises(ValueError, match=r"train-rle\.csv: has a header .* but no data rows"):
        SIIMDataset(root)
    csv_path.write_text(good)
    dicom = next(root.rglob(f"{uids[1]}.dcm"))
    dicom.write_bytes(_NOISE[:300])
    with pytest.raises(ValueError, match=rf"train-rle\.csv row 4: cannot read .*{uids[1]}\.dcm"):
        SIIMDataset(root)[1]


def test_siim_resize(tmp_path: Path) -> None:
    make_siim(tmp_path / "siim")
    ds = SIIMDataset(tmp_path / "siim", size=8)
    sample = ds[0]
    assert sample.image.shape == (1, 8, 8) and sample.mask.shape == (8, 8)
    assert sample.meta["spacing"] == (1.0, 0.375)


# ---------------------------------------------------------------------------------------
# RSNA


def make_rsna(root: Path) -> dict:
    rng = np.random.default_rng(7)
    pixels = {}
    for pid in ("pa", "pb", "pc"):
        image = rng.integers(0, 4096, (20, 24), dtype=np.uint16)
        write_dicom(
            root / f"stage_2_train_images/{pid}.dcm",
            image,
            generate_uid(),
            BitsStored=12,
            HighBit=11,
        )
        pixels[pid] = image
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\n"
        "pa,2.0,3.0,5.0,4.0,1\n"
        "pb,,,,,0\n"
        "pa,10.0,12.0,20.0,20.0,1\n"
        "pc,0,0,1,1,1\n"
    )
    return pixels


def test_rsna_boxes_and_masks(tmp_path: Path) -> None:
    pixels = make_rsna(tmp_path / "rsna")
    ds = open_dataset(tmp_path / "rsna")
    assert isinstance(ds, RSNADataset)
    assert ds.ids == ["pa", "pb", "pc"] and list(ds.labels) == [1, 0, 1]
    assert ds.ground_truth == "boxes"
    a = ds[0]
    assert a.boxes == ((2.0, 3.0, 5.0, 4.0), (10.0, 12.0, 20.0, 20.0))
    expected = np.zeros((20, 24), dtype=bool)
    expected[3:7, 2:7] = True
    expected[12:20, 10:24] = True  # the second box is clipped at the bottom and right
    np.testing.assert_array_equal(a.mask.numpy(), expected)
    np.testing.assert_allclose(a.image[0].numpy(), minmax(pixels["pa"]), atol=1e-6)
    b = ds[1]
    assert b.boxes == () and not b.mask.any() and b.label == 0
    assert ds[2].mask.sum() == 1 and ds[2].mask[0, 0]
    assert a.meta["rows"] == (2, 4)
    small = RSNADataset(tmp_path / "rsna", size=(10, 12))[0]
    assert small.boxes == ((1.0, 1.5, 2.5, 2.0), (5.0, 6.0, 10.0, 10.0))
    np.testing.assert_array_equal(small.mask.numpy(), boxes_to_mask(small.boxes, 10, 12))
    data = ds.tensors()
    assert data.boxes[0] == list(a.boxes) and data.boxes[1] == []
    assert data.has_mask.tolist() == [True, True, True]


def test_rsna_errors(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    make_rsna(root)
    labels = root / "stage_2_train_labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\npa,1,1,2,2,1\npb,,,,,yes\n")
    with pytest.raises(ValueError, match=r"stage_2_train_labels\.csv row 3: Target is 'yes'"):
        RSNADataset(root)
    labels.write_bytes(b"")
    with pytest.raises(ValueError, match=r"stage_2_train_labels\.csv: is empty \(0 bytes\)"):
        RSNADataset(root)
    labels.write_text("patientId,x,y,width,height,Target\npz,,,,,0\n")
    with pytest.raises(FileNotFoundError, match=r"row 2: no DICOM file pz\.dcm"):
        RSNADataset(root)


# ---------------------------------------------------------------------------------------
# MedMNIST


def test_medmnist_2d_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 7, 7), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, **arrays)
    ds = open_dataset(path)
    assert isinstance(ds, MedMNISTDataset)
    assert ds.name == "pneumoniamnist" and len(ds) == 10 and ds.ground_truth == "none"
    assert ds.classes == ("0", "1") and (ds.spatial_dims, ds.in_channels) == (2, 1)
    assert list(ds.splits) == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    np.testing.assert_array_equal(
        ds.labels, np.concatenate([arrays[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    )
    sample = ds[6]
    assert sample.meta["id"] == "val_1" and sample.meta["row"] == 1 and sample.mask is None
    np.testing.assert_allclose(sample.image[0].numpy(), arrays["val_images"][1] / 255, atol=1e-6)
    test = ds.tensors("test")
    assert test.images.shape == (3, 1, 7, 7) and not test.has_mask.any()
    assert test.ids == ["test_0", "test_1", "test_2"]
    # Opening the folder finds the one .npz in it.
    assert len(open_dataset(tmp_path)) == 10


def test_medmnist_colour_3d_and_multilabel(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    colour = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "derma.npz", train_images=colour, train_labels=np.array([[0], [6], [2], [1]])
    )
    ds = MedMNISTDataset(tmp_path / "derma.npz")
    assert ds.in_channels == 3 and ds.spatial_dims == 2 and len(ds.classes) == 7
    np.testing.assert_allclose(ds[1].image.numpy(), np.moveaxis(colour[1], -1, 0) / 255, atol=1e-6)
    assert ds.splits is not None and set(ds.splits) == {"train"}

    volumes = rng.integers(0, 256, (3, 4, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "organ3d.npz", test_images=volumes, test_labels=np.array([[1], [0], [2]]))
    vol = MedMNISTDataset(tmp_path / "organ3d.npz", classes=["a", "b", "c"])
    assert vol.spatial_dims == 3 and vol[0].image.shape == (1, 4, 6, 6)

    multi = rng.integers(0, 2, (4, 14))
    np.savez(tmp_path / "chest.npz", train_images=colour[..., 0], train_labels=multi)
    with pytest.raises(ValueError, match="multi-label with 14 columns; pass label_column"):
        MedMNISTDataset(tmp_path / "chest.npz")
    chest = MedMNISTDataset(tmp_path / "chest.npz", label_column=3)
    np.testing.assert_array_equal(chest.labels, multi[:, 3])


def test_medmnist_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "odd.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"odd\.npz: has none of the MedMNIST arrays"):
        MedMNISTDataset(tmp_path / "odd.npz")
    np.savez(tmp_path / "half.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="has train arrays but no train_labels"):
        MedMNISTDataset(tmp_path / "half.npz")
    np.savez(
        tmp_path / "short.npz", train_images=np.zeros((2, 4, 4)), train_labels=np.zeros((3, 1))
    )
    with pytest.raises(ValueError, match="2 images but train_labels 3 labels"):
        MedMNISTDataset(tmp_path / "short.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04" + _NOISE[:100])
    with pytest.raises(ValueError, match=r"bad\.npz: not a readable \.npz file"):
        MedMNISTDataset(tmp_path / "bad.npz")
    images = np.ones((3, 4, 4), np.float32)
    images[1, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", val_images=images, val_labels=np.zeros((3, 1), np.int64))
    ds = MedMNISTDataset(tmp_path / "nan.npz")
    ds[0]
    with pytest.raises(ValueError, match=r"nan\.npz val_images\[1\]: contains NaN"):
        ds[1]


# ---------------------------------------------------------------------------------------
# NIfTI image/mask pairs


def make_pairs(root: Path, labels_csv: str | None = None) -> list[np.ndarray]:
    """images/subK.nii.gz with masks/subK.nii.gz; subjects 1 and 2 have a lesion."""
    rng = np.random.default_rng(11)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    masks = []
    for i in range(4):
        mask = np.zeros((5, 6, 7), np.float32)
        if i in (1, 2):
            mask[1:3, 2:4, 2 + i : 5] = 2.0  # a label value other than 1 still counts
        save_map(rng.normal(50, 10, (5, 6, 7)).astype(np.float32), root / f"images/sub{i}.nii.gz")
        save_map(mask, root / f"masks/sub{i}.nii.gz")
        masks.append(mask)
    if labels_csv:
        (root / "labels.csv").write_text(labels_csv)
    return masks


def test_nifti_pairs_labels_from_masks(tmp_path: Path) -> None:
    masks = make_pairs(tmp_path / "brains")
    ds = open_dataset(tmp_path / "brains")
    assert isinstance(ds, NiftiPairsDataset)
    assert ds.ids == ["sub0", "sub1", "sub2", "sub3"]
    assert list(ds.labels) == [0, 1, 1, 0] and ds.splits is None
    assert ds.spatial_dims == 3 and ds.ground_truth == "mask"
    sample = ds[2]
    np.testing.assert_array_equal(sample.mask.numpy(), masks[2] > 0)
    image = sample.image[0].numpy()
    assert abs(image.mean()) < 1e-5 and abs(image.std() - 1) < 1e-4  # zscore
    assert sample.meta["row"] is None


def test_nifti_pairs_with_labels_csv_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "brains"
    make_pairs(
        root,
        "image,label,split\nsub0.nii.gz,1,train\nsub1,0,train\nsub2,1,val\nsub3,0,test\n",
    )
    ds = NiftiPairsDataset(root)
    assert list(ds.labels) == [1, 0, 1, 0]
    assert list(ds.splits) == ["train", "train", "val", "test"]
    assert ds[1].meta["row"] == 3
    # A mask of another size: file and row named.
    save_map(np.zeros((5, 6, 8), np.float32), root / "masks/sub1.nii.gz")
    with pytest.raises(
        ValueError,
        match=r"labels\.csv row 3 \(images/sub1\.nii\.gz\): mask masks/sub1\.nii\.gz has shape "
        r"\(5, 6, 8\) but its image images/sub1\.nii\.gz has \(5, 6, 7\)",
    ):
        ds[1]
    (root / "labels.csv").write_text("image,label\nsub0,1\nsub1,0\nsub2,1\nsub3,0\nsub1,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv row 6: duplicate id 'sub1' \(also row 3\)"):
        NiftiPairsDataset(root)
    (root / "labels.csv").write_text("image,label\nsub0,1\nsub1,0\nsub2,1\nsub3,sick\n")
    with pytest.raises(ValueError, match=r"labels\.csv row 5: unknown label 'sick'"):
        NiftiPairsDataset(root)
    (root / "labels.csv").write_text("image,label\nsub0,1\nsub1,0\nsub2,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv: has no row for image sub3"):
        NiftiPairsDataset(root)
    (root / "labels.csv").write_text("image,label\nsub0,1\nsub1,0\nsub2,1\nsub3,0\nsub9,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv row 6: image 'sub9' is not in images/"):
        NiftiPairsDataset(root)
    (root / "labels.csv").unlink()
    (root / "masks/sub3.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/sub3\.nii\.gz: has no mask"):
        NiftiPairsDataset(root)


def test_nifti_pairs_2d_slices(tmp_path: Path) -> None:
    root = tmp_path / "ct"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.arange(20, dtype=np.float32).reshape(4, 5) - 1000
    mask = np.zeros((4, 5), np.uint8)
    mask[1, 2] = 1
    # NIfTI stores (i, j, k) = (column, row, slice); a 2D slice as (X, Y, 1).
    nib.save(nib.Nifti1Image(image.T[:, :, None], np.eye(4)), root / "images/a.nii.gz")
    nib.save(nib.Nifti1Image(mask.T[:, :, None], np.eye(4)), root / "masks/a.nii.gz")
    ds = NiftiPairsDataset(root, intensity={"kind": "window", "center": -990, "width": 20})
    assert ds.spatial_dims == 2 and list(ds.labels) == [1]
    sample = ds[0]
    np.testing.assert_allclose(sample.image[0].numpy(), np.clip((image + 1000) / 20, 0, 1))
    np.testing.assert_array_equal(sample.mask.numpy(), mask > 0)


# ---------------------------------------------------------------------------------------
# layout detection


def test_detection_and_unknown_layouts(tmp_path: Path) -> None:
    make_folder(tmp_path / "a")
    make_siim(tmp_path / "b")
    make_rsna(tmp_path / "c")
    make_pairs(tmp_path / "d")
    assert [detect_kind(tmp_path / x) for x in "abcd"] == ["folder", "siim", "rsna", "nifti"]
    (tmp_path / "e").mkdir()
    (tmp_path / "e/readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a recognised dataset layout"):
        open_dataset(tmp_path / "e")
    np.savez(tmp_path / "e/one.npz", train_images=np.zeros((1, 2, 2)), train_labels=[[0]])
    np.savez(tmp_path / "e/two.npz", train_images=np.zeros((1, 2, 2)), train_labels=[[0]])
    with pytest.raises(ValueError, match=r"holds 2 \.npz files"):
        open_dataset(tmp_path / "e")
    # kind= overrides the detection: the SIIM folder read as a plain folder fails clearly.
    with pytest.raises(FileNotFoundError, match=r"has no manifest\.csv"):
        open_dataset(tmp_path / "b", kind="folder")
    with pytest.raises(ValueError, match="unknown dataset kind 'dicom'"):
        open_dataset(tmp_path / "b", kind="dicom")
