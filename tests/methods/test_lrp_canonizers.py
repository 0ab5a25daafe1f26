"""LRP canonizers: BatchNorm folding (exact, eps included, 1D-3D, before and after a
layer), proportional residual split, concatenation, and the model left untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.methods.relevance import _canonizers as canon
from trustmap.methods.relevance import _rules as rules
from trustmap.methods.relevance._composites import Composite, build_composite
from trustmap.methods.relevance._lrp_engine import lrp_pass

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def random_bn(c: int, dims: int, dtype: torch.dtype, eps: float = 0.1) -> nn.Module:
    bn = NORM[dims](c, eps=eps).to(dtype).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def affine_of(bn: nn.Module) -> canon.BatchNormAffine:
    return canon.batchnorm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_after_reproduces_conv_then_batchnorm(dims, dtype):
    torch.manual_seed(dims)
    conv = CONV[dims](3, 4, 3, padding=1, groups=1).to(dtype)
    bn = random_bn(4, dims, dtype)  # eps = 0.1: a fold that dropped eps would be far off
    x = torch.randn(2, 3, *([6] * dims), dtype=dtype)
    w, b = canon.fold_after(conv.weight.detach(), conv.bias.detach(), affine_of(bn))
    with torch.no_grad():
        expected = bn(conv(x))
        merged = conv._conv_forward(x, w, b)
    assert (merged - expected).abs().max() <= TOL[dtype] * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_after_linear(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).to(dtype)
    bn = random_bn(3, 1, dtype)
    x = torch.randn(4, 5, dtype=dtype)
    w, b = canon.fold_after(lin.weight.detach(), lin.bias.detach(), affine_of(bn))
    with torch.no_grad():
        expected = bn(lin(x))
    assert (F.linear(x, w, b) - expected).abs().max() <= TOL[dtype] * expected.abs().max()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_fold_before_with_padding_is_exact_with_a_bias_map(dims, groups):
    torch.manual_seed(dims + groups)
    dtype = torch.float64
    conv = CONV[dims](4, 6, 3, padding=1, groups=groups, bias=True).to(dtype)
    bn = random_bn(4, dims, dtype)
    x = torch.randn(2, 4, *([5] * dims), dtype=dtype)
    w = canon.fold_before(conv.weight.detach(), affine_of(bn), groups)
    with torch.no_grad():
        expected = conv(bn(x))
        linear_part = conv._conv_forward(x, w, None)
    bias_map = canon.shift_contribution(expected, linear_part)
    # The shift's contribution varies over space at the zero-padded border...
    interior = (slice(None), slice(None), *([slice(1, -1)] * dims))
    border_differs = (bias_map - bias_map[interior].mean()).abs().max() > 1e-6
    assert border_differs
    # ...and in the interior it is the constant W t + b per channel, as for no padding.
    c_out = bias_map.shape[1]
    per_channel = bias_map[interior].reshape(2, c_out, -1)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-12)
    assert torch.allclose(linear_part + bias_map, expected, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Folding inside the engine: a conv + BN model explains like its merged conv
# ----------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    def __init__(self, dims: int, order: str) -> None:
        super().__init__()
        self.order = order
        c_in = 3
        self.conv = CONV[dims](c_in, 5, 3, padding=0 if order == "before" else 1)
        self.bn = NORM[dims](c_in if order == "before" else 5)
        self.head = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        h = self.conv(self.bn(x)) if self.order == "before" else self.bn(self.conv(x))
        return self.head(F.relu(h).flatten(2).mean(2))


class Merged(nn.Module):
    def __init__(self, conv: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.head = head

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).flatten(2).mean(2))


def merged_copy(model: ConvBN, dims: int) -> Merged:
    conv = CONV[dims](3, 5, 3, padding=model.conv.padding).double()
    affine = affine_of(model.bn)
    w, b = model.conv.weight.detach(), model.conv.bias.detach()
    with torch.no_grad():
        if model.order == "after":
            w, b = canon.fold_after(w, b, affine)
        else:
            w = canon.fold_before(w, affine)
            # Without padding the shift's contribution is a plain bias: W t + b.
            b = b + (model.conv.weight * affine.shift.view(1, -1, *([1] * dims))).flatten(1).sum(1)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return Merged(conv, model.head).eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize(
    "rule", [rules.epsilon(1e-3), rules.zplus(), rules.gamma(0.5), rules.alpha_beta(2, 1)]
)
def test_engine_folds_like_the_merged_layer(dims, order, rule):
    torch.manual_seed(dims)
    model = ConvBN(dims, order).double().eval()
    bn = random_bn(model.bn.num_features, dims, torch.float64)
    model.bn.load_state_dict(bn.state_dict())
    merged = merged_copy(model, dims)
    x = torch.randn(2, 3, *([6] * dims), dtype=torch.float64)
    composite = Composite("t", rule, rules.epsilon(1e-9), rule)
    results = []
    for net in (model, merged):
        with lrp_pass(net, x, composite, method="lrp", epsilon=1e-9) as run:
            tape = run()
        results.append(tape.relevance(tape.output[:, 1].sum())[0])
        if net is model:
            assert tape.summary[f"folded_{order}"] == ["conv"]
    assert torch.allclose(results[0], results[1], rtol=1e-9, atol=1e-13)


def test_no_fold_when_the_conv_output_is_used_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            h = self.conv(x)
            return (F.relu(self.bn(h)) + F.relu(h)).sum((2, 3))

    model = Twice().double().eval()
    x = make_input(2, 2, channels=2, dtype=torch.float64)
    composite = build_composite("epsilon_plus", epsilon=1e-12)
    with lrp_pass(model, x, composite, method="lrp", epsilon=1e-12) as run:
        tape = run()
    assert tape.summary["folded_after"] == []
    rel, _ = tape.relevance(tape.output[:, 0].sum())
    # Unmerged, the BatchNorm (shift 0 here) is an affine layer: relevance still conserved.
    assert torch.allclose(rel.reshape(2, -1).sum(1), tape.output[:, 0].detach(), rtol=1e-8)


def test_batchnorm_behind_a_relu_is_not_merged():
    # DenseNet's order: BN -> ReLU -> conv. Merging across the ReLU would change the model.
    model = (
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3))
        .double()
        .eval()
    )
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    composite = build_composite("epsilon_plus", epsilon=1e-9)
    x = make_input(2, 1, dtype=torch.float64)
    with lrp_pass(model, x, composite, method="lrp", epsilon=1e-9) as run:
        tape = run()
    assert tape.summary["folded_after"] == ["0"]
    assert tape.summary["folded_before"] == []


# ----------------------------------------------------------------------------------------
# Residual additions and concatenations
# ----------------------------------------------------------------------------------------
class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.b = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.add = Sum()
        self.cat = Cat()
        self.head = nn.Linear(6, 2, bias=False)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        c = self.cat(F.relu(self.add(a, b)), F.relu(a))  # channels: relu(a), relu(a + b)
        return self.head(c.mean((2, 3)))


class Sum(nn.Module):
    def forward(self, a, b):
        return a + b


class Cat(nn.Module):
    def forward(self, a, b):
        return torch.cat([b, a], dim=1)


@pytest.mark.parametrize("eps", [1e-9, 0.5])
def test_residual_split_is_proportional(eps):
    torch.manual_seed(1)
    model = Branches().double().eval()
    x = make_input(2, 2, dtype=torch.float64)
    composite = Composite("t", rules.epsilon(eps), rules.epsilon(eps), rules.epsilon(eps))
    names = ["a", "b", "add"]
    with lrp_pass(model, x, composite, method="lrp", epsilon=eps, record=names) as run:
        tape = run()
    a, b, z = (tape.layer_outputs[n] for n in names)
    out = tape.output
    _, (r_a, r_b) = tape.relevance(out[:, 0].sum(), [a, b])
    a, b, z, out = a.detach(), b.detach(), z.detach(), out.detach()
    # The gradient of the score reaching z and a through the head (epsilon rule), the
    # channel means and the ReLUs; the relevance of z is R_z = z * g_z.
    head = model.head.weight[0].detach() / z[0, 0].numel()
    ratio = (out[:, 0] / rules.stabilize(out[:, 0], eps)).view(-1, 1, 1, 1)
    g_z = head[3:].view(1, 3, 1, 1) * ratio * (z > 0)
    g_a = head[:3].view(1, 3, 1, 1) * ratio * (a > 0)
    share = z * g_z / rules.stabilize(z, eps)  # R_z / stab(z)
    # Each summand gets its share a / stab(z) of R_z; a also keeps its own direct path.
    assert torch.allclose(r_b, b * share, rtol=1e-10, atol=1e-14)
    assert torch.allclose(r_a, a * share + a * g_a, rtol=1e-10, atol=1e-14)
    if eps == 0.5:
        # The stabiliser is really applied at the addition.
        assert not torch.allclose(r_b, b * g_z, rtol=1e-3)


def test_concatenation_returns_each_part_its_slice():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Conv2d(1, 2, 3, padding=1, bias=False)
            self.q = nn.Conv2d(1, 3, 3, padding=1, bias=False)
            self.cat = Cat()
            self.head = nn.Linear(5, 1, bias=False)

        def forward(self, x):
            return self.head(F.relu(self.cat(self.p(x), self.q(x))).mean((2, 3)))

    torch.manual_seed(2)
    model = Two().double().eval()
    x = make_input(2, 2, dtype=torch.float64)
    composite = build_composite("epsilon", epsilon=0.0)
    names = ["p", "q", "cat"]
    with lrp_pass(model, x, composite, method="lrp", epsilon=0.0, record=names) as run:
        tape = run()
    _, (r_p, r_q, r_cat) = tape.relevance(
        tape.output[:, 0].sum(), [tape.layer_outputs[n] for n in names]
    )
    assert torch.allclose(r_q, r_cat[:, :3], atol=1e-14)
    assert torch.allclose(r_p, r_cat[:, 3:], atol=1e-14)


# ----------------------------------------------------------------------------------------
# The model is left exactly as it was
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", ["lrp", "deep_taylor"])
def test_model_is_bit_identical_and_output_unchanged(dims, method):
    model = make_tiny(dims, in_channels=2)
    model.train()
    x = make_input(dims, 2, channels=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, id(m), type(m)) for n, m in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    exp = trustmap.get_method(method)(model).explain(x)
    # The canonized pass computes exactly what the model computes.
    assert torch.equal(exp.output, expected)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [(n, id(m), type(m)) for n, m in model.named_modules()] == modules
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(m.training for m in model.modules())
    assert_no_hooks(model)
