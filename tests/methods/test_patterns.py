"""PatternNet and PatternAttribution: signal recovery, the pattern estimator against its
matrix form, BatchNorm folding, the fit API and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks
from trustmap.methods.relevance.pattern_attribution import PatternAttribution
from trustmap.methods.relevance.pattern_net import PatternNet


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def signal_distractor(n: int = 4000, seed: int = 0):
    """x = a s + d eps with a distractor correlated with the signal direction, and the
    filter w (w.a = 1, w.d = 0) that extracts s exactly."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(16, generator=gen, dtype=torch.float64)
    d = 0.8 * a + 0.6 * torch.randn(16, generator=gen, dtype=torch.float64)
    s = torch.randn(n, generator=gen, dtype=torch.float64)
    eps = 3.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    data = (s[:, None] * a + eps[:, None] * d).view(n, 1, 4, 4)
    w = torch.linalg.lstsq(torch.stack([a, d]), torch.tensor([1.0, 0.0], dtype=torch.float64))
    lin = nn.Linear(16, 1).double()
    with torch.no_grad():
        lin.weight.copy_(w.solution[None])
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).eval(), data, a


@pytest.mark.parametrize("pattern_type", ["linear", "relu"])
def test_pattern_net_recovers_the_signal_direction(pattern_type):
    model, data, a = signal_distractor()
    explainer = PatternNet(model, pattern_type=pattern_type).fit(data)
    x = data[:6]
    signal = explainer.explain(x, target=1).attributions.reshape(6, -1)
    gradient = trustmap.explain(model, x, "gradient", target=1).reshape(6, -1)
    for i in range(6):
        assert abs(cosine(signal[i], a)) > 0.99
        assert abs(cosine(gradient[i], a)) < 0.9
    # The signal estimate is a y: its projection on the filter is the output itself.
    y = model(x).flatten()
    w = model[1].weight.flatten()
    assert torch.allclose(signal @ w, y, atol=1e-10)


def test_pattern_attribution_of_one_linear_layer_is_y_times_w_times_a():
    model, data, _ = signal_distractor()
    net = PatternNet(model, pattern_type="linear").fit(data)
    attr = PatternAttribution(model, pattern_type="linear").fit(data)
    x = data[:3]
    pattern = net.patterns_[0].positive[0]
    w = model[1].weight[0]
    y = model(x).flatten()
    expected = y[:, None] * (w * pattern)[None]
    assert torch.allclose(attr.explain(x, target=1).attributions.reshape(3, -1), expected)


class ConvNet(nn.Module):
    def __init__(self, dims: int = 2, bn: bool = True):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.dims = dims
        self.conv = conv(2, 3, 3, padding=1, stride=2)
        self.bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](3)
        self.use_bn = bn
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.weight.uniform_(-1.0, 1.0)

    def forward(self, x):
        if self.dims == 1:
            x = x.reshape(x.shape[0], 2, -1)
        h = self.conv(x)
        if self.use_bn:
            h = self.bn(h)
        h = F.relu(h)
        return self.fc(h.mean(dim=tuple(range(2, h.ndim))))


def explicit_conv_pattern(model: ConvNet, data: torch.Tensor, pattern_type: str):
    """The matrix form: unfold the receptive fields and take covariances per channel."""
    conv = model.conv
    x = data
    y = conv(x)
    regime = model.bn(y) if model.use_bn else y
    patches = F.unfold(x, 3, padding=1, stride=2)  # (N, C*9, L)
    X = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    Y = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    R = regime.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    w = conv.weight.flatten(1)
    pos = []
    for j in range(y.shape[1]):
        rows = R[:, j] > 0 if pattern_type == "relu" else torch.ones_like(R[:, j], dtype=bool)
        xs, ys = X[rows], Y[rows, j]
        cov = ((xs - xs.mean(0)) * (ys - ys.mean())[:, None]).mean(0)
        pos.append(cov / (w[j] @ cov))
    return torch.stack(pos).view_as(conv.weight)


