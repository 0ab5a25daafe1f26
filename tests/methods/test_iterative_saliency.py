"""Iterative saliency: stops when the class flips, or at max_iter; the weighted sum;
inpainting; batching; errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.methods.perturbation.iterative_saliency import (
    inpaint_biharmonic,
    inpaint_normalized_convolution,
    most_salient,
)


class Threshold(nn.Module):
    """Class 1 while ``sum(x) > t``: logits ``(0, sum(x) - t)``, or the single logit
    ``sum(x) - t`` with ``binary=True``."""

    def __init__(self, t: float, binary: bool = False) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(float(t)))
        self.binary = binary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1) - self.t
        return s.unsqueeze(1) if self.binary else torch.stack([torch.zeros_like(s), s], 1)


def two_squares(dims: int) -> tuple[torch.Tensor, float]:
    """Zeros with a bright box A (1.0) and a dimmer box B (0.5); returns the image and
    the fraction that selects exactly A's voxels per iteration (input x gradient = x)."""
    if dims == 2:
        x = torch.zeros(1, 1, 32, 32)
        x[0, 0, 4:10, 4:10] = 1.0  # A: 36 voxels, sum 36
        x[0, 0, 20:26, 18:24] = 0.5  # B: 36 voxels, sum 18
    else:
        x = torch.zeros(1, 1, 16, 16, 16)
        x[0, 0, 2:5, 2:5, 2:5] = 1.0  # A: 27 voxels, sum 27
        x[0, 0, 9:12, 10:13, 8:11] = 0.5  # B: 27 voxels, sum 13.5
    return x, 27 / x[0, 0].numel() if dims == 3 else 36 / x[0, 0].numel()


def explain(model, x, fraction, **params):
    # No smoothing: the map is x itself, so each iteration takes exactly one box.
    return trustmap.get_method("iterative_saliency")(
        model, base="input_x_gradient", fraction=fraction, smooth=0.0, dilation=1, **params
    ).explain(x)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    ("threshold", "iterations", "flipped"),
    [(25.0, 1, True), (10.0, 2, True), (-100.0, 4, False)],
    ids=["flip-after-A", "flip-after-B", "never"],
)
def test_stops_when_the_class_flips(dims, threshold, iterations, flipped):
    # Removing A leaves sum(B) (18 in 2D, 13.5 in 3D); removing B too leaves ~0.
    x, fraction = two_squares(dims)
    exp = explain(Threshold(threshold), x, fraction, max_iter=4)
    assert exp.params["iterations"] == [iterations]
    assert exp.params["flipped"] == [flipped]
    assert len(exp.params["weights"][0]) == iterations


def test_single_logit_model_flips_too():
    x, fraction = two_squares(2)
    exp = explain(Threshold(10.0, binary=True), x, fraction, max_iter=4)
    assert exp.params["iterations"] == [2] and exp.params["flipped"] == [True]


def test_result_is_the_weighted_sum_of_normalised_maps():
    x, fraction = two_squares(2)
    model = Threshold(10.0)
    uniform = explain(model, x, fraction, max_iter=4, weights="uniform").attributions
    # Map 1 = x (max 1); map 2 = x with A inpainted from zero surroundings (max 0.5).
    second = x.clone()
    second[0, 0, 4:10, 4:10] = 0
    assert torch.allclose(uniform, x + second / 0.5, atol=1e-6)
    score = explain(model, x, fraction, max_iter=4, weights="score")
    probs = score.params["weights"][0]
    assert probs[0] == pytest.approx(torch.sigmoid(torch.tensor(54.0 - 10.0)).item())
    assert probs[1] == pytest.approx(torch.sigmoid(torch.tensor(18.0 - 10.0)).item(), rel=1e-4)
    expected = probs[0] * x + probs[1] * second / 0.5
    assert torch.allclose(score.attributions, expected, atol=1e-5)
    decay = explain(model, x, fraction, max_iter=4, weights="decay")
    assert decay.params["weights"] == [[1.0, 0.5]]


