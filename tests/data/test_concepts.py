"""Concept masks of the phantoms (for network dissection): exact, and free of side effects."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from trustmap.data.io import load
from trustmap.data.phantoms import generate, make_dataset

# sha256 (first 32 hex digits) of the images, lesion masks and token masks of cases 0-5
# (seed 3), computed with generator version 1, before the phantoms emitted concept masks.
# Adding the masks must not have changed a single pixel: they draw nothing from the RNG.
VERSION_1 = {
    ("cxr-pneumothorax", 64, None): "5af156a8b6a3ffde79a08ab2ff3659ea",
    ("cxr-pneumothorax", 64, 0.9): "57e71eea83504df7e6b124494f015e2f",
    ("cxr-pneumonia", 64, None): "ed79efe4d07490a1ed2ca4b22eff4828",
    ("cxr-pneumonia", 64, 0.9): "503e78cfababfdf61c29a09f1e7ef07c",
    ("ct-nodule", 48, None): "4d620de2089652ccd684c9a03bba215b",
    ("ct-nodule", 48, 0.9): "3a3a0c32e4849a27b48e0b39967c81c6",
    ("mri-brain-3d", 24, None): "3862998669fa43572b320e9d3ff9d70a",
    ("mri-brain-3d", 24, 0.9): "4bd31cfa84f9e79bb5bc0835e80d5013",
}


@pytest.mark.parametrize(("name", "size", "shortcut"), list(VERSION_1))
def test_images_are_bit_identical_to_the_version_without_concepts(name, size, shortcut):
    digest = hashlib.sha256()
    template = "procedural" if name == "mri-brain-3d" else None
    for case in generate(name, 6, size=size, seed=3, shortcut=shortcut, template=template):
        digest.update(case.image.tobytes())
        digest.update(case.mask.tobytes())
        if case.token_mask is not None:
            digest.update(case.token_mask.tobytes())
        assert set(case.concepts) >= {"lesion"}
    assert digest.hexdigest()[:32] == VERSION_1[(name, size, shortcut)]


def test_cxr_concepts_are_the_anatomy_lesion_and_marker():
    cases = list(generate("cxr-pneumothorax", 12, size=64, seed=1, shortcut=0.9))
    for case in cases:
        c = case.concepts
        assert set(c) == {"lung_fields", "heart", "ribs", "body_outline", "lesion", "marker"}
        for mask in c.values():
            assert mask.dtype == bool and mask.shape == case.image.shape
        assert np.array_equal(c["lesion"], case.mask)
        assert np.array_equal(c["marker"], case.token_mask)
        for name in ("lung_fields", "heart", "ribs", "body_outline", "lesion"):
            assert not (c[name] & case.token_mask).any(), f"{name} under the token"
        # Anatomy: lungs and heart inside the body; lungs take 15-50% of the image.
        body = c["body_outline"] | case.token_mask
        assert not (c["lung_fields"] & ~body).any()
        assert not (c["heart"] & ~body).any()
        assert 0.15 < c["lung_fields"].mean() < 0.5
        assert c["ribs"].any() and c["heart"].any()
        if case.label:
            # The pneumothorax lies in the lung field (it is the lung's collapsed part).
            assert (c["lesion"] & c["lung_fields"]).sum() >= 0.9 * c["lesion"].sum()
        # The lungs are dark and the ribs brighter than the lung around them.
        img = case.image.astype(float)
        lung = c["lung_fields"] & ~c["ribs"]
        assert img[lung].mean() < img[c["body_outline"] & ~c["lung_fields"]].mean()
        assert img[c["lung_fields"] & c["ribs"]].mean() > img[lung].mean()


def test_dataset_folder_holds_one_mask_per_concept_present(tmp_path):
    out = make_dataset("cxr-pneumothorax", tmp_path / "d", n=40, size=48, seed=2, shortcut=0.95)
    card = json.loads((out / "dataset.json").read_text())
    names = card["concepts"]["names"]
    assert names == ["lung_fields", "heart", "ribs", "body_outline", "lesion", "marker"]
    cases = {c.index: c for c in generate("cxr-pneumothorax", 40, size=48, seed=2, shortcut=0.95)}
    for name in names:
        files = sorted((out / "concepts" / name).iterdir())
        present = [i for i, c in cases.items() if c.concepts[name].any()]
        assert [f.name for f in files] == [f"{i:05d}.png" for i in present]
        assert card["concepts"]["images_with"][name] == len(present)
        stored = load(files[0]).array > 0
        assert np.array_equal(stored, cases[present[0]].concepts[name])
    # Negatives have no lesion file.
    assert card["concepts"]["images_with"]["lesion"] == sum(c.label for c in cases.values())
    assert "## Concept masks" in (out / "DATASET_CARD.md").read_text()
