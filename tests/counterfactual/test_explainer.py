"""The registered explainer cyclegan_am: R = G+(x) - G-(x), errors, no side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks
from tests.counterfactual.helpers import random_generator, tiny_classifier
from trustmap.counterfactual.networks import CounterfactualGenerators, save_generators


class Shift(nn.Module):
    """G(x) = x + c: the simplest generator with a known output."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c


def _trained(tmp_path, dims=2, size=16, channels=1, outputs=2):
    arch = {
        "spatial_dims": dims,
        "in_channels": channels,
        "width": 2,
        "depth": 3,
        "convs_per_stage": 3,
        "norm": "group",
        "residual": False,
    }
    pair = CounterfactualGenerators(
        plus=random_generator(dims, channels, seed=1),
        minus=random_generator(dims, channels, seed=2),
        spatial_dims=dims,
        in_channels=channels,
        image_size=(size,) * dims,
        classifier_outputs=outputs,
        arch=arch,
    )
    save_generators(tmp_path / "generators.pt", pair)
    return pair


def test_r_is_g_plus_minus_g_minus_and_signed():
    model = tiny_classifier()
    x = torch.rand(3, 1, 16, 16)
    attr = trustmap.explain(model, x, "cyclegan_am", generators=(Shift(0.3), Shift(-0.2)))
    assert attr.shape == x.shape
    assert torch.allclose(attr, torch.full_like(x, 0.5))
    flipped = trustmap.explain(model, x, "cyclegan_am", generators=(Shift(-0.2), Shift(0.3)))
    assert torch.allclose(flipped, -attr)


@pytest.mark.parametrize("dims", [2, 3])
def test_directory_gives_the_saved_generators_difference(tmp_path, dims):
    pair = _trained(tmp_path, dims=dims)
    model = tiny_classifier(dims=dims)
    x = torch.rand(2, 1, *(16,) * dims)
    explanation = trustmap.get_method("cyclegan_am")(model, generators=tmp_path).explain(x)
    with torch.no_grad():
        expected = pair.plus(x) - pair.minus(x)
    assert torch.allclose(explanation.attributions, expected, atol=1e-6)
    assert explanation.method == "cyclegan_am"
    probs = torch.softmax(explanation.output, 1)
    assert explanation.params["score_original"] == pytest.approx(
        explanation.output.gather(1, explanation.target[:, None])[:, 0].tolist()
    )
    assert probs.shape == (2, 2)


def test_float64_input_loads_float64_generators(tmp_path):
    pair = _trained(tmp_path)
    model = tiny_classifier().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    attr = trustmap.explain(model, x, "cyclegan_am", generators=str(tmp_path))
    assert attr.dtype == torch.float64
    with torch.no_grad():
        expected = pair.plus.double()(x) - pair.minus.double()(x)
    assert torch.allclose(attr, expected, atol=1e-12)


def test_no_hooks_no_mutation_and_modes_restored():
    model = tiny_classifier()
    model.train()
    g_plus, g_minus = random_generator(2, 1, 3), random_generator(2, 1, 4)
    g_plus.train()
    g_minus.eval()
    x = torch.rand(2, 1, 16, 16)
    x0 = x.clone()
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, g_plus, g_minus)]
    trustmap.explain(model, x, "cyclegan_am", generators=(g_plus, g_minus))
    assert torch.equal(x, x0)
    for m, state in zip((model, g_plus, g_minus), states):
        assert_no_hooks(m)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert model.training and g_plus.training and not g_minus.training


def test_non_binary_classifier_is_refused_for_trained_generators(tmp_path):
    _trained(tmp_path)
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="binary classifier"):
        trustmap.explain(tiny_classifier(num_classes=3), x, "cyclegan_am", generators=tmp_path)
    one_logit = tiny_classifier(num_classes=1)
    with pytest.raises(ValueError, match="with 2 output"):
        trustmap.explain(one_logit, x, "cyclegan_am", generators=tmp_path)


def test_other_image_size_or_channels_are_refused(tmp_path):
    _trained(tmp_path, size=16)
    model = tiny_classifier()
    with pytest.raises(ValueError, match=r"trained for 1-channel 16x16 images \(2D\)"):
        trustmap.explain(model, torch.rand(1, 1, 32, 32), "cyclegan_am", generators=tmp_path)
    two_channel = trustmap.models.create("small_cnn", 2, 2, 2, width=2)
    with pytest.raises(ValueError, match="trained for 1-channel"):
        trustmap.explain(two_channel, torch.rand(1, 2, 16, 16), "cyclegan_am", generators=tmp_path)
    # A bare pair has no record; a convolution meeting the wrong channel count is named.
    pair = (random_generator(2, 1, 1), random_generator(2, 1, 2))
    with pytest.raises(ValueError, match="another channel count"):
        trustmap.explain(two_channel, torch.rand(1, 2, 16, 16), "cyclegan_am", generators=pair)
    crop = (lambda x: x[..., :8], lambda x: x)
    with pytest.raises(ValueError, match="another image size"):
        trustmap.explain(model, torch.rand(1, 1, 16, 16), "cyclegan_am", generators=crop)


def test_missing_generators_are_named(tmp_path):
    model = tiny_classifier()
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="needs trained generators"):
        trustmap.explain(model, x, "cyclegan_am")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        trustmap.explain(model, x, "cyclegan_am", generators=tmp_path / "nope")
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        trustmap.explain(model, x, "cyclegan_am", generators=tmp_path)
    with pytest.raises(TypeError, match="pair"):
        trustmap.explain(model, x, "cyclegan_am", generators=42)


def test_registered_in_the_counterfactual_family():
    cls = trustmap.get_method("cyclegan_am")
    assert cls.family == "counterfactual" and cls.output == "input"
    assert "Katzmann" in cls.paper
