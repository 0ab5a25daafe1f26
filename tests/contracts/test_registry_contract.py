"""The contract every registered method keeps, in 2D and 3D, batch 1 and 3."""

from __future__ import annotations

import inspect

import pytest
import torch

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny

# Cheap settings for the multi-pass methods; the contract is the same at any setting.
FAST = {
    "integrated_gradients": {"n_steps": 4},
    "smoothgrad": {"n_samples": 3},
    "smooth_ig": {"n_samples": 2, "n_steps": 3},
    "xrai": {"n_steps": 3},
    "occlusion": {"window": 4},
    "lime": {"n_samples": 16, "n_segments": 8},
    "kernel_shap": {"n_samples": 16, "n_segments": 8},
    "shapley_sampling": {"n_samples": 4, "n_segments": 8},
    "rise": {"n_samples": 8},
    "meaningful_perturbation": {"n_iter": 3},
    "extremal_perturbation": {"n_iter": 3, "areas": (0.1, 0.2)},
    "hipe": {"min_window": 4},
    "iterative_saliency": {"max_iter": 2},
    "deep_shap": {"background": 3},
    "gradient_shap": {"background": 3, "n_samples": 4},
    # Tiny untrained (G+, G-) for the 2-channel 2D and 3D inputs: built in params_for.
    "cyclegan_am": {},
    # A tiny untrained autoencoder for every input: built in params_for.
    "ae_anomaly": {"smooth": 1.0},
}


def params_for(name: str) -> dict:
    params = dict(FAST.get(name, {}))
    if name == "cyclegan_am":
        from tests.counterfactual.helpers import contract_generators

        params["generators"] = contract_generators()
    if name == "ae_anomaly":
        from tests.methods.test_ae_anomaly import contract_autoencoder

        params["autoencoder"] = contract_autoencoder()
    if "seed" in inspect.signature(trustmap.get_method(name).__init__).parameters:
        params["seed"] = 0
    return params


def model_for(name: str, dims: int, in_channels: int = 1, n_classes: int = 3) -> torch.nn.Module:
    """The tiny CNN of tests/conftest.py, or for a method that needs trainable attention a
    tiny ``attention_cnn`` (BatchNorm, ReLU modules, softmax gates) of the same sizes."""
    if trustmap.get_method(name).needs == "attention":
        from trustmap.models import create

        model = create("attention_cnn", dims, in_channels, n_classes, width=2, seed=0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(1))
        return model
    return make_tiny(dims, in_channels=in_channels, n_classes=n_classes)


METHODS = trustmap.list_methods()
CASES = [(n, d, b) for n in METHODS for d in (2, 3) for b in (1, 3)]


@pytest.mark.parametrize(("name", "dims", "batch"), CASES)
def test_contract(name: str, dims: int, batch: int) -> None:
    model = model_for(name, dims, in_channels=2)
    model.train()  # the caller's mode must survive the call
    x = make_input(dims, batch, channels=2)
    x_before = x.clone()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.requires_grad for p in model.parameters()]
    cls = trustmap.get_method(name)

    first = cls(model, **params_for(name)).explain(x)
    second = cls(model, **params_for(name)).explain(x)

    out_channels = 2 if cls.output == "input" else 1
    assert first.attributions.shape == (batch, out_channels, *x.shape[2:])
    assert torch.isfinite(first.attributions).all()
    assert first.attributions.dtype == x.dtype
    assert first.method == name
    assert torch.equal(first.attributions, second.attributions), "not deterministic under a seed"
    assert first.output.shape == (batch, 3)
    assert torch.equal(first.target, first.output.argmax(1))
    assert_no_hooks(model)
    assert torch.equal(x, x_before), "input was mutated"
    assert all(m.training for m in model.modules()), "training flag not restored"
    assert [p.requires_grad for p in model.parameters()] == grads_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), f"model state {key} changed"


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dims", [2, 3])
def test_no_hooks_after_failure(name: str, dims: int) -> None:
    model = model_for(name, dims)
    model.train()
    x = make_input(dims, 2)

    def exploding_target(output: torch.Tensor) -> torch.Tensor:
        raise Boom("forced failure inside the explainer")

    with pytest.raises((Boom, ValueError)):
        trustmap.explain(model, x, name, target=exploding_target, **params_for(name))
    assert_no_hooks(model)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", METHODS)
def test_float64_and_target_kinds(name: str) -> None:
    model = model_for(name, 2, n_classes=3).double()
    x = make_input(2, 2, dtype=torch.float64)
    params = params_for(name)
    by_int = trustmap.get_method(name)(model, **params).explain(x, target=2)
    assert by_int.attributions.dtype == torch.float64
    assert torch.equal(by_int.target, torch.tensor([2, 2]))
    per_sample = trustmap.get_method(name)(model, **params).explain(x, target=torch.tensor([2, 2]))
    assert torch.allclose(by_int.attributions, per_sample.attributions)
