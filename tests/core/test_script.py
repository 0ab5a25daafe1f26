"""TorchScript models (scripted and traced): every method that can explain them gives the
map it gives the Python model; the ones that cannot raise NotApplicableError."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.core.script import script_graph
from trustmap.core.validation import NotApplicableError
from trustmap.methods.cam import _layer

# Methods that attach rules to each layer type and so need the Python modules.
NEEDS_MODULES = {
    "lrp",
    "deep_taylor",
    "deeplift",
    "deep_shap",
    "pattern_net",
    "pattern_attribution",
}
# Methods that need more than a classifier (trainable attention, an autoencoder, trained
# generators) are checked with their own models in their own tests.
METHODS = [m for m in trustmap.list_methods() if not trustmap.get_method(m).needs]
# Small budgets: the test compares the same computation on two model forms.
CHEAP = {
    "extremal_perturbation": {"n_iter": 4},
    "meaningful_perturbation": {"n_iter": 4},
    "rise": {"n_samples": 64},
    "smooth_ig": {"n_samples": 2, "n_steps": 4},
    "kernel_shap": {"n_samples": 32},
    "lime": {"n_samples": 32},
    "shapley_sampling": {"n_samples": 4},
    "xrai": {"n_steps": 4},
    "iterative_saliency": {"max_iter": 2},
    "occlusion": {"window": 4, "stride": 4},
    "integrated_gradients": {"n_steps": 8},
    "gradient_shap": {"n_samples": 4},
    "smoothgrad": {"n_samples": 4},
}


def _params(name: str) -> dict:
    params = dict(CHEAP.get(name, {}))
    if "seed" in inspect.signature(trustmap.get_method(name).__init__).parameters:
        params["seed"] = 0
    return params


def _compiled(model: nn.Module, x: torch.Tensor, how: str) -> nn.Module:
    return torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)


# The graph-reading methods (CAM, modified ReLUs) also in 3D; the others only call the
# model, which is the same in 3D.
GRAPH_METHODS = [
    m
    for m in METHODS
    if trustmap.get_method(m).family == "cam" or m in ("guided_backprop", "deconvnet")
]
CASES = [(m, "script", 2) for m in METHODS] + [(m, "trace", 2) for m in METHODS]
CASES += [(m, "script", 3) for m in GRAPH_METHODS]


@pytest.mark.parametrize(("name", "how", "dims"), CASES)
def test_every_method_on_torchscript_matches_the_python_model(name, how, dims):
    model = make_tiny(dims).eval()
    x = make_input(dims, 2)
    compiled = _compiled(model, x, how)
    params = _params(name)
    if name in NEEDS_MODULES:
        with pytest.raises(NotApplicableError, match="TorchScript"):
            trustmap.explain(compiled, x, name, target=1, **params)
        return
    expected = trustmap.explain(model, x, name, target=1, **params)
    got = trustmap.explain(compiled, x, name, target=1, **params)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize(("arch", "size"), [("resnet18", 32), ("densenet121", 64)])
def test_cam_and_guided_methods_on_torchscript_monai_models(arch, size, how):
    from trustmap.models import create

    torch.manual_seed(0)
    model = create(arch, spatial_dims=2, in_channels=1, num_classes=2).eval()
    x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    compiled = _compiled(model, x, how)
    for name in ("grad_cam", "cam", "guided_backprop", "guided_grad_cam"):
        expected = trustmap.get_method(name)(model).explain(x, target=1)
        got = trustmap.get_method(name)(compiled).explain(x, target=1)
        torch.testing.assert_close(got.attributions, expected.attributions, rtol=1e-4, atol=1e-6)
        assert got.params.get("layer") == expected.params.get("layer")


def test_the_model_is_left_as_it_was():
    model = make_tiny(2).eval()
    x = make_input(2, 2)
    compiled = torch.jit.script(model)
    code, graph = compiled.code, str(compiled.graph)
    for name in ("grad_cam", "ablation_cam", "guided_backprop", "cam"):
        trustmap.explain(compiled, x, name, target=1)
    assert compiled.code == code and str(compiled.graph) == graph
    assert_no_hooks(compiled)
    torch.testing.assert_close(compiled(x), model(x))


def test_default_layer_is_the_same_as_for_the_python_model():
    model = make_tiny(2).eval()
    x = make_input(2, 1)
    for how in ("script", "trace"):
        compiled = _compiled(model, x, how)
        assert _layer.default_layer(compiled, x) == _layer.default_layer(model, x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.extra = nn.Conv2d(4, 4, 3, padding=1)
        self.use_extra = True
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        if self.use_extra:
            x = torch.relu(self.extra(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_a_layer_inside_an_if_gets_a_clear_error():
    compiled = torch.jit.script(_Branchy().eval())
    x = make_input(2, 1)
    with pytest.raises(NotApplicableError, match=r"'extra'.*loop or an 'if'"):
        trustmap.explain(compiled, x, "grad_cam", layer="extra")
    # the layer before the branch works
    assert trustmap.explain(compiled, x, "grad_cam", layer="conv").shape == (1, 1, 16, 16)


def test_graph_reads_and_replaces_a_layer_output():
    model = make_tiny(2).eval()
    x = make_input(2, 2)
    compiled = torch.jit.script(model)
    graph = script_graph(compiled)
    out, (act,), (pooled,) = graph.run(compiled, x, outputs=["conv3"], inputs_of=["fc"])
    expected = torch.relu(
        model.conv3(model.relu(model.conv2(model.relu(model.bn1(model.conv1(x))))))
    )
    torch.testing.assert_close(pooled, expected.mean(dim=(2, 3)))
    torch.testing.assert_close(out, model(x))
    replaced = graph.run_replacing(compiled, x, "conv3", torch.zeros_like(act))
    torch.testing.assert_close(replaced, model.fc.bias.expand(2, -1))