@pytest.mark.parametrize("pattern_type", ["linear", "relu"])
@pytest.mark.parametrize("bn", [True, False])
def test_conv_patterns_match_the_matrix_form(pattern_type, bn):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ConvNet(2, bn=bn).double().eval()
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(20, 2, 8, 8, generator=gen, dtype=torch.float64).cumsum(2)
    fitted = PatternNet(model, pattern_type=pattern_type).fit(data, batch_size=7)
    with torch.no_grad():
        expected = explicit_conv_pattern(model, data, pattern_type)
    conv_pattern = fitted.patterns_[0]
    assert conv_pattern.name == "conv" and conv_pattern.op == "conv2d"
    assert torch.allclose(conv_pattern.positive, expected, atol=1e-10)
    # w^T a = 1 for every output channel and regime.
    w = model.conv.weight.flatten(1)
    for a in (conv_pattern.positive, conv_pattern.negative):
        assert torch.allclose((w * a.flatten(1)).sum(1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pattern_shapes(dims):
    model = ConvNet(dims).eval()
    shape = (4, 2, 4, 4) if dims in (1, 2) else (4, 2, 4, 4, 4)
    x = torch.randn(shape)
    fitted = PatternNet(model).fit(x)
    assert [p.name for p in fitted.patterns_] == ["conv", "fc"]
    assert fitted.patterns_[0].positive.shape == model.conv.weight.shape
    assert fitted.patterns_[0].negative.shape == model.conv.weight.shape
    assert fitted.patterns_[1].positive.shape == model.fc.weight.shape
    assert fitted.patterns_[0].counts.shape == (2, 3)
    exp = fitted.explain(x)
    assert exp.attributions.shape == x.shape
    assert exp.params["pattern_source"] == "fit"


@pytest.mark.parametrize("cls", [PatternNet, PatternAttribution])
def test_fit_api_and_determinism(cls):
    model = ConvNet(2).eval()
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(10, 2, 8, 8, generator=gen)
    x = data[:3]
    explainer = cls(model)
    assert explainer.fit(data) is explainer
    first, second = explainer.explain(x), explainer.explain(x)
    assert torch.equal(first.attributions, second.attributions)
    on_data = cls(model, data=data).explain(x)
    assert torch.allclose(on_data.attributions, first.attributions)
    assert on_data.params["pattern_source"] == "data"
    lazy = cls(model).explain(x)
    assert lazy.params["pattern_source"] == "input"
    assert torch.allclose(lazy.attributions, cls(model).fit(x).explain(x).attributions)
    with pytest.raises(ValueError, match=r"call \.fit\(data\)"):
        cls(model, data=None).explain(x)
    assert_no_hooks(model)


def test_batchnorm_folding_reads_the_regime_after_batchnorm():
    # With a negative BatchNorm scale the active neurons are those with y < 0 before the
    # BatchNorm: the relu patterns must follow the BatchNorm's output.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ConvNet(2).double().eval()
    with torch.no_grad():
        model.bn.weight.fill_(-1.0)
        model.bn.running_mean.zero_()
        model.bn.bias.zero_()
    data = torch.randn(30, 2, 8, 8, dtype=torch.float64).cumsum(3)
    fitted = PatternNet(model).fit(data)
    with torch.no_grad():
        expected = explicit_conv_pattern(model, data, "relu")
    assert torch.allclose(fitted.patterns_[0].positive, expected, atol=1e-10)


def test_pattern_attribution_through_batchnorm_equals_the_folded_layer():
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = ConvNet(2).double().eval()
    data = torch.randn(16, 2, 8, 8, dtype=torch.float64)
    x = data[:2]
    folded = ConvNet(2, bn=False).double().eval()
    with torch.no_grad():
        bn = model.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded.conv.weight.copy_(model.conv.weight * scale.view(-1, 1, 1, 1))
        folded.conv.bias.copy_((model.conv.bias - bn.running_mean) * scale + bn.bias)
        folded.fc.load_state_dict(model.fc.state_dict())
    for cls in (PatternNet, PatternAttribution):
        ours = cls(model).fit(data).explain(x, target=0).attributions
        ref = cls(folded).fit(data).explain(x, target=0).attributions
        assert torch.allclose(ours, ref, atol=1e-10)


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.Sigmoid()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def test_unsupported_layers_are_named():
    with pytest.raises(ValueError, match=r"layer 'act' \(Sigmoid\).*|not a ReLU"):
        PatternNet(_Sigmoid().eval()).explain(torch.randn(2, 1, 4, 4))
    up = nn.Sequential(nn.ConvTranspose2d(1, 1, 2), nn.Flatten(), nn.Linear(25, 2)).eval()
    with pytest.raises(ValueError, match="transposed convolutions"):
        PatternAttribution(up).explain(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="pattern_type must be one of"):
        PatternNet(ConvNet(2), pattern_type="two").explain(torch.randn(2, 2, 4, 4))


@pytest.mark.parametrize(
    ("cls", "arch"), [(PatternNet, "densenet"), (PatternAttribution, "resnet")]
)
def test_monai_networks(cls, arch):
    # On the untrained DenseNet121 the PatternNet signal grows by ~1e150 over its 120
    # layers: the float32 map overflows and is recomputed in float64 and rescaled.
    from monai.networks.nets import DenseNet121, resnet18

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if arch == "densenet":
            model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()
        else:
            model = resnet18(spatial_dims=2, n_input_channels=1, num_classes=2).eval()
    shape = (1, 1, 32, 32)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    exp = cls(model).explain(x)
    assert exp.attributions.shape == x.shape
    assert torch.isfinite(exp.attributions).all() and exp.attributions.abs().sum() > 0
    if arch == "densenet":
        assert exp.params["signal_log2_scale"][0] > 100
    assert_no_hooks(model)
