"""Analytic identities of the gradient family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import make_input


class Linear(nn.Module):
    def __init__(self, shape, n_classes=2, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        numel = int(torch.tensor(shape).prod())
        self.w = nn.Parameter(torch.randn(n_classes, numel, generator=gen, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(n_classes, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


class Smooth(nn.Module):
    """A smooth nonlinear CNN (softplus), where the quadrature error of IG is small."""

    def __init__(self, dims):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        torch.manual_seed(1)
        self.conv = conv(1, 4, 3, padding=1).double()
        self.fc = nn.Linear(4, 2).double()

    def forward(self, x):
        h = nn.functional.softplus(self.conv(x)) ** 2
        return self.fc(h.mean(dim=tuple(range(2, x.ndim))))


@pytest.mark.parametrize("dims", [2, 3])
def test_linear_model_identities(dims):
    x = make_input(dims, 2, dtype=torch.float64)
    model = Linear(x.shape[1:])
    w = model.w.detach()[1].view(1, *x.shape[1:])
    grad = trustmap.explain(model, x, "gradient", target=1)
    assert torch.allclose(grad, w.expand_as(x))
    assert torch.allclose(trustmap.explain(model, x, "input_x_gradient", target=1), w * x)
    # IG of a linear model from a zero baseline is exactly w * x for any rule.
    for rule in ("trapezoid", "gauss_legendre"):
        ig = trustmap.explain(model, x, "integrated_gradients", target=1, n_steps=3, rule=rule)
        assert torch.allclose(ig, w * x)
    sg = trustmap.explain(model, x, "smoothgrad", target=1, n_samples=4, seed=0)
    assert torch.allclose(sg, w.expand_as(x))
    var = trustmap.explain(model, x, "smoothgrad", target=1, variant="vargrad", seed=0)
    assert var.abs().max() < 1e-12 * w.abs().max() ** 2
    sal = trustmap.explain(model, x, "saliency", target=1)
    assert torch.allclose(sal, w.abs().expand_as(x))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("baseline", ["zeros", "min", "max", "blur", "uniform"])
@pytest.mark.parametrize("rule", ["trapezoid", "gauss_legendre"])
def test_integrated_gradients_completeness(dims, baseline, rule):
    """sum IG = f(x) - f(x') within 1% of |f(x) - f(x')| at 25 steps."""
    from trustmap.methods.gradient.integrated_gradients import make_baseline

    model = Smooth(dims)
    x = make_input(dims, 3, dtype=torch.float64) * 2
    exp = trustmap.get_method("integrated_gradients")(
        model, n_steps=25, baseline=baseline, rule=rule, seed=5
    ).explain(x, target=0)
    ref = make_baseline(x, baseline, seed=5, blur_sigma=None)
    with torch.no_grad():
        diff = model(x)[:, 0] - model(ref)[:, 0]
    total = exp.attributions.flatten(1).sum(1)
    # 1% of the difference; where a sample's f(x) and f(x') nearly coincide the relative
    # error is ill-conditioned, so the floor is 1% of the batch's largest difference.
    tol = 0.01 * torch.maximum(diff.abs(), diff.abs().max().expand_as(diff))
    assert torch.all((total - diff).abs() <= tol), (total, diff)


def test_trapezoid_weights_integrate_polynomials_exactly():
    from trustmap.methods.gradient.integrated_gradients import path_rule

    a, w = path_rule(5, "trapezoid", torch.float64)
    assert torch.isclose((w * a).sum(), torch.tensor(0.5, dtype=torch.float64))
    a, w = path_rule(4, "gauss_legendre", torch.float64)
    # 4-node Gauss-Legendre is exact up to degree 7.
    assert torch.isclose((w * a**7).sum(), torch.tensor(1 / 8, dtype=torch.float64))


def test_guided_backprop_handles_relu_forms_identically():
    """nn.ReLU(inplace) reused, F.relu, torch.relu and Tensor.relu give the same map."""

    class Forms(nn.Module):
        def __init__(self, form):
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.c2 = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 3, 3)
            self.fc = nn.Linear(3, 2)
            self.act = nn.ReLU(inplace=True)
            self.form = form

        def relu(self, h):
            return {
                "module": lambda t: self.act(t),
                "functional": lambda t: nn.functional.relu(t),
                "functional_inplace": lambda t: nn.functional.relu(t, inplace=True),
                "torch": torch.relu,
                "method": lambda t: t.relu(),
                "method_inplace": lambda t: t.relu_(),
            }[self.form](h)

        def forward(self, x):
            h = self.relu(self.c1(x))
            h = self.relu(self.c2(h))
            return self.fc(h.mean((2, 3)))

    x = make_input(2, 2)
    maps = {
        form: trustmap.explain(Forms(form), x, "guided_backprop", target=1)
        for form in (
            "module",
            "functional",
            "functional_inplace",
            "torch",
            "method",
            "method_inplace",
        )
    }
    ref = maps.pop("module")
    for form, m in maps.items():
        assert torch.allclose(m, ref, atol=1e-7), form
    plain = trustmap.explain(Forms("module"), x, "gradient", target=1)
    assert not torch.allclose(plain, ref)


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet"])
@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.LeakyReLU()])
def test_relu_rules_refuse_other_activations(name, act):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), act, nn.Flatten(), nn.Linear(2 * 14 * 14, 2))
    with pytest.raises(ValueError, match=type(act).__name__):
        trustmap.explain(model, make_input(2, 1), name)


def test_relu_rules_refuse_functional_gelu():
    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return nn.functional.gelu(self.c(x)).mean((2, 3))

    with pytest.raises(ValueError, match="GELU"):
        trustmap.explain(F(), make_input(2, 1), "guided_backprop")