def test_batch_samples_stop_independently():
    a, fraction = two_squares(2)
    b = a.clone()
    b[0, 0, 20:26, 18:24] = 0.0  # no B: removing A flips at once
    x = torch.cat([a, b])
    model = Threshold(10.0)
    batch = explain(model, x, fraction, max_iter=4)
    assert batch.params["iterations"] == [2, 1]
    assert batch.params["flipped"] == [True, True]
    for i in range(2):
        alone = explain(model, x[i : i + 1], fraction, max_iter=4).attributions
        assert torch.allclose(batch.attributions[i : i + 1], alone, atol=1e-6)


def test_region_and_callable_targets_run_max_iter():
    x, fraction = two_squares(2)
    model = Threshold(25.0)
    exp = trustmap.get_method("iterative_saliency")(
        model, base="input_x_gradient", fraction=fraction, max_iter=3
    ).explain(x, target=lambda out: out[:, 1])
    assert exp.params["iterations"] == [3] and exp.params["flipped"] == [False]


@pytest.mark.parametrize("dims", [2, 3])
def test_any_base_method_and_shapes(dims):
    model = make_tiny(dims, in_channels=2)
    x = make_input(dims, 2, channels=2)
    cam = trustmap.get_method("iterative_saliency")(model, base="grad_cam", max_iter=2).explain(x)
    assert cam.attributions.shape == (2, 1, *x.shape[2:])
    sg = trustmap.get_method("iterative_saliency")(
        model, base="smoothgrad", max_iter=2, n_samples=2, seed=7
    ).explain(x)
    assert sg.attributions.shape == x.shape
    assert sg.params["seed"] == 7
    assert all(p.grad is None for p in model.parameters())
    assert_no_hooks(model)


def test_inpainting_keeps_known_voxels_and_fills_smoothly():
    gen = torch.Generator().manual_seed(0)
    # A linear ramp: both inpainters should continue it into the hole.
    ramp2 = torch.linspace(0, 1, 20).view(1, 1, 1, 20).expand(2, 1, 20, 20).clone()
    hole2 = torch.zeros(2, 1, 20, 20, dtype=torch.bool)
    hole2[:, :, 6:12, 7:13] = True
    bi = inpaint_biharmonic(ramp2, hole2)
    assert torch.equal(bi[~hole2.expand_as(bi)], ramp2[~hole2.expand_as(ramp2)])
    assert torch.allclose(bi, ramp2, atol=1e-6)
    ramp3 = torch.linspace(0, 1, 12).view(1, 1, 1, 1, 12).expand(1, 1, 12, 12, 12).clone()
    ramp3 = ramp3 + 0.01 * torch.rand(ramp3.shape, generator=gen)
    hole3 = torch.zeros(1, 1, 12, 12, 12, dtype=torch.bool)
    hole3[:, :, 4:8, 4:8, 5:8] = True
    nc = inpaint_normalized_convolution(ramp3, hole3)
    assert torch.equal(nc[~hole3], ramp3[~hole3])
    assert float((nc - ramp3)[hole3].abs().max()) < 0.1


def test_most_salient_skips_removed_voxels_row_by_row():
    saliency = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    removed = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    removed[0, 0, 3] = True  # row 0: the top four are gone
    removed[1] = True
    removed[1, 0, 0, :2] = False  # row 1: only two voxels left
    chosen = most_salient(saliency, removed, 3)
    assert chosen[0, 0].flatten().nonzero().flatten().tolist() == [9, 10, 11]
    assert chosen[1, 0].flatten().nonzero().flatten().tolist() == [0, 1]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"max_iter": 0}, "max_iter"),
        ({"dilation": -1}, "dilation"),
        ({"smooth": -1.0}, "smooth"),
        ({"inpaint": "telea"}, "inpaint"),
        ({"weights": "linear"}, "weights"),
        ({"base": "no_such_method"}, "unknown method"),
        ({"base": "iterative_saliency"}, "itself"),
    ],
)
def test_errors(params, message):
    with pytest.raises(ValueError, match=message):
        trustmap.explain(make_tiny(2), make_input(2, 1), "iterative_saliency", **params)
