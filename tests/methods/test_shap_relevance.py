"""DeepSHAP and GradientSHAP: additivity, exactly where it is exact and statistically
where it holds in expectation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks
from tests.methods.test_deeplift import make_net, make_x, sums


def mean_background_delta(model, x, background, cls):
    with torch.no_grad():
        return model(x)[:, cls] - model(background)[:, cls].mean()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_deep_shap_additivity(dims, rule):
    model = make_net(dims)
    x = make_x(dims)
    background = 0.5 * make_x(dims, batch=3, seed=5)
    attr = trustmap.explain(model, x, "deep_shap", target=1, background=background, rule=rule)
    delta = mean_background_delta(model, x, background, 1)
    assert (sums(attr) - delta).abs().max() < 1e-10
    assert_no_hooks(model)


def test_deep_shap_is_the_mean_of_deeplift_over_the_background():
    model = make_net(2, maxpool=True)
    x = make_x(2)
    background = make_x(2, batch=3, seed=4)
    ours = trustmap.explain(model, x, "deep_shap", target=0, background=background)
    each = [
        trustmap.explain(model, x, "deeplift", target=0, baseline=background[j : j + 1])
        for j in range(3)
    ]
    assert torch.allclose(ours, torch.stack(each).mean(0), rtol=0, atol=1e-14)


def test_deep_shap_batch_size_does_not_change_the_result():
    model = make_net(2)
    x = make_x(2)
    background = make_x(2, batch=5, seed=4)
    full = trustmap.explain(model, x, "deep_shap", target=2, background=background)
    for batch_size in (1, 2):
        chunked = trustmap.explain(
            model, x, "deep_shap", target=2, background=background, batch_size=batch_size
        )
        assert torch.allclose(full, chunked, rtol=0, atol=1e-15)


def test_deep_shap_drawn_background_is_seeded_and_reported():
    model = make_net(2)
    x = make_x(2)
    first = trustmap.get_method("deep_shap")(model, background=3, seed=11).explain(x)
    second = trustmap.get_method("deep_shap")(model, background=3, seed=11).explain(x)
    other = trustmap.get_method("deep_shap")(model, background=3, seed=12).explain(x)
    assert torch.equal(first.attributions, second.attributions)
    assert not torch.equal(first.attributions, other.attributions)
    unseeded = trustmap.get_method("deep_shap")(model, background=2).explain(x)
    assert isinstance(unseeded.params["seed"], int)

    from trustmap.methods.relevance.deep_shap import draw_background

    background = draw_background(x, 3, 11)
    lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
    assert ((background >= lo.view(1, 2, 1, 1)) & (background <= hi.view(1, 2, 1, 1))).all()
    delta = mean_background_delta(model, x, background, 1)
    attr = trustmap.explain(model, x, "deep_shap", target=1, background=3, seed=11)
    assert (sums(attr) - delta).abs().max() < 1e-10


def test_background_validation():
    model = make_net(2)
    x = make_x(2)
    with pytest.raises(ValueError, match="background has shape"):
        trustmap.explain(model, x, "deep_shap", background=torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="background must be"):
        trustmap.explain(model, x, "gradient_shap", background="zeros")
    with pytest.raises(ValueError, match="background must be a positive integer"):
        trustmap.explain(model, x, "deep_shap", background=0)
    single = trustmap.explain(model, x, "deep_shap", target=0, background=torch.zeros(2, 8, 8))
    dl = trustmap.explain(model, x, "deeplift", target=0)
    assert torch.allclose(single, dl, rtol=0, atol=1e-15)


# -- GradientSHAP ----------------------------------------------------------------------------


def _linear_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).double().eval()


def test_gradient_shap_exact_on_a_linear_model():
    # Gradient constant: each draw contributes w * (x - r); the draws cycle through the
    # background evenly, so with n_samples a multiple of N the sum is exactly
    # f(x) - mean_j f(r_j).
    model = _linear_model()
    x = make_x(2)
    background = make_x(2, batch=4, seed=8)
    attr = trustmap.explain(
        model, x, "gradient_shap", target=1, background=background, n_samples=8, seed=0
    )
    assert (sums(attr) - mean_background_delta(model, x, background, 1)).abs().max() < 1e-12
    w = model[1].weight[1].view(2, 8, 8)
    expected = w * (x - background.mean(0, keepdim=True))
    assert torch.allclose(attr, expected, rtol=0, atol=1e-14)


def test_gradient_shap_additivity_in_expectation():
    # On a ReLU network E[sum A] = f(x) - E[f(r)]: the mean of independent estimates must
    # lie within 4 standard errors of it (a failure rate near 1e-4 for a correct method).
    model = make_net(2)
    x = make_x(2, batch=2)
    background = 0.5 * make_x(2, batch=4, seed=6)
    target = mean_background_delta(model, x, background, 1)
    runs = torch.stack(
        [
            sums(
                trustmap.explain(
                    model, x, "gradient_shap", target=1, background=background,
                    n_samples=16, seed=seed, batch_size=32,
                )
            )
            for seed in range(12)
        ]
    )  # fmt: skip
    mean, se = runs.mean(0), runs.std(0) / len(runs) ** 0.5
    assert ((mean - target).abs() <= 4 * se + 1e-9).all(), (mean, target, se)
    assert (runs.std(0) > 0).all()


def test_gradient_shap_with_one_baseline_estimates_integrated_gradients():
    model = make_net(2)
    x = make_x(2, batch=2)
    baseline = 0.3 * make_x(2, batch=1, seed=2)
    ig = trustmap.explain(model, x, "integrated_gradients", target=0, baseline=baseline,
                          n_steps=32, rule="gauss_legendre")  # fmt: skip
    gs = trustmap.explain(model, x, "gradient_shap", target=0, background=baseline,
                          n_samples=300, seed=0, batch_size=600)  # fmt: skip
    # Monte Carlo over the path: relative error ~ 1/sqrt(300) of the spread.
    assert (gs - ig).abs().max() < 0.1 * ig.abs().max()
    assert torch.corrcoef(torch.stack([gs.flatten(), ig.flatten()]))[0, 1] > 0.99


def test_gradient_shap_seed_noise_and_batching():
    model = make_net(2)
    x = make_x(2)
    background = make_x(2, batch=3, seed=8)
    kw = {"background": background, "n_samples": 5, "stdev": 0.1, "seed": 4}
    a = trustmap.get_method("gradient_shap")(model, **kw).explain(x)
    b = trustmap.get_method("gradient_shap")(model, batch_size=4, **kw).explain(x)
    assert torch.allclose(a.attributions, b.attributions, rtol=0, atol=1e-14)
    c = trustmap.get_method("gradient_shap")(model, **{**kw, "stdev": 0.0}).explain(x)
    assert not torch.allclose(a.attributions, c.attributions)
    assert a.params["seed"] == 4
    drawn = trustmap.get_method("gradient_shap")(model, n_samples=2).explain(x)
    assert isinstance(drawn.params["seed"], int)
    with pytest.raises(ValueError, match="stdev"):
        trustmap.explain(model, x, "gradient_shap", stdev=-1.0)
    with pytest.raises(ValueError, match="n_samples"):
        trustmap.explain(model, x, "gradient_shap", n_samples=0)


def test_monai_resnet_3d_runs():
    from monai.networks.nets import resnet10

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2).eval()
    x = torch.rand((1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    for name, kw in (("deep_shap", {"background": 2}), ("gradient_shap", {"n_samples": 2})):
        attr = trustmap.explain(model, x, name, seed=0, **kw)
        assert attr.shape == x.shape
        assert torch.isfinite(attr).all() and attr.abs().sum() > 0
    assert_no_hooks(model)
