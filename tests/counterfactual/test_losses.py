"""Each loss term on known answers."""

from __future__ import annotations

import pytest
import torch
from skimage.metrics import structural_similarity

from trustmap.counterfactual import losses as L


def _pair(dims=2, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 1, 32, 32) if dims == 2 else (2, 1, 16, 16, 16)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("dims", [2, 3])
def test_ssim_matches_scikit_image_gaussian_ssim(dims):
    x, y = _pair(dims)
    ours = L.ssim(x, y, reduction="none")
    for i in range(2):
        ref = structural_similarity(
            x[i, 0].numpy(),
            y[i, 0].numpy(),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert float(ours[i]) == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("multiscale", [False, True])
def test_dssim_is_zero_for_identical_images_and_grows_with_difference(multiscale):
    x, y = _pair()
    _, z = _pair(noise=0.3)
    assert float(L.dssim(x, x, multiscale=multiscale)) == pytest.approx(0.0, abs=1e-12)
    small, large = L.dssim(x, y, multiscale=multiscale), L.dssim(x, z, multiscale=multiscale)
    assert 0 < float(small) < float(large) <= 1
    assert float(L.dssim(x, 1 - x)) > 0.5  # anti-correlated: SSIM < 0


def test_ms_ssim_uses_as_many_scales_as_fit():
    x, y = _pair()
    # 32 pixels: scales 32 and 16 hold an 11-pixel window, 8 does not -> two scales.
    cs = L._ssim_parts(x, y, 1.0, 11, 1.5, 0.01, 0.03)[1]
    x2 = torch.nn.functional.avg_pool2d(x, 2)
    y2 = torch.nn.functional.avg_pool2d(y, 2)
    full2 = L._ssim_parts(x2, y2, 1.0, 11, 1.5, 0.01, 0.03)[0]
    w = torch.tensor(L.MS_SSIM_WEIGHTS[:2], dtype=torch.float64)
    w = w / w.sum()
    expected = cs ** w[0] * full2 ** w[1]
    assert torch.allclose(L.ms_ssim(x, y, reduction="none"), expected)


def test_l1_cycle_and_similarity_losses_on_known_answers():
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    y = torch.full_like(x, 0.25)
    assert float(L.l1_loss(x, y)) == pytest.approx(0.25)
    # Constant images: SSIM is the luminance term only, (2*0*0.25 + c1)/(0 + 0.0625 + c1).
    c1 = 0.01**2
    ssim = c1 / (0.0625 + c1)
    assert float(L.cycle_loss(x, y)) == pytest.approx(0.5 * (0.25 + (1 - ssim) / 2))
    assert float(L.similarity_loss(x, y)) == pytest.approx((1 - ssim) / 2)
    assert float(L.cycle_loss(x, x)) == 0.0


def test_gradients_flow_through_every_generator_term():
    x, y = _pair()
    y = y.clone().requires_grad_(True)
    logits = [torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)]
    clf = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    total = (
        L.cycle_loss(x, y)
        + L.similarity_loss(x, y, multiscale=True)
        + L.generator_adversarial_loss(logits)
        + L.activation_maximization_loss(clf, 1)
    )
    total.backward()
    for t in (y, logits[0], clf):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_adversarial_labels_are_inverted_for_the_generator():
    lg = torch.tensor([[[[2.0]], [[-1.0]]]])  # one patch: "first image is real" favoured
    p0 = torch.softmax(lg, 1)[0, 0, 0, 0]
    assert float(L.generator_adversarial_loss([lg])) == pytest.approx(float(-torch.log(p0)))
    assert float(L.discriminator_loss([lg])) == pytest.approx(float(-torch.log(1 - p0)))
    # Scales are averaged, each over its patches.
    other = torch.zeros(1, 2, 2, 2)
    both = L.pair_cross_entropy([lg, other], 0)
    assert float(both) == pytest.approx(
        (float(-torch.log(p0)) + float(torch.log(torch.tensor(2.0)))) / 2
    )


def test_activation_maximization_is_low_when_the_classifier_agrees():
    agrees = torch.tensor([[-3.0, 3.0]])  # the classifier says positive
    assert float(L.activation_maximization_loss(agrees, 1)) < 0.01
    assert float(L.activation_maximization_loss(agrees, 0)) > 5
    one_logit = torch.tensor([[3.0]])
    assert float(L.activation_maximization_loss(one_logit, 1)) == pytest.approx(
        float(torch.nn.functional.softplus(torch.tensor(-3.0)))
    )
    # Moving the logits towards the target lowers the loss (and its gradient says so).
    z = torch.tensor([[0.5, -0.5]], requires_grad=True)
    L.activation_maximization_loss(z, 1).backward()
    stepped = (z - 0.5 * z.grad).detach()
    assert L.activation_maximization_loss(stepped, 1) < L.activation_maximization_loss(z, 1)
    with pytest.raises(ValueError, match="binary"):
        L.activation_maximization_loss(torch.zeros(1, 3), 1)


def test_positive_probability_for_two_and_one_logits():
    assert float(L.positive_probability(torch.tensor([[0.0, 0.0]]))) == pytest.approx(0.5)
    assert float(L.positive_probability(torch.tensor([[2.0]]))) == pytest.approx(
        float(torch.sigmoid(torch.tensor(2.0)))
    )
