"""Gradient-family methods against captum in float64 on small CNNs (rel. tol. 1e-6)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Saliency,
)

import trustmap
from tests.conftest import make_input, make_tiny
from trustmap.core.seeding import generator


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    scale = b.abs().max().clamp(min=1e-30)
    assert (a - b).abs().max() <= rtol * scale, f"max diff {(a - b).abs().max()} vs {scale}"


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def setup(request):
    dims = request.param
    model = make_tiny(dims, in_channels=2).double().eval()
    x = make_input(dims, 3, channels=2, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    return model, x, target


def test_gradient_matches_captum_saliency_unsigned(setup):
    model, x, target = setup
    ours = trustmap.explain(model, x, "gradient", target=target)
    ref = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=False)
    close(ours, ref)


def test_saliency_is_channel_max_of_abs_gradient(setup):
    model, x, target = setup
    ours = trustmap.explain(model, x, "saliency", target=target)
    ref = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=True)
    close(ours, ref.amax(1, keepdim=True).expand_as(ref))


def test_input_x_gradient(setup):
    model, x, target = setup
    ours = trustmap.explain(model, x, "input_x_gradient", target=target)
    ref = InputXGradient(model).attribute(x.clone().requires_grad_(), target=target)
    close(ours, ref)


@pytest.mark.parametrize(
    ("name", "peer"), [("guided_backprop", GuidedBackprop), ("deconvnet", Deconvolution)]
)
def test_relu_rules_match_captum(setup, name, peer):
    model, x, target = setup
    ours = trustmap.explain(model, x, name, target=target)
    # captum replaces nn.ReLU modules only, so give it a model whose ReLUs are all modules
    # and distinct; ours must agree with it although TinyCNN reuses one in-place ReLU
    # and calls F.relu inside forward.
    ref = peer(ModuleReLUs(model)).attribute(x.clone().requires_grad_(), target=target)
    close(ours, ref)
    plain = trustmap.explain(model, x, "gradient", target=target)
    assert (ours - plain).abs().max() > 1e-3 * plain.abs().max(), "rule had no effect"


class ModuleReLUs(torch.nn.Module):
    """TinyCNN's forward with three separate out-of-place nn.ReLU modules."""

    def __init__(self, tiny):
        super().__init__()
        self.t = tiny
        self.r1, self.r2, self.r3 = (torch.nn.ReLU() for _ in range(3))

    def forward(self, x):
        t = self.t
        x = self.r1(t.bn1(t.conv1(x)))
        x = self.r2(t.conv2(x))
        x = self.r3(t.conv3(x))
        return t.fc(t.pool(x).flatten(1))


@pytest.mark.parametrize(
    ("rule", "method"), [("trapezoid", "riemann_trapezoid"), ("gauss_legendre", "gausslegendre")]
)
@pytest.mark.parametrize("baseline", ["zeros", "tensor"])
def test_integrated_gradients(setup, rule, method, baseline):
    model, x, target = setup
    base = torch.zeros_like(x) if baseline == "zeros" else 0.3 * torch.ones_like(x)
    ours = trustmap.explain(
        model,
        x,
        "integrated_gradients",
        target=target,
        n_steps=25,
        rule=rule,
        baseline="zeros" if baseline == "zeros" else base,
    )
    ref = IntegratedGradients(model).attribute(
        x.clone(), baselines=base, target=target, n_steps=25, method=method
    )
    if rule == "trapezoid":
        # captum's trapezoid weights are 1/n (halved at the ends), summing to (n-1)/n; the
        # trapezoid rule on n equally spaced nodes over [0, 1] has weights 1/(n-1). Ours
        # keeps completeness exact in the limit; scale to compare the same nodes.
        ours = ours * 24 / 25
    close(ours, ref)


def test_integrated_gradients_chunking_is_exact(setup):
    model, x, target = setup
    whole = trustmap.explain(model, x, "integrated_gradients", target=target, batch_size=75)
    small = trustmap.explain(model, x, "integrated_gradients", target=target, batch_size=4)
    close(small, whole, 1e-12)


@pytest.mark.parametrize(
    ("variant", "nt_type"),
    [("mean", "smoothgrad"), ("squared", "smoothgrad_sq"), ("vargrad", "vargrad")],
)
def test_smoothgrad_matches_noise_tunnel_on_the_same_noise(setup, variant, nt_type):
    """captum's NoiseTunnel draws its noise from the global RNG, so both are fed the same
    noisy copies: ours from its seed, captum's through a noise function that replays them."""
    model, x, target = setup
    n, level, seed = 5, 0.15, 11
    ours = trustmap.explain(
        model,
        x,
        "smoothgrad",
        target=target,
        n_samples=n,
        noise_level=level,
        variant=variant,
        seed=seed,
    )
    flat = x.reshape(x.shape[0], -1)
    sigma = level * (flat.amax(1) - flat.amin(1))
    gen = generator(seed, x.device)
    noise = torch.randn((n, *x.shape), generator=gen, dtype=x.dtype)
    noisy = x.unsqueeze(0) + noise * sigma.view(1, -1, *([1] * (x.ndim - 1)))
    # NoiseTunnel lays samples out input-major: row i*n + j is sample i, draw j.
    replay = noisy.transpose(0, 1).reshape(-1, *x.shape[1:])
    sal = Saliency(model)

    def forward_on_replayed(inp):  # captum gives us x repeated; we substitute the draws
        return model(replay.to(inp.dtype) + (inp - inp.detach()))

    nt = NoiseTunnel(Saliency(forward_on_replayed))
    ref = nt.attribute(
        x.clone().requires_grad_(),
        nt_type=nt_type,
        nt_samples=n,
        stdevs=0.0,
        target=target,
        abs=False,
    )
    del sal
    close(ours, ref)


def test_smooth_ig_is_smoothgrad_around_ig(setup):
    model, x, target = setup
    a = trustmap.explain(model, x, "smooth_ig", target=target, n_samples=3, n_steps=5, seed=4)
    b = trustmap.explain(
        model,
        x,
        "smoothgrad",
        base="integrated_gradients",
        target=target,
        n_samples=3,
        n_steps=5,
        seed=4,
    )
    close(a, b, 1e-12)
