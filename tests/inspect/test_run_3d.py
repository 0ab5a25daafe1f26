"""The whole inspection on 3D volumes: every figure, and the cohort map as NIfTI with the
volumes' affine."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch

from trustmap.data.phantoms import make_dataset
from trustmap.inspect.report import write_inspection
from trustmap.inspect.run import InspectConfig, inspect_model
from trustmap.models import TrainConfig, train_classifier


def test_inspection_of_a_3d_model(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = make_dataset("mri-brain-3d", tmp_path / "brain", n=40, size=24, seed=0,
                            template="procedural")  # fmt: skip
        config = TrainConfig(epochs=1, batch_size=8, model_kwargs={"width": 2}, n_boot=10,
                             patience=None, checks=False)  # fmt: skip
        run = train_classifier(root, "small_cnn", out=tmp_path / "run", seed=0, config=config)
        result = inspect_model(
            run.checkpoint,
            config=InspectConfig(n_images=16, n_embed=40, projections=("pca",), steps=3),
        )
        out = write_inspection(result, tmp_path / "out")
    finally:
        torch.set_num_threads(threads)
    numbers = json.loads((out / "inspect.json").read_text())
    assert numbers["filters"]["shape"][2:] == [3, 3, 3]
    assert numbers["data"]["concepts"] == ["head", "lesion"]
    assert numbers["cohort"]["method"] == "grad_cam" and numbers["cohort"]["shape"] == [24] * 3
    saved = nib.load(str(out / "cohort.nii.gz"))
    image = nib.load(str(root / "images" / "00000.nii.gz"))
    np.testing.assert_allclose(saved.affine, image.affine)
    figures = {p.stem for p in (out / "figures").iterdir()}
    assert {"cohort", "feature_maps", "maximization", "filters"} <= figures
