"""Deletion/insertion curves, sensitivity-n and the completeness gap on models whose answers
are known in closed form."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks
from trustmap.metrics import (
    Curve,
    completeness_gap,
    deletion_curve,
    insertion_curve,
    sensitivity_n,
)


class Linear2(nn.Module):
    """Two logits ``[0, sum(w * x)]``: P(class 1) = sigmoid(w . x), input x gradient = w x."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s], dim=1)


class Softplus2(Linear2):
    """Logits ``[0, sum(softplus(w * x))]``: not linear, so gradient x input is incomplete."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.softplus(3 * x * self.w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _weights(spatial: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((1, 1, *spatial), generator=gen, dtype=torch.float64) * 0.5 + 0.01


# ----------------------------------------------------------------------------------------
# Deletion and insertion
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [16, 4])
def test_deletion_and_insertion_on_a_linear_model_are_analytic(steps):
    w = _weights((4, 4))
    model = Linear2(w)
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    weights = w.flatten().numpy()
    # The map ranks the pixels by their weight, so the k-th removal takes the k-th largest.
    ranked = np.sort(weights)[::-1]
    counts = np.arange(steps + 1) * 16 // steps
    kept_after = np.array([ranked[c:].sum() for c in counts])
    inserted = np.array([ranked[:c].sum() for c in counts])

    dele = deletion_curve(model, x, w[0, 0], 1, steps=steps, baseline="zero")
    ins = insertion_curve(model, x, w[0, 0], 1, steps=steps, baseline=0.0)
    assert isinstance(dele, Curve)
    np.testing.assert_allclose(dele.fractions, counts / 16, rtol=0, atol=0)
    np.testing.assert_allclose(dele.scores, _sigmoid(kept_after), rtol=0, atol=1e-14)
    np.testing.assert_allclose(ins.scores, _sigmoid(inserted), rtol=0, atol=1e-14)
    assert dele.auc == pytest.approx(np.trapezoid(_sigmoid(kept_after), counts / 16), abs=1e-14)
    assert ins.auc == pytest.approx(np.trapezoid(_sigmoid(inserted), counts / 16), abs=1e-14)
    # Target 0 follows the other class: 1 - P(class 1).
    other = deletion_curve(model, x, w[0, 0], 0, steps=steps, baseline="zero")
    np.testing.assert_allclose(other.scores, 1 - dele.scores, atol=1e-14)


def test_ties_are_broken_by_position():
    w = _weights((3, 5), seed=1)
    model = Linear2(w)
    x = torch.ones(1, 1, 3, 5, dtype=torch.float64)
    flat = np.ones((3, 5))  # all tied: pixels go in raster order
    curve = deletion_curve(model, x, flat, 1, steps=15, baseline="zero")
    weights = w.flatten().numpy()
    expected = _sigmoid(np.array([weights[k:].sum() for k in range(16)]))
    np.testing.assert_allclose(curve.scores, expected, rtol=0, atol=1e-14)
    again = deletion_curve(model, x, flat, 1, steps=15, baseline="zero", batch_size=4)
    np.testing.assert_array_equal(again.scores, curve.scores)


@pytest.mark.parametrize("spatial", [(10, 12), (5, 6, 4)])
def test_curves_are_monotone_for_a_model_that_sums_the_pixels(spatial):
    model = Linear2(torch.ones((1, 2, *spatial), dtype=torch.float64) * 0.05)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand((1, 2, *spatial), generator=gen, dtype=torch.float64)  # positive
    smap = torch.rand(spatial, generator=gen)
    dele = deletion_curve(model, x, smap, 1, steps=10, baseline="zero", batch_size=3)
    ins = insertion_curve(model, x, smap, 1, steps=10, baseline="zero", batch_size=3)
    assert np.all(np.diff(dele.scores) < 0) and np.all(np.diff(ins.scores) > 0)
    full = float(_sigmoid(0.05 * x.sum().item()))
    assert dele.scores[0] == pytest.approx(full) == ins.scores[-1]
    assert dele.scores[-1] == pytest.approx(0.5) == ins.scores[0]
    # (C, *spatial) input gives the same curve as (1, C, *spatial).
    unbatched = deletion_curve(model, x[0], smap, 1, steps=10, baseline="zero")
    np.testing.assert_array_equal(unbatched.scores, dele.scores)


def test_insertion_starts_from_the_blurred_image():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn((1, 1, 16, 16), generator=gen, dtype=torch.float64) * 0.2
    model = Linear2(w)
    x = torch.rand((1, 1, 16, 16), generator=gen, dtype=torch.float64)
    blurred = gaussian_filter(x.numpy(), sigma=(0, 0, 5, 5), mode="reflect")
    expected_start = _sigmoid((w.numpy() * blurred).sum())
    curve = insertion_curve(model, x, torch.rand(16, 16, generator=gen), 1, steps=8)
    assert curve.scores[0] == pytest.approx(expected_start, abs=1e-12)
    assert curve.scores[-1] == pytest.approx(_sigmoid((w * x).sum().item()), abs=1e-12)
    tensor_base = torch.from_numpy(blurred)
    same = insertion_curve(model, x, np.ones((16, 16)), 1, steps=8)
    assert same.scores[0] == pytest.approx(expected_start, abs=1e-12)
    custom = deletion_curve(model, x, np.ones((16, 16)), 1, steps=8, baseline=tensor_base)
    assert custom.scores[-1] == pytest.approx(expected_start, abs=1e-12)


def test_model_mode_input_and_map_are_left_alone(tiny2d):
    tiny2d.train()
    tiny2d.bn1.eval()  # a mixed state, which must come back exactly
    modes = [m.training for m in tiny2d.modules()]
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    smap = torch.rand(16, 16, generator=torch.Generator().manual_seed(5))
    x_copy, map_copy = x.clone(), smap.clone()
    curve = deletion_curve(tiny2d, x, smap, 2, steps=4)
    assert [m.training for m in tiny2d.modules()] == modes
    assert torch.equal(x, x_copy) and torch.equal(smap, map_copy)
    assert_no_hooks(tiny2d)
    # The scores are eval-mode probabilities (BatchNorm on running statistics).
    tiny2d.eval()
    with torch.no_grad():
        p = torch.softmax(tiny2d(x), 1)[0, 2].item()
    assert curve.scores[0] == pytest.approx(p, abs=1e-6)
    assert not curve.scores.flags.writeable


def test_curve_errors():
    model = Linear2(_weights((6, 6)))
    x = torch.ones(1, 1, 6, 6, dtype=torch.float64)
    smap = np.random.default_rng(0).random((6, 6))
    with pytest.raises(ValueError, match=r"map has shape \(6, 7\).*\(6, 6\)"):
        deletion_curve(model, x, np.zeros((6, 7)), 1)
    with pytest.raises(ValueError, match="NaN"):
        deletion_curve(model, x, np.where(smap > 0.5, np.nan, smap), 1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        insertion_curve(model, x, smap, 1, steps=0)
    with pytest.raises(ValueError, match=r"steps \(37\) cannot exceed .* \(36\)"):
        insertion_curve(model, x, smap, 1, steps=37)
    with pytest.raises(ValueError, match="baseline must be 'zero', 'blur'"):
        deletion_curve(model, x, smap, 1, baseline="black")
    with pytest.raises(ValueError, match="batch size 1"):
        deletion_curve(model, x.repeat(2, 1, 1, 1), smap, 1)
    x_nan = x.clone()
    x_nan[0, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="contains 1 NaN"):
        deletion_curve(model, x_nan, smap, 1)
    with pytest.raises(ValueError, match=r"baseline tensor must have x's shape"):
        deletion_curve(model, x, smap, 1, baseline=torch.zeros(6, 6))


# ----------------------------------------------------------------------------------------
# Sensitivity-n and completeness
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(8, 8), (4, 5, 4)])
def test_sensitivity_n_is_one_for_input_x_gradient_of_a_linear_model(spatial):
    gen = torch.Generator().manual_seed(6)
    model = Linear2(torch.randn((1, 2, *spatial), generator=gen, dtype=torch.float64))
    x = torch.randn((1, 2, *spatial), generator=gen, dtype=torch.float64)
    attr = x * model.w.detach()  # gradient x input, exact for a linear model
    n_pixels = int(np.prod(spatial))
    result = sensitivity_n(
        model, x, attr, 1, n_values=[1, 5, 17, n_pixels], n_subsets=20, seed=0, batch_size=7
    )
    assert list(result) == [1, 5, 17, n_pixels]
    for n in (1, 5, 17):
        assert result[n] == pytest.approx(1.0, abs=1e-12)
    assert result[n_pixels] is None  # every subset is the whole image: no spread
    # Attributions unrelated to the model do not correlate.
    noise = torch.randn(attr.shape, generator=gen, dtype=torch.float64)
    unrelated = sensitivity_n(model, x, noise, 1, n_values=[5], n_subsets=30, seed=0)
    assert abs(unrelated[5]) < 0.7


def test_sensitivity_n_depends_only_on_the_seed():
    gen = torch.Generator().manual_seed(7)
    model = Softplus2(torch.randn((1, 1, 6, 6), generator=gen, dtype=torch.float64))
    x = torch.randn((1, 1, 6, 6), generator=gen, dtype=torch.float64)
    attr = torch.randn((1, 6, 6), generator=gen, dtype=torch.float64)  # (C, H, W) form
    a = sensitivity_n(model, x, attr, 1, n_values=[3, 9], n_subsets=10, seed=11)
    b = sensitivity_n(model, x[0], attr, 1, n_values=[3, 9], n_subsets=10, seed=11, batch_size=3)
    c = sensitivity_n(model, x, attr, 1, n_values=[3, 9], n_subsets=10, seed=12)
    # Batching may change the last bits of the model's outputs, nothing else.
    assert list(a) == list(b) == [3, 9]
    assert a[3] == pytest.approx(b[3], abs=1e-12) and a[9] == pytest.approx(b[9], abs=1e-12)
    assert abs(a[3] - c[3]) > 1e-3 and abs(a[9] - c[9]) > 1e-3


def test_sensitivity_n_errors():
    model = Linear2(_weights((4, 4)))
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    attr = torch.ones_like(x)
    with pytest.raises(ValueError, match=r"integer in \[1, 16\]"):
        sensitivity_n(model, x, attr, 1, n_values=[17], seed=0)
    with pytest.raises(ValueError, match="repeated"):
        sensitivity_n(model, x, attr, 1, n_values=[2, 2], seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        sensitivity_n(model, x, attr, 1, n_values=[2], n_subsets=1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        sensitivity_n(model, x, attr, 1, n_values=[2], seed=None)
    with pytest.raises(ValueError, match=r"x's shape \(1, 1, 4, 4\)"):
        sensitivity_n(model, x, torch.ones(4, 4), 1, n_values=[2], seed=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sensitivity_n(model, x, attr * float("inf"), 1, n_values=[2], seed=0)


@pytest.mark.parametrize("spatial", [(8, 8), (4, 4, 4)])
def test_completeness_gap_of_integrated_gradients_on_a_linear_model(spatial):
    gen = torch.Generator().manual_seed(8)
    model = Linear2(torch.randn((1, 1, *spatial), generator=gen, dtype=torch.float64))
    x = torch.randn((1, 1, *spatial), generator=gen, dtype=torch.float64)
    attr = trustmap.explain(model, x, "integrated_gradients", target=1)
    assert completeness_gap(model, x, attr, 1) < 1e-12
    # A method that is not complete on a nonlinear model shows a clear gap.
    soft = Softplus2(model.w.detach())
    grad_x_input = trustmap.explain(soft, x, "gradient", target=1) * x
    assert completeness_gap(soft, x, grad_x_input, 1) > 0.05
    ig = trustmap.explain(soft, x, "integrated_gradients", target=1, n_steps=64)
    assert completeness_gap(soft, x, ig, 1) < 0.01


def test_completeness_gap_is_relative_and_falls_back_when_nothing_changes():
    model = Linear2(_weights((4, 4)))
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    delta = model.w.detach().sum().item()
    half = x * model.w.detach() / 2  # accounts for half of f(x) - f(0)
    assert completeness_gap(model, x, half, 1) == pytest.approx(0.5, abs=1e-12)
    zero = torch.zeros_like(x)
    with pytest.warns(RuntimeWarning, match="absolute gap"):
        gap = completeness_gap(model, zero, half, 1)
    assert gap == pytest.approx(delta / 2, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        completeness_gap(model, x, half, 1, baseline=torch.zeros(1, 4, 4, dtype=torch.float64))
