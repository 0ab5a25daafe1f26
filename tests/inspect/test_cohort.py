"""Cohort maps: the mean post-processed attribution over a class, saved with the affine."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.data import load, open_dataset
from trustmap.data.phantoms import make_dataset
from trustmap.inspect import cohort_map
from trustmap.trust.postprocess import postprocess


def test_mean_of_the_post_processed_maps_of_the_class():
    model = make_tiny(3)
    x = make_input(3, 5)
    labels = np.array([1, 0, 1, 1, 0])
    res = cohort_map(model, x, "gradient", class_index=1, labels=labels, batch_size=2)
    maps = postprocess(trustmap.explain(model, x[labels == 1], "gradient", target=1))
    np.testing.assert_allclose(res.mean, maps.mean(0), atol=1e-6)
    np.testing.assert_allclose(res.sd, maps.numpy().std(0), atol=1e-5)
    assert res.n == 3 and res.mean.shape == (8, 8, 8)
    assert res.mean.min() >= 0 and res.mean.max() <= 1
    everyone = cohort_map(model, x, "gradient", class_index=1, select="all")
    assert everyone.n == 5
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="no image is of class 2"):
        cohort_map(model, x, "gradient", class_index=2, labels=labels)
    with pytest.raises(ValueError, match="needs labels"):
        cohort_map(model, x, "gradient")


def test_nifti_carries_the_images_affine(tmp_path):
    root = make_dataset("mri-brain-3d", tmp_path / "brain", n=20, size=24, seed=0,
                        template="procedural")  # fmt: skip
    ds = open_dataset(root)
    model = make_tiny(3)
    res = cohort_map(model, ds, "grad_cam", class_index=1, batch_size=4)
    first = nib.load(str(root / "images" / "00000.nii.gz"))
    # res.affine is in trustmap.data.io's (d, h, w) convention; the file written with it
    # has the images' own NIfTI affine.
    np.testing.assert_allclose(res.affine, load(root / "images" / "00000.nii.gz").affine)
    path = res.save_nifti(tmp_path / "cohort.nii.gz")
    saved = nib.load(str(path))
    np.testing.assert_allclose(saved.affine, first.affine)
    assert saved.shape == first.shape
    assert res.n == int((ds.labels == 1).sum())
    assert torch.is_tensor(ds.tensors().images)
