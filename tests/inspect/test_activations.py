"""The activation-extraction API: values, batching, hook removal, no side effects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.inspect import extract, iter_activations, layer_table, penultimate_layer
from trustmap.inspect.activations import require_spatial


def manual(model, x):
    """TinyCNN's layers by hand, in eval mode."""
    with torch.no_grad():
        h1 = F.relu(model.bn1(model.conv1(x)))
        c2 = model.conv2(h1)
        h2 = F.relu(c2)
        h3 = F.relu(model.conv3(h2))
        pooled = model.pool(h3).flatten(1)
    return {"conv2": c2, "conv3": model.conv3(h2), "pooled": pooled, "out": model.fc(pooled)}


@pytest.mark.parametrize("dims", [2, 3])
def test_values_match_a_manual_forward_and_do_not_depend_on_the_batch_size(dims):
    model = make_tiny(dims)
    x = make_input(dims, 7)
    expected = manual(model.eval(), x)
    model.train()
    for bs in (1, 3, 7):
        acts = extract(model, x, ["conv2", "conv3", "fc:input"], batch_size=bs)
        # conv2 feeds an in-place ReLU: the stored activation must be the convolution's.
        assert torch.allclose(acts["conv2"], expected["conv2"], atol=1e-6)
        assert torch.allclose(acts["conv3"], expected["conv3"], atol=1e-6)
        assert torch.allclose(acts["fc:input"], expected["pooled"], atol=1e-6)
        assert torch.allclose(acts.outputs, expected["out"], atol=1e-6)
        assert list(acts.index) == list(range(7))
    pooled = extract(model, x, "conv3", reduce="mean")["conv3"]
    assert torch.allclose(pooled, expected["conv3"].flatten(2).mean(2), atol=1e-6)
    flat = extract(model, x, "conv3", reduce="flatten")["conv3"]
    assert flat.shape == (7, expected["conv3"][0].numel())
    assert all(m.training for m in model.modules())
    assert_no_hooks(model)


def test_hooks_are_removed_when_a_pass_is_abandoned_or_fails():
    model = make_tiny(2)
    x = make_input(2, 6)
    gen = iter_activations(model, x, ["conv2"], batch_size=2)
    next(gen)
    assert model.conv2._forward_hooks  # live during the pass
    gen.close()
    assert_no_hooks(model)
    model.train()
    with pytest.raises(ValueError, match="NaN"):
        extract(model, torch.full((2, 1, 16, 16), float("nan")), "conv2")
    for _ in iter_activations(model, x, ["conv2"], batch_size=2):
        break
    assert all(m.training for m in model.modules())


def test_inputs_and_model_are_untouched():
    model = make_tiny(2)
    x = make_input(2, 4)
    before = x.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    extract(model, x, ["conv3", "fc:input"])
    grads = iter_activations(model, x, ["conv3"], grad=True)
    batch = next(grads)
    batch.outputs[:, 0].sum().backward()
    grads.close()
    assert torch.equal(x, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert_no_hooks(model)


def test_unknown_layers_suggest_close_names_and_non_spatial_layers_are_named():
    model = make_tiny(2)
    with pytest.raises(ValueError, match=r"no layer named 'conv4'; did you mean 'conv3'"):
        extract(model, make_input(2, 1), "conv4")
    with pytest.raises(ValueError, match=r"did you mean 'conv3'"):
        extract(model, make_input(2, 1), "features.conv3")
    x = make_input(2, 2)
    fc = extract(model, x, "fc")["fc"]
    with pytest.raises(ValueError, match=r"layer 'fc' outputs shape \(3,\).*without 2 spatial"):
        require_spatial("fc", fc, x, "network dissection")


def test_layer_table_and_penultimate_layer():
    model = make_tiny(2)
    table = layer_table(model, make_input(2, 1))
    names = [t.name for t in table]
    assert names.index("conv1") < names.index("conv3") < names.index("fc")
    relu = next(t for t in table if t.name == "relu")
    assert relu.calls == 2  # the reused in-place ReLU
    assert next(t for t in table if t.name == "conv3").spatial
    assert not next(t for t in table if t.name == "fc").spatial
    assert penultimate_layer(model, make_input(2, 1)) == "fc:input"
    assert_no_hooks(model)
