"""Filters, feature maps, dead and saturated units, activation maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.inspect import (
    activation_maps,
    compare_filters,
    feature_maps,
    filters,
    initial_model,
    unit_rates,
)
from trustmap.models import create


def test_filters_read_the_first_convolution_and_3d_kernels_as_orthogonal_slices():
    model = make_tiny(2)
    f = filters(model)
    assert f.layer == "conv1" and f.weights.shape == (4, 1, 3, 3)
    np.testing.assert_allclose(f.weights, model.conv1.weight.detach().numpy())
    np.testing.assert_allclose(f.norms, model.conv1.weight.detach().flatten(1).norm(dim=1))
    m3 = make_tiny(3)
    f3 = filters(m3)
    w = m3.conv1.weight.detach().numpy()
    assert f3.planes.shape == (4, 1, 3, 3, 3)
    np.testing.assert_allclose(f3.planes[:, :, 0], w[:, :, 1])
    np.testing.assert_allclose(f3.planes[:, :, 1], w[:, :, :, 1])
    np.testing.assert_allclose(f3.planes[:, :, 2], w[:, :, :, :, 1])
    with pytest.raises(ValueError, match="is a BatchNorm2d, not a convolution"):
        filters(model, "bn1")


def test_filter_comparison_norms_and_cosines():
    a = make_tiny(2, seed=0)
    b = make_tiny(2, seed=0)
    with torch.no_grad():
        b.conv1.weight[0] *= 3.0  # same direction, three times the norm
        b.conv1.weight[1] = -b.conv1.weight[1]
    comp = compare_filters(a, b)
    np.testing.assert_allclose(comp.cosine, [1.0, -1.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(comp.norm_b[0], 3 * comp.norm_a[0])
    np.testing.assert_allclose(comp.relative_change, [2.0, 2.0, 0.0, 0.0], atol=1e-12)


def test_initial_model_rebuilds_the_weights_training_started_from():
    info = {
        "arch": "small_cnn", "spatial_dims": 2, "in_channels": 1, "num_classes": 2,
        "create_kwargs": {"width": 4}, "extra": {"seed": 7},
    }  # fmt: skip
    start = initial_model(info)
    again = create("small_cnn", 2, 1, 2, width=4, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="does not record the seed"):
        initial_model({**info, "extra": {}})


class Units(nn.Module):
    """Channel 0 always zero (dead), channel 1 always positive (saturated), channel 2 a
    ReLU of the input (active where the input is positive)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([-1.0, 5.0, 0.0]))
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_unit_rates_count_dead_and_saturated_units():
    model = Units()
    x = make_input(2, 6)
    rates = unit_rates(model, x, batch_size=4)
    layer = rates.layers[0]
    assert layer.layer == "act" and layer.units == 3
    assert layer.dead.tolist() == [True, False, False]
    assert layer.saturated.tolist() == [False, True, False]
    assert layer.active_share[2] == pytest.approx(float((x > 0).float().mean()))
    assert layer.dead_rate == pytest.approx(1 / 3) and layer.saturated_rate == pytest.approx(1 / 3)
    assert rates.n_images == 6
    assert_no_hooks(model)


def test_feature_maps_3d_take_the_slice_through_each_maximum():
    model = make_tiny(3)
    x = make_input(3, 1)
    fm = feature_maps(model, x[0], "conv3")
    assert fm.maps.shape == (8, 4, 4, 4) and fm.planes.shape == (8, 4, 4)
    for k in range(8):
        assert fm.planes[k].max() == pytest.approx(fm.maps[k].max())
        assert fm.slices[k] == np.unravel_index(np.argmax(fm.maps[k]), fm.maps[k].shape)[0]
    with pytest.raises(ValueError, match="one image"):
        feature_maps(model, make_input(3, 2), "conv3")
    with pytest.raises(ValueError, match="without 3 spatial axes"):
        feature_maps(model, x, "fc")


def test_activation_maps_are_the_channel_mean_upsampled():
    model = make_tiny(2).eval()
    x = make_input(2, 2)
    store = {}
    h = model.conv3.register_forward_hook(lambda _m, _i, o: store.setdefault("a", o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    expected = F.interpolate(store["a"].mean(1, keepdim=True), size=(16, 16), mode="bilinear")
    assert torch.allclose(activation_maps(model, x, "conv3"), expected, atol=1e-6)
    one = activation_maps(model, x, "conv3", reduce=5)
    assert torch.allclose(one, F.interpolate(store["a"][:, 5:6], size=(16, 16), mode="bilinear"))
    with pytest.raises(ValueError, match="no channel 9"):
        activation_maps(model, x, "conv3", reduce=9)
