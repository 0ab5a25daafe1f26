"""``make demo``: explain embedded sample images with every method.

Until the trust protocol lands, the demo explains pydicom's bundled ``CT_small.dcm`` and
``MR_small.dcm`` and a generated 3D volume with every registered method on an untrained
MONAI DenseNet121 (2D and 3D), and writes overlays, raw maps and summaries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.atomic import write_text_atomic
from trustmap.core.registry import get_method, list_methods
from trustmap.run import ImageSummary, explain_image, prepare_tensor

# Cheaper settings for the 3D volume, where every pass costs a 3D DenseNet121 pass; the
# 2D images use each method's defaults.
PARAMS_3D: dict[str, dict[str, Any]] = {
    "smoothgrad": {"n_samples": 10, "seed": 0},
    "smooth_ig": {"n_samples": 4, "n_steps": 10, "seed": 0},
    "integrated_gradients": {"n_steps": 25},
    "xrai": {"n_steps": 10},
}
PARAMS_2D: dict[str, dict[str, Any]] = {
    "smoothgrad": {"seed": 0},
    "smooth_ig": {"seed": 0},
}


def make_volume(shape: tuple[int, int, int] = (32, 64, 64), seed: int = 0) -> np.ndarray:
    """A head-like MR volume: an ellipsoidal brain with a bright round lesion and noise."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij"
    )
    head = (z / 0.9) ** 2 + (y / 0.85) ** 2 + (x / 0.75) ** 2
    vol = np.where(head < 1.0, 0.6, 0.0)
    vol = np.where((head < 1.0) & (head > 0.8), 0.9, vol)  # skull-like rim
    lesion = (z - 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.25) ** 2 < 0.04
    vol = np.where(lesion, 1.0, vol)
    vol = vol + rng.normal(0.0, 0.05, size=shape)
    return vol.astype(np.float32)


def seeded_densenet(spatial_dims: int, seed: int = 0) -> nn.Module:
    """An untrained MONAI DenseNet121 whose initial weights come from ``seed`` only."""
    from monai.networks.nets import DenseNet121

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=2)
    return model.eval()


def run_demo(
    out_dir: str | Path,
    *,
    methods: list[str] | None = None,
    on_step: Callable[[str, str], None] | None = None,
) -> dict[str, ImageSummary]:
    """Explain the three sample inputs with ``methods`` (default: all) into ``out_dir``."""
    import pydicom.data

    from trustmap.data.io import load, save_map

    out = Path(out_dir)
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    volume_path = inputs / "volume3d.nii.gz"
    if not volume_path.exists():
        affine = np.diag([3.0, 1.0, 1.0, 1.0])  # (d, h, w): 3 mm slices, 1 mm in-plane
        save_map(make_volume(), volume_path, affine=affine)
    samples = {
        "ct_small": (pydicom.data.get_testdata_file("CT_small.dcm"), {"window": "lung"}),
        "mr_small": (pydicom.data.get_testdata_file("MR_small.dcm"), {}),
        "volume3d": (str(volume_path), {}),
    }
    models = {2: seeded_densenet(2), 3: seeded_densenet(3)}
    # Methods that need more than the model (generators, an autoencoder, trainable
    # attention) cannot run on the demo's untrained DenseNets.
    chosen = methods or [m for m in list_methods() if not get_method(m).needs]
    results: dict[str, ImageSummary] = {}
    for name, (path, load_opts) in samples.items():
        image = load(path, **load_opts)
        x = prepare_tensor(image.array, normalize="minmax")
        dims = x.ndim - 2
        params = PARAMS_3D if dims == 3 else PARAMS_2D

        def step(method: str, sample: str = name) -> None:
            if on_step:
                on_step(sample, method)

        results[name] = explain_image(
            models[dims],
            x,
            chosen,
            out / name,
            name=str(path),
            params=params,
            like=image,
            on_method=step,
        )
    index = {
        name: {
            "prediction": s.prediction,
            "probabilities": s.probabilities,
            "seconds": {m: r.seconds for m, r in s.methods.items()},
            "errors": {m: r.error for m, r in s.methods.items() if r.error},
        }
        for name, s in results.items()
    }
    write_text_atomic(out / "index.json", json.dumps(index, indent=2))
    return results
