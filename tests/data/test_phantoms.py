"""Phantom generators: determinism, anatomy-consistent masks, lesion properties, shortcut
tokens, the on-disk layout, atomic writing and bad input. Small sizes keep this fast."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.measure import perimeter

from trustmap.data.io import load
from trustmap.data.phantoms import (
    PHANTOMS,
    cxr,
    generate,
    get_spec,
    make_dataset,
    writer,
)
from trustmap.data.phantoms import _anatomy_cxr as anatomy
from trustmap.data.phantoms._common import (
    IMAGE,
    assign_splits,
    fill_polygon,
    labels_for,
    min_n,
    stream,
)
from trustmap.data.phantoms.mri_brain import nilearn_available
from trustmap.data.phantoms.shortcut import CORNERS, letter_bitmap

SMALL = {"cxr-pneumothorax": 64, "cxr-pneumonia": 64, "ct-nodule": 32, "mri-brain-3d": 24}


def _cases(name, indices, **kw):
    kw.setdefault("size", SMALL[name])
    if name == "mri-brain-3d":
        kw.setdefault("template", "procedural")
    return list(generate(name, indices=indices, **kw))


def _same(a, b) -> bool:
    return (
        a.image.dtype == b.image.dtype
        and np.array_equal(a.image, b.image)
        and np.array_equal(a.mask, b.mask)
        and a.label == b.label
        and a.boxes == b.boxes
        and (a.token_mask is None) == (b.token_mask is None)
        and (a.token_mask is None or np.array_equal(a.token_mask, b.token_mask))
    )


# ---------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("name", PHANTOMS)
def test_same_seed_gives_identical_arrays_and_different_seeds_differ(name):
    first = _cases(name, [0, 1, 2, 3], seed=7, shortcut=0.5)
    again = _cases(name, [0, 1, 2, 3], seed=7, shortcut=0.5)
    other = _cases(name, [0, 1, 2, 3], seed=8, shortcut=0.5)
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(first, other))
    # Different cases of one seed differ as well.
    assert not np.array_equal(first[0].image, first[1].image)


def test_a_case_regenerates_alone_and_does_not_depend_on_n():
    run = list(generate("ct-nodule", 12, size=32, seed=3, shortcut=0.7))
    alone = _cases("ct-nodule", [9], seed=3, shortcut=0.7)[0]
    assert _same(run[9], alone)
    assert run[9].index == 9


def test_the_token_does_not_change_the_image_outside_it():
    plain = _cases("cxr-pneumonia", [4])[0]
    marked = _cases("cxr-pneumonia", [4], shortcut=0.5)[0]
    outside = ~marked.token_mask
    assert np.array_equal(plain.image[outside], marked.image[outside])
    assert not np.array_equal(plain.image[marked.token_mask], marked.image[marked.token_mask])


def test_worker_count_does_not_change_the_dataset(tmp_path):
    one = make_dataset("ct-nodule", tmp_path / "one", n=60, size=32, seed=1, workers=1)
    two = make_dataset("ct-nodule", tmp_path / "two", n=60, size=32, seed=1, workers=2)
    assert (one / "manifest.csv").read_text() == (two / "manifest.csv").read_text()
    assert (one / "boxes.csv").read_text() == (two / "boxes.csv").read_text()
    for k in (0, 31, 59):
        a = load(one / f"images/{k:05d}.nii.gz").array
        b = load(two / f"images/{k:05d}.nii.gz").array
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------
# Labels and splits


def test_labels_have_the_prevalence_per_block_and_splits_are_stratified():
    labels = labels_for(5, 200, 0.4)
    assert labels.sum() == 80
    assert all(labels[b : b + 20].sum() == 8 for b in range(0, 200, 20))
    splits = assign_splits(5, labels)
    for name, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        part = labels[splits == name]
        assert len(part) == round(frac * 200)
        assert part.sum() == round(frac * 80)
    assert not np.array_equal(assign_splits(6, labels), splits)
    # The smallest allowed n still puts both classes into every split, whatever the seed.
    n = min_n(0.4)
    for seed in range(30):
        lab = labels_for(seed, n, 0.4)
        spl = assign_splits(seed, lab)
        for name in ("train", "val", "test"):
            assert set(lab[spl == name]) == {0, 1}


# ---------------------------------------------------------------------------------------
# Anatomy and lesions


def test_fill_polygon_matches_an_analytic_disc():
    t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    rows, cols = 20 + 11.3 * np.sin(t), 25 + 11.3 * np.cos(t)
    filled = fill_polygon(rows, cols, (48, 48))
    rr, cc = np.mgrid[:48, :48]
    disc = (rr - 20) ** 2 + (cc - 25) ** 2 < 11.3**2
    assert (filled != disc).sum() <= 4  # only pixels on the rim may differ


def _chest(spec, ctx, seed, index):
    """The chest a case was drawn on: its anatomy stream is the first spawned child."""
    anatomy_rng, _, _ = stream(seed, IMAGE, index).spawn(3)
    return anatomy.render_chest(ctx, anatomy_rng)


@pytest.mark.parametrize("name", ["cxr-pneumothorax", "cxr-pneumonia"])
def test_cxr_lesions_lie_inside_the_lungs(name):
    spec = get_spec(name)
    ctx = spec.context(0, (64, 64), 1.0, None)
    cases = [c for c in _cases(name, range(20), seed=2) if c.label == 1]
    assert len(cases) == 8
    for case in cases:
        lungs = _chest(spec, ctx, 2, case.index).lungs
        assert case.mask.sum() >= 6
        assert not (case.mask & ~(lungs[0] | lungs[1])).any()


@pytest.mark.parametrize("name", PHANTOMS)
def test_every_positive_has_a_lesion_mask_even_at_the_smallest_size(name):
    spec = get_spec(name)
    count = 24 if spec.spatial_dims == 2 else 8
    cases = _cases(name, range(count), size=spec.min_size, seed=1, difficulty="hard")
    positives = [c for c in cases if c.label]
    assert positives
    assert all(c.mask.any() and c.boxes for c in positives)
    if name != "ct-nodule":  # benign nodules have masks too; other negatives have none
        assert not any(c.mask.any() for c in cases if not c.label)


def test_pneumothorax_region_has_no_vessel_markings_and_is_lucent_with_a_pleural_line():
    spec = get_spec("cxr-pneumothorax")
    ctx = spec.context(0, (128, 128), 1.0, None)
    for index in range(6):
        anatomy_rng, lesion_rng, _ = stream(4, IMAGE, index).spawn(3)
        chest = anatomy.render_chest(ctx, anatomy_rng)
        mask, added, keep, _ = cxr.pneumothorax(ctx, lesion_rng, chest)
        # The normal lung has markings there; the pneumothorax removes all of them.
        assert chest.vessels[mask].max() > 0.01
        assert np.all(chest.vessels[mask] * keep[mask] == 0)
        # Pleural air makes the region darker, the same case without lesion is brighter
        # there (same anatomy and exposure: the render streams are split).
        pos = spec.render(ctx, stream(4, IMAGE, index), 1)
        neg = spec.render(ctx, stream(4, IMAGE, index), 0)
        assert np.array_equal(pos[1], mask)
        inner = ndimage.binary_erosion(mask, iterations=1)
        assert (pos[0] - neg[0])[inner].mean() < -0.02
        # The visceral pleural line: brighter than the rest of the added density.
        assert added.max() > 0.05 > 0 > added[inner].mean()


def test_pneumonia_boxes_enclose_each_opacity_tightly():
    cases = [c for c in _cases("cxr-pneumonia", range(40), seed=1) if c.label]
    assert any(len(c.boxes) == 2 for c in cases)
    for case in cases:
        assert 1 <= len(case.boxes) <= 2
        covered = np.zeros_like(case.mask)
        for x, y, w, h in case.boxes:
            covered[y : y + h, x : x + w] = True
            inside = case.mask[y : y + h, x : x + w]
            # Tight: the mask touches all four edges of its box.
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
        assert not (case.mask & ~covered).any()
    negatives = [c for c in _cases("cxr-pneumonia", range(10), seed=1) if not c.label]
    assert all(not c.mask.any() and c.boxes == [] for c in negatives)


def test_malignant_nodules_are_more_irregular_than_benign_ones():
    cases = list(generate("ct-nodule", 60, size=64, seed=0))
    score = {0: [], 1: []}
    for case in cases:
        # Isoperimetric ratio perimeter^2 / (4 pi area): 1 for a disc, larger if irregular.
        score[case.label].append(perimeter(case.mask) ** 2 / (4 * np.pi * case.mask.sum()))
        # Every patch has its nodule at (or near) the centre, in HU.
        rows, cols = np.nonzero(case.mask)
        assert abs(rows.mean() - 31.5) < 6 and abs(cols.mean() - 31.5) < 6
    assert np.median(score[1]) > np.median(score[0]) + 0.1
    benign, malignant = np.array(score[0]), np.array(score[1])
    pairs = (malignant[:, None] > benign[None, :]).mean()
    assert pairs > 0.85  # AUC of irregularity for malignancy


def test_ct_values_are_hounsfield_units():
    case = _cases("ct-nodule", [0], size=64)[0]
    assert case.image.dtype == np.int16
    parenchyma = case.image[~ndimage.binary_dilation(case.mask, iterations=4)]
    assert -950 < np.median(parenchyma) < -700
    assert np.median(case.image[case.mask]) > -200


@pytest.mark.parametrize(
    "template",
    [
        "procedural",
        pytest.param(
            "mni152",
            marks=pytest.mark.skipif(not nilearn_available(), reason="nilearn not installed"),
        ),
    ],
)
def test_mri_lesions_are_hyperintense_and_inside_the_head(template):
    cases = list(generate("mri-brain-3d", 8, size=32, seed=0, template=template))
    kinds = set()
    for case in cases:
        assert case.image.shape == (32, 32, 32) and case.image.dtype == np.int16
        head = case.image > 0
        assert head.mean() > 0.2
        if case.label:
            kinds.add(case.lesion_type)
            assert case.mask.any()
            assert not (case.mask & ~ndimage.binary_erosion(head, iterations=1)).any()
            brain = ndimage.binary_erosion(head, iterations=3) & ~case.mask
            assert np.median(case.image[case.mask]) > np.median(case.image[brain])
            covered = np.zeros_like(case.mask)
            for x, y, w, h, z, d in case.boxes:
                covered[z : z + d, y : y + h, x : x + w] = True
            assert not (case.mask & ~covered).any()
        else:
            assert not case.mask.any() and case.boxes == []
    assert {"tumour", "ms"} <= kinds


def test_template_auto_falls_back_to_the_procedural_head(monkeypatch):
    from trustmap.data.phantoms import mri_brain

    monkeypatch.setattr(mri_brain, "nilearn_available", lambda: False)
    assert mri_brain.resolve_template("auto") == "procedural"
    with pytest.raises(ValueError, match="needs nilearn"):
        mri_brain.resolve_template("mni152")
    with pytest.raises(ValueError, match="template must be one of"):
        mri_brain.resolve_template("colin27")


def test_harder_difficulty_gives_smaller_fainter_lesions():
    def area(level):
        cases = _cases("cxr-pneumothorax", range(20), seed=0, difficulty=level)
        return np.mean([c.mask.sum() for c in cases if c.label])

    assert area("easy") > 1.3 * area("hard")


# ---------------------------------------------------------------------------------------
# Shortcut token


def test_token_corner_agrees_with_the_label_at_the_requested_rate():
    cases = list(generate("ct-nodule", 400, size=32, seed=11, shortcut=0.9))
    agree = np.array([c.token_agrees for c in cases])
    # Binomial(400, 0.9): standard deviation 0.015; 4 sigma.
    assert abs(agree.mean() - 0.9) < 0.06
    for case in cases[:60]:
        cols = np.nonzero(case.token_mask)[1]
        corner = "top-left" if cols.mean() < 16 else "top-right"
        expected = CORNERS[case.label if case.token_agrees else 1 - case.label][0]
        assert corner == expected
        assert np.nonzero(case.token_mask)[0].mean() < 16  # top half
        assert not (case.mask & case.token_mask).any()
    always = list(generate("ct-nodule", 40, size=32, seed=11, shortcut=1.0))
    never = list(generate("ct-nodule", 40, size=32, seed=11, shortcut=0.0))
    assert all(c.token_agrees for c in always) and not any(c.token_agrees for c in never)


@pytest.mark.parametrize("side", [5, 6, 9, 14])
def test_token_letters_keep_their_strokes_at_small_sizes(side):
    ell = letter_bitmap("L", side, side)
    assert ell[:, 0].all() and ell[-1].all() and not ell[: side // 2, side // 2 :].any()
    arr = letter_bitmap("R", side, side)
    assert arr[:, 0].all() and arr[0, 0] and not arr[0, -1] and arr[-1, -1]
    assert not np.array_equal(ell, arr)


def test_mri_token_is_a_slab_in_a_corner():
    case = _cases("mri-brain-3d", [1], shortcut=1.0)[0]
    z = np.nonzero(case.token_mask.any(axis=(1, 2)))[0]
    assert 3 <= len(z) < 24
    assert np.all(case.image[case.token_mask] > 0)


# ---------------------------------------------------------------------------------------
# The written layout


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_make_dataset_writes_the_layout(tmp_path):
    out = make_dataset("cxr-pneumonia", tmp_path / "pna", n=20, size=64, seed=3, shortcut=0.8)
    card = json.loads((out / "dataset.json").read_text())
    for key in (
        "name", "format_version", "classes", "spatial_dims", "in_channels", "image_size",
        "modality", "intensity", "ground_truth", "generator", "counts", "measured_auc",
    ):  # fmt: skip
        assert key in card
    assert card["name"] == "cxr-pneumonia" and card["format_version"] == 1
    assert card["ground_truth"] == "mask+boxes" and card["image_size"] == [64, 64]
    assert card["generator"]["seed"] == 3 and card["generator"]["n"] == 20
    assert sum(sum(c.values()) for c in card["counts"].values()) == 20
    assert all(c["0"] > 0 and c["1"] > 0 for c in card["counts"].values())
    assert card["shortcut"]["p"] == 0.8 and 0 <= card["shortcut"]["agreement_rate"] <= 1
    assert card["measured_auc"] is None
    markdown = (out / "DATASET_CARD.md").read_text()
    assert "cxr-pneumonia" in markdown and "agreement rate" in markdown

    rows = _read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["image", "label", "split", "mask", "token_mask", "lesion_type"]
    assert len(rows) == 20
    boxes = _read_csv(out / "boxes.csv")
    assert boxes and list(boxes[0]) == ["image", "x", "y", "width", "height"]
    expected = {c.index: c for c in _cases("cxr-pneumonia", range(20), seed=3, shortcut=0.8)}
    for k, row in enumerate(rows):
        case = expected[k]
        assert int(row["label"]) == case.label and row["split"] in ("train", "val", "test")
        image = load(out / row["image"]).array
        assert np.array_equal(image, case.image)
        token = np.asarray(Image.open(out / row["token_mask"]))
        assert set(np.unique(token)) == {0, 255}
        assert np.array_equal(token > 0, case.token_mask)
        if case.label:
            mask = np.asarray(Image.open(out / row["mask"]))
            assert np.array_equal(mask > 0, case.mask) and row["lesion_type"]
            mine = [
                tuple(int(b[c]) for c in ("x", "y", "width", "height"))
                for b in boxes
                if b["image"] == row["image"]
            ]
            assert mine == case.boxes
        else:
            assert row["mask"] == "" and row["lesion_type"] == ""
    preview = Image.open(out / "preview.png")
    assert preview.size[0] > 400 and preview.size[1] > 400
    assert not list(tmp_path.glob(".*"))  # no temporary directory left


def test_nifti_layout_keeps_hounsfield_units_and_spacing(tmp_path):
    out = make_dataset("ct-nodule", tmp_path / "ct", n=20, size=32, seed=0)
    card = json.loads((out / "dataset.json").read_text())
    assert card["intensity"] == {"kind": "window", "center": -600, "width": 1500}
    assert card["spacing"] == [45 / 32, 45 / 32]
    rows = _read_csv(out / "manifest.csv")
    first = _cases("ct-nodule", [0], seed=0)[0]
    loaded = load(out / rows[0]["image"])
    assert np.array_equal(loaded.array, first.image.astype(np.float32))
    assert loaded.spacing == pytest.approx((45 / 32, 45 / 32))
    mask = load(out / rows[0]["mask"]).array
    assert np.array_equal(mask > 0, first.mask)
    # Every nodule patch has a mask, benign ones too.
    assert all(r["mask"] for r in rows)


def test_mri_card_records_the_template_and_3d_boxes(tmp_path):
    out = make_dataset("mri-brain-3d", tmp_path / "mr", n=20, size=24, template="procedural")
    card = json.loads((out / "dataset.json").read_text())
    assert card["generator"]["template"] == "procedural" and card["spatial_dims"] == 3
    assert card["intensity"] == {"kind": "zscore"}
    header = (out / "boxes.csv").read_text().splitlines()[0]
    assert header == "image,x,y,width,height,z,depth"
    rows = _read_csv(out / "manifest.csv")
    loaded = load(out / rows[0]["image"])
    first = _cases("mri-brain-3d", [0], size=24)[0]
    assert np.array_equal(loaded.array, first.image.astype(np.float32))
    assert loaded.spacing == pytest.approx((8.0, 8.0, 8.0))  # 192 mm / 24


def test_the_dataset_reads_back_through_the_folder_loader(tmp_path):
    loaders = pytest.importorskip("trustmap.data.loaders")
    out = make_dataset("cxr-pneumothorax", tmp_path / "ptx", n=20, size=64, shortcut=0.5)
    dataset = loaders.FolderDataset(out)
    assert len(dataset) == 20 and dataset.ground_truth == "mask"
    case = _cases("cxr-pneumothorax", [6], shortcut=0.5)[0]
    sample = dataset[6]
    assert sample.label == case.label
    assert np.array_equal(sample.mask.numpy(), case.mask)
    assert np.array_equal(sample.token_mask.numpy(), case.token_mask)
    assert np.allclose(sample.image[0].numpy(), case.image / 255.0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Atomic writing


def _boom(*args, **kwargs):
    raise RuntimeError("disk on fire")


def test_a_failure_while_writing_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "render_preview", _boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        make_dataset("ct-nodule", tmp_path / "ct", n=20, size=32)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_leaves_no_directory_and_keeps_an_old_one(tmp_path):
    old = tmp_path / "ct"
    old.mkdir()
    (old / "keep.txt").write_text("old dataset")

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_dataset("ct-nodule", old, n=20, size=32, overwrite=True, progress=interrupt)
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]
    assert (old / "keep.txt").read_text() == "old dataset"
    # Overwriting for real replaces it.
    make_dataset("ct-nodule", old, n=20, size=32, overwrite=True)
    assert not (old / "keep.txt").exists() and (old / "dataset.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]


# ---------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "cxr-pneumotorax"}, "did you mean 'cxr-pneumothorax'"),
        ({"n": 5}, "n=5 is too small"),
        ({"size": 8}, "too small for ct-nodule"),
        ({"size": (32, 32, 32)}, "needs 2 ints"),
        ({"shortcut": 1.5}, r"probability in \[0, 1\]"),
        ({"shortcut": -0.1}, r"probability in \[0, 1\]"),
        ({"difficulty": 0}, "difficulty"),
        ({"difficulty": "impossible"}, "difficulty"),
        ({"seed": -1}, "seed"),
        ({"template": "mni152"}, "mri-brain-3d only"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, message):
    args = {"name": "ct-nodule", "n": 20, "size": 32, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_dataset(args.pop("name"), tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_not_overwritten_silently(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        make_dataset("ct-nodule", full, n=20, size=32)
    assert (full / "x.txt").read_text() == "mine"
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        make_dataset("ct-nodule", afile, n=20, size=32)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_dataset("ct-nodule", empty, n=20, size=32) / "dataset.json").is_file()


def test_lesion_sizes_scale_with_image_size():
    small = _cases("cxr-pneumothorax", range(10), size=64)
    large = _cases("cxr-pneumothorax", range(10), size=128)
    ratio = np.mean([b.mask.sum() for b in large if b.label]) / np.mean(
        [s.mask.sum() for s in small if s.label]
    )
    assert math.isclose(ratio, 4.0, rel_tol=0.2)
