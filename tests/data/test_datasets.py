"""The dataset interface: samples, intensity mappings, resizing, splits, the in-memory
cache, collate, and open_dataset for phantom names (with a stand-in generator)."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from trustmap.data.datasets import (
    ImageDataset,
    Sample,
    collate,
    dataset_cache_dir,
    map_intensity,
    normalize_intensity,
    open_dataset,
    resize_sample,
    stratified_split,
)
from trustmap.data.loaders import FolderDataset


class Toy(ImageDataset):
    """Image i is constant i / 10 with a one-pixel mask at (i % 4, 0) on positives."""

    def __init__(self, labels, splits=None, size=None, bad: int | None = None) -> None:
        self.bad = bad
        self.loads: list[int] = []
        super().__init__(
            name="toy",
            classes=("neg", "pos"),
            spatial_dims=2,
            in_channels=1,
            ground_truth="mask",
            labels=labels,
            ids=[f"t{i}" for i in range(len(labels))],
            splits=splits,
            size=size,
        )

    def _load(self, index: int) -> Sample:
        self.loads.append(index)
        image = torch.full((1, 4, 6), index / 10.0)
        if index == self.bad:
            image[0, 1, 1] = float("nan")
        mask = torch.zeros((4, 6), dtype=torch.bool)
        if self.labels[index]:
            mask[index % 4, 0] = True
        meta = {"id": self.ids[index], "path": "", "split": None, "spacing": None, "row": index}
        return Sample(image, int(self.labels[index]), mask, (), None, meta)


# ---------------------------------------------------------------------------------------
# intensity


def test_intensity_mappings_on_known_numbers() -> None:
    values = np.array([[0.0, 50.0], [100.0, 250.0]])
    np.testing.assert_allclose(
        map_intensity(values, {"kind": "range", "min": 50, "max": 150}),
        [[-0.5, 0.0], [0.5, 2.0]],  # not clipped
    )
    np.testing.assert_allclose(
        map_intensity(values, {"kind": "window", "center": 100, "width": 100}),
        [[0.0, 0.0], [0.5, 1.0]],  # clipped to the window
    )
    np.testing.assert_allclose(map_intensity(values, "minmax"), [[0.0, 0.2], [0.4, 1.0]])
    z = map_intensity(values, {"kind": "zscore"})
    inside = np.array([50.0, 100.0, 250.0])
    expected = (inside - inside.mean()) / inside.std()
    assert z[0, 0] == 0.0  # background stays 0
    np.testing.assert_allclose([z[0, 1], z[1, 0], z[1, 1]], expected, rtol=1e-6)
    assert z.dtype == np.float32
    np.testing.assert_allclose(
        map_intensity(values, "dicom", meta={"window_center": 50.0, "window_width": 100.0}),
        [[0.0, 0.5], [1.0, 1.0]],
    )
    assert not map_intensity(np.full((2, 2), 7.0), "minmax").any()  # flat image: zeros


def test_intensity_errors() -> None:
    with pytest.raises(ValueError, match="unknown intensity kind 'gamma'"):
        normalize_intensity({"kind": "gamma"})
    with pytest.raises(ValueError, match="needs a finite number 'max'"):
        normalize_intensity({"kind": "range", "min": 0})
    with pytest.raises(ValueError, match="max > min"):
        normalize_intensity({"kind": "range", "min": 5, "max": 5})
    with pytest.raises(ValueError, match="width > 0"):
        normalize_intensity({"kind": "window", "center": 0, "width": 0})
    with pytest.raises(ValueError, match="lacks"):
        map_intensity(np.zeros((2, 2)), "dicom", meta={})


# ---------------------------------------------------------------------------------------
# resizing


def test_resize_sample_scales_boxes_spacing_and_masks() -> None:
    mask = torch.zeros((8, 8), dtype=torch.bool)
    mask[2:6, 4:8] = True
    sample = Sample(
        image=torch.arange(64.0).reshape(1, 8, 8),
        label=1,
        mask=mask,
        boxes=((4.0, 2.0, 4.0, 4.0),),
        token_mask=None,
        meta={"id": "a", "spacing": (0.5, 0.25)},
    )
    big = resize_sample(sample, (16, 4))
    assert big.image.shape == (1, 16, 4)
    assert big.boxes == ((2.0, 4.0, 2.0, 8.0),)
    assert big.meta["spacing"] == (0.25, 0.5)
    expected = torch.zeros((16, 4), dtype=torch.bool)
    expected[4:12, 2:4] = True
    assert torch.equal(big.mask, expected)
    # Upsampling a linear ramp bilinearly stays linear away from the borders.
    ramp = Sample(torch.arange(8.0).repeat(8, 1)[None], 0, meta={})
    up = resize_sample(ramp, 16).image[0, 0]
    np.testing.assert_allclose(up[1:-1].numpy(), (np.arange(1, 15) + 0.5) / 2 - 0.5, atol=1e-6)
    assert resize_sample(sample, (8, 8)) is sample


def test_resize_3d() -> None:
    sample = Sample(
        torch.rand(1, 4, 6, 8),
        0,
        torch.ones((4, 6, 8), dtype=torch.bool),
        ((1.0, 2.0, 3.0, 2.0, 1.0, 2.0),),
        meta={"spacing": (2.0, 1.0, 1.0)},
    )
    out = resize_sample(sample, (8, 3, 4))
    assert out.image.shape == (1, 8, 3, 4) and out.mask.all()
    assert out.boxes == ((0.5, 1.0, 1.5, 1.0, 2.0, 4.0),)
    assert out.meta["spacing"] == (1.0, 2.0, 2.0)


# ---------------------------------------------------------------------------------------
# splits, subsets, cache


def test_stratified_split_proportions_and_determinism() -> None:
    labels = np.array([0] * 60 + [1] * 40)
    parts = stratified_split(labels, seed=3)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100))
    counts = {k: np.bincount(labels[v], minlength=2).tolist() for k, v in parts.items()}
    assert counts == {"train": [48, 32], "val": [6, 4], "test": [6, 4]}
    again = stratified_split(labels, seed=3)
    other = stratified_split(labels, seed=4)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(parts["val"], other["val"])
    assert len(stratified_split(labels, fractions=(1.0, 0.0, 0.0))["train"]) == 100
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="three non-negative"):
        stratified_split(labels, fractions=(1.2, -0.2, 0.0))


def test_split_indices_prefers_the_source_split() -> None:
    ds = Toy([0, 1, 0, 1], splits=["test", "train", "train", "val"])
    parts = ds.split_indices(seed=9)
    assert {k: v.tolist() for k, v in parts.items()} == {
        "train": [1, 2],
        "val": [3],
        "test": [0],
    }
    assert ds.counts() == {
        "train": {"0": 1, "1": 1},
        "val": {"0": 0, "1": 1},
        "test": {"0": 1, "1": 0},
    }
    no_split = Toy([0, 1] * 10)
    assert no_split.counts() == {"all": {"0": 10, "1": 10}}
    val = no_split.subset("val")
    assert set(val.splits) == {"val"}
    np.testing.assert_array_equal(np.sort(val.labels), [0, 1])  # one of each class


def test_tensors_loads_once_and_subsets_reuse_it() -> None:
    ds = Toy([0, 1, 1, 0, 1])
    sub = ds.subset([4, 1])
    sub_data = sub.tensors()  # before the parent: loads its own two samples
    assert ds.loads == [4, 1]
    np.testing.assert_array_equal(sub_data.indices, [0, 1])
    data = ds.tensors()
    assert ds.loads == [4, 1, 0, 1, 2, 3, 4]
    assert ds.tensors() is data and ds.loads[-1] == 4 and len(ds.loads) == 7
    assert data.images.shape == (5, 1, 4, 6) and data.labels.tolist() == [0, 1, 1, 0, 1]
    assert torch.allclose(data.images[:, 0, 0, 0], torch.arange(5) / 10.0)
    assert data.masks[2, 0, 2, 0] == 1 and data.masks.sum() == 3
    assert data.has_mask.all() and data.token_masks is None
    later = ds.subset([3, 0])
    assert torch.equal(later.tensors().images, data.images[[3, 0]])
    assert len(ds.loads) == 7  # served from the parent's cache
    boolean = ds.tensors(np.array([True, False, False, False, True]))
    assert boolean.ids == ["t0", "t4"]
    with pytest.raises(IndexError):
        ds.subset([5])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ds.subset("dev")


def test_sample_checks_and_resize_in_getitem() -> None:
    with pytest.raises(ValueError, match=r"sample 2, row 2 \(t2\): image contains NaN"):
        Toy([0, 1, 0], bad=2)[2]
    with pytest.raises(ValueError, match=r"row 1 \(t1\): image contains NaN"):
        Toy([0, 1, 0], bad=1).tensors()
    resized = Toy([0, 1], size=(8, 12))[1]
    assert resized.image.shape == (1, 8, 12) and resized.mask.shape == (8, 12)
    assert resized.mask.sum() == 4  # one pixel became 2x2
    with pytest.raises(TypeError):
        Toy([0, 1])["a"]  # type: ignore[index]
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.\.1"):
        Toy([0, 2])


def test_collate_shapes_and_mismatch() -> None:
    a = Sample(torch.zeros(1, 3, 3), 0, None, (), None, {"id": "a"})
    b = Sample(
        torch.ones(1, 3, 3),
        1,
        torch.ones(3, 3, dtype=torch.bool),
        ((0.0, 0.0, 1.0, 1.0),),
        torch.zeros(3, 3, dtype=torch.bool),
        {"id": "b"},
    )
    batch = collate([a, b])
    assert batch["images"].shape == (2, 1, 3, 3)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [0, 1]
    assert batch["has_mask"].tolist() == [False, True]
    assert batch["masks"][0].sum() == 0 and batch["masks"][1].sum() == 9
    assert batch["token_masks"].shape == (2, 1, 3, 3)
    assert batch["boxes"] == [[], [(0.0, 0.0, 1.0, 1.0)]] and batch["ids"] == ["a", "b"]
    c = Sample(torch.zeros(1, 4, 3), 0, meta={"id": "c"})
    with pytest.raises(ValueError, match=r"shapes \(1, 3, 3\) \(a\) and \(1, 4, 3\) \(c\).*size="):
        collate([a, c])
    with pytest.raises(ValueError, match="at least one"):
        collate([])


# ---------------------------------------------------------------------------------------
# open_dataset with phantom names


def _fake_phantoms(calls: list) -> types.ModuleType:
    """Stands in for trustmap.data.phantoms: writes a two-image layout."""
    from PIL import Image

    module = types.ModuleType("trustmap.data.phantoms")
    module.PHANTOMS = ("cxr-pneumothorax", "ct-nodule")

    def make_dataset(name, out, *, seed=0, size=None, **kwargs):
        calls.append((name, Path(out), seed, size, kwargs))
        out = Path(out)
        (out / "images").mkdir(parents=True)
        side = size or 8
        rows = []
        for i in range(2):
            Image.fromarray(np.full((side, side), 100 * i + seed, np.uint8)).save(
                out / f"images/p{i}.png"
            )
            rows.append([f"images/p{i}.png", i, "train"])
        with open(out / "manifest.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([["image", "label", "split"], *rows])
        card = {
            "name": name,
            "format_version": 1,
            "classes": ["negative", "positive"],
            "spatial_dims": 2,
            "in_channels": 1,
            "intensity": {"kind": "range", "min": 0, "max": 255},
            "ground_truth": "none",
        }
        (out / "dataset.json").write_text(json.dumps(card))
        return out

    module.make_dataset = make_dataset
    return module


def test_open_phantom_generates_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "trustmap.data.phantoms", _fake_phantoms(calls))
    monkeypatch.setenv("TRUSTMAP_CACHE", str(tmp_path / "cache"))
    ds = open_dataset("cxr-pneumothorax")
    assert isinstance(ds, FolderDataset) and ds.name == "cxr-pneumothorax"
    assert len(calls) == 1
    name, out, seed, size, extra = calls[0]
    assert (name, seed, size, extra) == ("cxr-pneumothorax", 0, None, {})
    assert out == dataset_cache_dir("cxr-pneumothorax")
    assert out.parent == tmp_path / "cache" / "datasets"
    assert out.name.startswith("cxr-pneumothorax-")
    assert ds.root == out
    assert ds[1].image.shape == (1, 8, 8) and float(ds[1].image.max()) == pytest.approx(100 / 255)

    again = open_dataset("cxr-pneumothorax")
    assert len(calls) == 1 and again.root == out  # reused, not regenerated

    other = open_dataset("cxr-pneumothorax", seed=1, size=4)
    assert len(calls) == 2 and other.root != out
    assert calls[1][2:4] == (1, 4)
    assert other[0].image.shape == (1, 4, 4)
    assert dataset_cache_dir("cxr-pneumothorax", seed=0) == out  # seed 0 is the default
    assert dataset_cache_dir("cxr-pneumothorax", cache_dir=tmp_path / "x").parent == (
        tmp_path / "x" / "datasets"
    )


def test_open_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trustmap.data.phantoms", _fake_phantoms([]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"'cxr-pneumothoraks' is neither an existing path nor a phantom dataset; "
        r"phantom datasets: cxr-pneumothorax, ct-nodule",
    ):
        open_dataset("cxr-pneumothoraks")
    with pytest.raises(TypeError, match="unknown phantom parameter"):
        dataset_cache_dir("ct-nodule", colour=True)
