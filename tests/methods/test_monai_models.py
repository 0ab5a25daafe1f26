"""Every registered method runs on MONAI DenseNet121 and ResNet, in 2D and 3D."""

from __future__ import annotations

import inspect

import pytest
import torch
from monai.networks.nets import DenseNet121, resnet10

import trustmap
from tests.conftest import assert_no_hooks
from tests.counterfactual.helpers import contract_generators
from tests.methods.test_ae_anomaly import contract_autoencoder

# Few passes: this test is about real architectures (concatenation, residual additions,
# in-place ReLU modules reused, BatchNorm), not about convergence.
CHEAP = {
    "cyclegan_am": {"generators": contract_generators()},
    "ae_anomaly": {"autoencoder": contract_autoencoder()},
    "integrated_gradients": {"n_steps": 2},
    "smoothgrad": {"n_samples": 2},
    "smooth_ig": {"n_samples": 2, "n_steps": 2},
    "xrai": {"n_steps": 2},
    "ablation_cam": {"batch_size": 512},
    "occlusion": {"window": 32, "stride": 32},
    "lime": {"n_samples": 4, "segmentation": "grid", "n_segments": 4},
    "kernel_shap": {"n_samples": 2, "segmentation": "grid", "n_segments": 4},
    "shapley_sampling": {"n_samples": 1, "segmentation": "grid", "n_segments": 4},
    "rise": {"n_samples": 4, "batch_size": 8},
    "meaningful_perturbation": {"n_iter": 1},
    "extremal_perturbation": {"n_iter": 1, "step": 16},
    "hipe": {"start_cells": 2, "min_window": 64, "batch_size": 8},
    "iterative_saliency": {"max_iter": 2},
    "deep_shap": {"background": 2},
    "gradient_shap": {"background": 2, "n_samples": 2},
}
# Score-CAM costs one forward pass per channel of its layer; a 64-channel layer keeps the
# test short while still exercising the method end to end on the real network.
SCORE_CAM_LAYER = {"densenet": "features.conv0", "resnet": "conv1"}


def build(arch: str, dims: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "densenet":
            model = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2)
        else:
            model = resnet10(spatial_dims=dims, n_input_channels=1, num_classes=2)
    return model.eval()


MODELS = {(a, d): None for a in ("densenet", "resnet") for d in (2, 3)}


@pytest.fixture(scope="module")
def models():
    return {key: build(*key) for key in MODELS}


@pytest.mark.parametrize("name", trustmap.list_methods())
@pytest.mark.parametrize("arch", ["densenet", "resnet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_method_runs_on_monai(models, name, arch, dims):
    model = models[(arch, dims)]
    # 3D: 32x64x64 leaves DenseNet121 a 1x2x2 final feature map, so CAM has its GAP head.
    shape = (2, 1, 64, 64) if dims == 2 else (1, 1, 32, 64, 64)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    params = dict(CHEAP.get(name, {}))
    if name == "score_cam":
        params["layer"] = SCORE_CAM_LAYER[arch]
    if "seed" in inspect.signature(trustmap.get_method(name).__init__).parameters:
        params["seed"] = 0
    if trustmap.get_method(name).needs == "attention":
        # These networks have no trainable attention: one clear error, nothing left behind.
        with pytest.raises(ValueError, match="no attention gate"):
            trustmap.get_method(name)(model, **params).explain(x)
        assert_no_hooks(model)
        return
    exp = trustmap.get_method(name)(model, **params).explain(x)
    channels = 1
    assert exp.attributions.shape == (shape[0], channels, *shape[2:])
    assert torch.isfinite(exp.attributions).all()
    assert exp.attributions.abs().sum() > 0, "all-zero map on a real network"
    assert_no_hooks(model)
    assert not any(m.training for m in model.modules())
