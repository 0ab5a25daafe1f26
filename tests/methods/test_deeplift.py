"""DeepLIFT: summation-to-delta through real architectural patterns, the rules on hand
examples, max pooling, errors, and MONAI networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
AVG = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
GAP = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
MAXP = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


class ResCat(nn.Module):
    """BatchNorm with negative scales, a reused in-place ReLU, F.relu, a residual
    addition (in place), a concatenation followed by BatchNorm and ReLU, average pooling
    and a linear head; optionally a max pool and another activation."""

    def __init__(self, dims: int = 2, act: nn.Module | None = None, maxpool: bool = False):
        super().__init__()
        conv, norm = CONV[dims], NORM[dims]
        self.conv1 = conv(2, 4, 3, padding=1)
        self.bn1 = norm(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(4, 4, 3, padding=1)
        self.bn2 = norm(4)
        self.side = conv(4, 3, 1)
        self.bn3 = norm(7)
        self.pool = MAXP[dims](2) if maxpool else AVG[dims](2)
        self.conv3 = conv(7, 5, 3, padding=1)
        self.act = act
        self.gap = GAP[dims](1)
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(-1.0, 1.0)
                bn.bias.uniform_(-0.2, 0.2)
            self.fc.weight.mul_(20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        r = self.bn2(self.conv2(h))
        r += h
        h = self.relu(r)
        # DenseNet's pre-activation pattern: concatenation, BatchNorm, ReLU.
        h = self.relu(self.bn3(torch.cat([h, self.side(h)], dim=1)))
        h = self.pool(h)
        h = self.conv3(h)
        h = self.act(h) if self.act is not None else F.relu(h)
        return self.fc(self.gap(h).flatten(1))


def make_net(dims: int = 2, seed: int = 0, **kw) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ResCat(dims, **kw).double().eval()


def make_x(dims: int, batch: int = 3, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    spatial = (8, 8) if dims == 2 else (4, 6, 6)
    return scale * torch.randn((batch, 2, *spatial), generator=gen, dtype=torch.float64)


def score_delta(model: nn.Module, x: torch.Tensor, ref: torch.Tensor, cls: int) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[:, cls] - model(ref.expand_as(x))[:, cls]


def sums(attr: torch.Tensor) -> torch.Tensor:
    return attr.reshape(attr.shape[0], -1).sum(1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_summation_to_delta(dims, rule):
    model = make_net(dims)
    x = make_x(dims)
    ref = 0.3 * make_x(dims, batch=1, seed=7)
    attr = trustmap.explain(model, x, "deeplift", target=2, baseline=ref, rule=rule)
    delta = score_delta(model, x, ref, 2)
    assert (sums(attr) - delta).abs().max() < 1e-10
    assert delta.abs().min() > 1e-3, "a vacuous identity"
    assert_no_hooks(model)


@pytest.mark.parametrize("baseline", ["zeros", "blur", "min", "uniform", 0.25])
def test_summation_to_delta_for_every_baseline(baseline):
    model = make_net(2)
    x = make_x(2)
    exp = trustmap.get_method("deeplift")(model, baseline=baseline, seed=3).explain(x, target=0)
    assert exp.params["seed"] == 3
    from trustmap.methods.gradient.integrated_gradients import make_baseline

    ref = make_baseline(x, baseline, seed=3, blur_sigma=None)
    with torch.no_grad():
        delta = model(x)[:, 0] - model(ref)[:, 0]
    assert (sums(exp.attributions) - delta).abs().max() < 1e-10


@pytest.mark.parametrize(
    "act", [nn.Sigmoid(), nn.Tanh(), nn.ELU(), nn.Softplus(), nn.GELU(), nn.LeakyReLU(0.1)]
)
@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_other_activations_keep_summation_to_delta(act, rule):
    model = make_net(2, act=act)
    x = make_x(2)
    ref = torch.zeros_like(x[:1])
    attr = trustmap.explain(model, x, "deeplift", target=1, rule=rule)
    assert (sums(attr) - score_delta(model, x, ref, 1)).abs().max() < 1e-10


def test_maxpool_rules():
    model = make_net(2, maxpool=True)
    x = make_x(2)
    ref = make_x(2, batch=1, seed=9)
    delta = score_delta(model, x, ref, 1)
    for rule in ("rescale", "reveal_cancel"):
        attr = trustmap.explain(model, x, "deeplift", target=1, baseline=ref, rule=rule)
        assert (sums(attr) - delta).abs().max() < 1e-10
    # The gradient through the argmax of x ignores the reference's own maximum, so it
    # misses summation-to-delta by a visible amount.
    attr = trustmap.explain(model, x, "deeplift", target=1, baseline=ref, maxpool="gradient")
    assert (sums(attr) - delta).abs().max() > 1e-4


def _cancel_model() -> nn.Module:
    lin = nn.Linear(2, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
        lin.bias.fill_(0.5)
    return nn.Sequential(nn.Flatten(), lin, nn.ReLU()).eval()


def test_reveal_cancel_reveals_cancelling_inputs():
    # y = relu(x1 - x2 + 0.5) at x = (1, 1) against x' = 0: the two inputs cancel. By hand
    # (Shrikumar et al. 2017, section 3.5.3): dz+ = 1, dz- = -1, z' = 0.5,
    # dy+ = (relu(1.5) - relu(0.5)) / 2 + (relu(0.5) - relu(-0.5)) / 2 = 0.75 = -dy-,
    # so x1 gets +0.75 and x2 gets -0.75, where rescale gives both 0 (dy = 0).
    model = _cancel_model()
    x = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    rc = trustmap.explain(model, x, "deeplift", target=1, rule="reveal_cancel")
    assert torch.allclose(rc.flatten(), torch.tensor([0.75, -0.75], dtype=torch.float64))
    rs = trustmap.explain(model, x, "deeplift", target=1, rule="rescale")
    assert torch.equal(rs.flatten(), torch.zeros(2, dtype=torch.float64))


def test_rescale_rule_by_hand():
    # One sigmoid neuron: A_i = w_i dx_i (sigmoid(z) - sigmoid(z')) / (z - z').
    lin = nn.Linear(3, 1).double()
    model = nn.Sequential(nn.Flatten(), lin, nn.Sigmoid()).eval()
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    ref = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64).view(1, 3, 1, 1)
    attr = trustmap.explain(model, x, "deeplift", target=1, baseline=ref)
    with torch.no_grad():
        w, b = lin.weight[0], lin.bias[0]
        z, zr = w @ x.flatten() + b, w @ ref.flatten() + b
        m = (torch.sigmoid(z) - torch.sigmoid(zr)) / (z - zr)
        expected = w * (x - ref).flatten() * m
    assert torch.allclose(attr.flatten(), expected, atol=1e-15)


def test_relu_multiplier_at_equal_pre_activations_falls_back():
    # x equal to the baseline: every difference is zero, and so is the map.
    model = make_net(2)
    x = make_x(2)
    attr = trustmap.explain(model, x, "deeplift", baseline=x.clone(), target=0)
    assert torch.equal(attr, torch.zeros_like(attr))


class _Bad(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.LayerNorm([2, 6, 6])
        self.gn = nn.GroupNorm(1, 2)
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "layernorm":
            h = self.norm(h)
        elif self.kind == "groupnorm":
            h = self.gn(h)
        elif self.kind == "product":
            h = h * torch.sigmoid(h)
        elif self.kind == "softmax":
            h = torch.softmax(h, dim=1)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("layernorm", "layer_norm"),
        ("groupnorm", "group_norm"),
        ("product", "product of activations"),
        ("softmax", "softmax"),
    ],
)
@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_unsupported_op_names_the_op_and_layer(kind, message, rule):
    model = _Bad(kind).eval()
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(ValueError, match=message) as info:
        trustmap.explain(model, x, "deeplift", rule=rule)
    assert "layer" in str(info.value) or "forward of _Bad" in str(info.value)
    assert_no_hooks(model)


def test_error_names_the_submodule():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 4), nn.Softmax(1))
    with pytest.raises(ValueError, match=r"layer '3' \(Softmax\)"):
        trustmap.explain(model.eval(), torch.randn(1, 1, 6, 6), "deeplift")


def test_batchnorm_without_running_stats_is_refused():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
        nn.Linear(32, 2),
    )  # fmt: skip
    with pytest.raises(ValueError, match="batch's own statistics"):
        trustmap.explain(model, torch.randn(2, 1, 6, 6), "deeplift")


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = x.flatten(1)
        h = torch.relu(h) if bool((h > 0).all()) else torch.sigmoid(h)
        return self.fc(h)


def test_data_dependent_control_flow_is_detected():
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="different path"):
        trustmap.explain(_Branchy().eval(), x, "deeplift")


def test_bad_parameters():
    model = make_net(2)
    x = make_x(2)
    with pytest.raises(ValueError, match="rule must be one of"):
        trustmap.explain(model, x, "deeplift", rule="revealcancel")
    with pytest.raises(ValueError, match="maxpool must be one of"):
        trustmap.explain(model, x, "deeplift", maxpool="max")
    with pytest.raises(ValueError, match="broadcast"):
        trustmap.explain(model, x, "deeplift", baseline=torch.zeros(5, 2, 8, 8))


def test_torchscript_is_refused():
    model = torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.Flatten()))
    with pytest.raises(ValueError, match="TorchScript"):
        trustmap.explain(model, torch.randn(1, 1, 5, 5), "deeplift", target=0)


def test_conv1d_inside_a_model():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)
            self.fc = nn.Linear(3 * 14, 2)

        def forward(self, x):
            b = x.shape[0]
            return self.fc(torch.tanh(self.conv(x.reshape(b, 2, -1))).flatten(1))

    model = Seq().double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for rule in ("rescale", "reveal_cancel"):
        attr = trustmap.explain(model, x, "deeplift", target=1, rule=rule)
        delta = score_delta(model, x, torch.zeros_like(x[:1]), 1)
        assert (sums(attr) - delta).abs().max() < 1e-10


# -- MONAI networks ------------------------------------------------------------------------


def _monai(arch: str, dims: int) -> nn.Module:
    from monai.networks.nets import DenseNet121, resnet18

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if arch == "densenet":
            return DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2).eval()
        return resnet18(spatial_dims=dims, n_input_channels=1, num_classes=2).eval()


@pytest.mark.parametrize(("arch", "dims"), [("densenet", 2), ("resnet", 3)])
def test_monai_summation_to_delta_float64(arch, dims):
    model = _monai(arch, dims).double()
    shape = (1, 1, 32, 32) if dims == 2 else (1, 1, 16, 16, 16)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = torch.full_like(x, 0.5)
    attr = trustmap.explain(model, x, "deeplift", target=1, baseline=ref)
    delta = score_delta(model, x, ref, 1)
    assert (sums(attr) - delta).abs().max() < 1e-6 * max(1.0, float(delta.abs().max()))
    assert attr.abs().sum() > 0
    assert_no_hooks(model)


@pytest.mark.parametrize(
    ("arch", "dims", "rule"), [("densenet", 3, "rescale"), ("resnet", 3, "reveal_cancel")]
)
def test_monai_runs(arch, dims, rule):
    model = _monai(arch, dims)
    shape = {2: (2, 1, 32, 32), 3: (1, 1, 32, 32, 32) if arch == "densenet" else (1, 1, 16, 16, 16)}
    x = torch.rand(shape[dims], generator=torch.Generator().manual_seed(0))
    attr = trustmap.explain(model, x, "deeplift", rule=rule)
    assert attr.shape == x.shape
    assert torch.isfinite(attr).all() and attr.abs().sum() > 0
    assert_no_hooks(model)
