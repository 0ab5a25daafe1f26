"""LRP and Deep Taylor: every rule against a matrix-form reference (float64), conservation
layer by layer, unsupported layers, and MONAI DenseNet121 / ResNet18 in 2D and 3D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.methods.relevance import _rules as rules
from trustmap.methods.relevance._composites import Composite, build_composite
from trustmap.methods.relevance._lrp_engine import UnsupportedLayerError, lrp_pass

TINY = rules.TINY


# ----------------------------------------------------------------------------------------
# Matrix-form references
# ----------------------------------------------------------------------------------------
def dense(fn, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix ``M`` (n_out x n_in) of the linear map ``fn`` on inputs of ``in_shape``."""
    n = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    return fn(basis).reshape(n, -1).T.contiguous()


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def reference(rule: str, m, b, a, r_out, *, ones=None, low=None, high=None, **kw):
    """Input relevance of one layer ``z = M a + b`` for output relevance ``r_out``.

    ``Z[k, j] = M[k, j] a[j]`` are the contributions; each rule divides its own numerator
    by its row sums (Montavon et al. 2019).
    """
    z = m * a[None, :]

    def share(num, den_extra=0.0, sign=1):
        den = num.sum(1) + den_extra
        den = den + (TINY if sign > 0 else -TINY) if sign else stab(den, kw["eps"])
        return (num / den[:, None] * r_out[:, None]).sum(0)

    if rule == "epsilon":
        return share(z, b, sign=0)
    if rule == "zplus":
        return share(z.clamp(min=0))
    if rule == "gamma":
        g = kw["gamma"]
        num = z + g * z.clamp(min=0)
        den_extra = b + g * b.clamp(min=0)
        den = num.sum(1) + den_extra
        return (
            num / (den + TINY * torch.where(den >= 0, 1.0, -1.0))[:, None] * r_out[:, None]
        ).sum(0)
    if rule == "alpha_beta":
        alpha, beta = kw["alpha"], kw["beta"]
        out = alpha * share(z.clamp(min=0))
        if beta:
            out = out - beta * share(z.clamp(max=0), sign=-1)
        return out
    if rule == "flat":
        return share(ones)
    if rule == "wsquare":
        return share(m * m)
    if rule == "zbox":
        num = z - m.clamp(min=0) * low[None, :] - m.clamp(max=0) * high[None, :]
        return share(num)
    raise AssertionError(rule)


def make_rule(name: str, **kw) -> rules.Rule:
    if name == "epsilon":
        return rules.epsilon(kw["eps"])
    if name == "gamma":
        return rules.gamma(kw["gamma"])
    if name == "alpha_beta":
        return rules.alpha_beta(kw["alpha"], kw["beta"])
    return {"zplus": rules.zplus, "flat": rules.flat, "wsquare": rules.wsquare}[name]()


class Single(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def run_engine(model, x, rule, weights, *, eps=1e-6, record=()):
    """Relevance at the input (and at recorded layers) for the score ``sum(out * weights)``."""
    composite = Composite("test", rule, rule, rule)
    with lrp_pass(model, x, composite, method="lrp", epsilon=eps, record=record) as run:
        tape = run()
    out = tape.output
    recorded = [tape.layer_outputs[n] for n in record]
    relevance, extra = tape.relevance((out * weights).sum(), recorded)
    return relevance, out.detach(), extra


LAYERS = {
    "linear": (lambda: nn.Linear(6, 4), (6,)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2), (2, 9)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)),
    # (dilated 2D/3D convolutions are pathologically slow in float64 on CPU)
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 5, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=1), (2, 3, 4, 4)),
}
RULES = [
    ("epsilon", {"eps": 1e-2}),
    ("epsilon", {"eps": 0.0}),
    ("zplus", {}),
    ("gamma", {"gamma": 0.25}),
    ("alpha_beta", {"alpha": 2.0, "beta": 1.0}),
    ("alpha_beta", {"alpha": 1.0, "beta": 0.0}),
    ("flat", {}),
    ("wsquare", {}),
]


def layer_and_input(kind: str, seed: int = 0):
    make, shape = LAYERS[kind]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = make().double()
        with torch.no_grad():
            layer.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((1, *shape), generator=gen, dtype=torch.float64)
    return layer, x


def matrix_of(layer: nn.Module, shape: tuple[int, ...]):
    m = dense(
        lambda v: (
            F.linear(v, layer.weight)
            if isinstance(layer, nn.Linear)
            else layer._conv_forward(v, layer.weight, None)
        ),
        shape,
    )
    out_shape = layer(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:]
    b = layer.bias.detach().view(-1, *([1] * (len(out_shape) - 1))).expand(out_shape).reshape(-1)
    return m, b, out_shape


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(("rule", "kw"), RULES, ids=[f"{r}-{k}" for r, k in RULES])
def test_rule_matches_matrix_reference(kind, rule, kw):
    layer, x = layer_and_input(kind)
    shape = tuple(x.shape[1:])
    m, b, out_shape = matrix_of(layer, shape)
    gen = torch.Generator().manual_seed(5)
    weights = torch.rand((1, *out_shape), generator=gen, dtype=torch.float64) + 0.5
    ours, out, _ = run_engine(Single(layer), x, make_rule(rule, **kw), weights)

    z = out.reshape(-1)
    ones = None
    if rule == "flat":
        ones = dense(
            lambda v: (
                F.linear(v, torch.ones_like(layer.weight))
                if isinstance(layer, nn.Linear)
                else layer._conv_forward(v, torch.ones_like(layer.weight), None)
            ),
            shape,
        )
    ref = reference(rule, m, b, x.reshape(-1), z * weights.reshape(-1), ones=ones, **kw)
    scale = ref.abs().max()
    assert (ours.reshape(-1) - ref).abs().max() <= 1e-10 * scale


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bounds", ["default", "given"])
def test_zbox_matches_matrix_reference(kind, bounds):
    layer, x = layer_and_input(kind, seed=3)
    shape = tuple(x.shape[1:])
    m, b, out_shape = matrix_of(layer, shape)
    if bounds == "default":
        low, high, rule = x.min(), x.max(), rules.zbox()
    else:
        low, high = torch.tensor(-4.0, dtype=torch.float64), torch.tensor(5.0, dtype=torch.float64)
        rule = rules.zbox(-4.0, 5.0)
    weights = torch.ones((1, *out_shape), dtype=torch.float64)
    ours, out, _ = run_engine(Single(layer), x, rule, weights)
    n = x.numel()
    ref = reference(
        "zbox", m, b, x.reshape(-1), out.reshape(-1), low=low.expand(n), high=high.expand(n)
    )
    assert (ours.reshape(-1) - ref).abs().max() <= 1e-10 * ref.abs().max()
    # z^B has no bias and no stabiliser to speak of: it is conservative.
    assert torch.allclose(ours.sum(), out.sum(), rtol=1e-9)


@pytest.mark.parametrize(
    "pool",
    [nn.AvgPool2d(2), nn.AvgPool2d(3, stride=2, padding=1), nn.AdaptiveAvgPool2d((2, 3))],
    ids=["avg2", "avg3_pad", "adaptive"],
)
@pytest.mark.parametrize(("rule", "kw"), [("epsilon", {"eps": 1e-2}), ("zplus", {})])
def test_average_pooling_matches_matrix_reference(pool, rule, kw):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((1, 2, 6, 7), generator=gen, dtype=torch.float64)
    m = dense(pool, (2, 6, 7))
    out_shape = pool(x).shape[1:]
    weights = torch.rand((1, *out_shape), generator=gen, dtype=torch.float64)
    ours, out, _ = run_engine(Single(pool), x, make_rule(rule, **kw), weights)
    r_out = out.reshape(-1) * weights.reshape(-1)
    zeros = torch.zeros(m.shape[0], dtype=torch.float64)
    ref = reference(rule, m, zeros, x.reshape(-1), r_out, **kw)
    assert (ours.reshape(-1) - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_max_pooling_gives_the_winner_everything():
    x = torch.tensor([[[[1.0, 3.0], [2.0, -1.0]]]], dtype=torch.float64)
    rel, _, _ = run_engine(Single(nn.MaxPool2d(2)), x, rules.epsilon(0.0), torch.ones(1, 1, 1, 1))
    assert torch.equal(rel, torch.tensor([[[[0.0, 3.0], [0.0, 0.0]]]], dtype=torch.float64))


# ----------------------------------------------------------------------------------------
# Conservation, layer by layer
# ----------------------------------------------------------------------------------------
class Block(nn.Module):
    """Bias-free network with every structure the canonizers handle: conv -> BN (merged),
    ReLU modules and F.relu, a residual addition, a concatenation, max/avg/adaptive pooling
    and a dense head. BatchNorm shifts are 0 so that nothing absorbs relevance."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        self.avg = nn.AvgPool2d(2) if dims == 2 else nn.AvgPool3d(2)
        self.gap = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.conv1 = conv(2, 6, 3, padding=1, bias=False)
        self.bn1 = norm(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(6, 6, 3, padding=1, bias=False)
        self.conv3 = conv(6, 4, 1, bias=False)
        self.cat = Concat()
        self.add = Add()
        self.fc = nn.Linear(10, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.bn1(self.conv1(x))))
        r = self.add(self.conv2(h), h)
        r = F.relu(r)
        c = self.cat(r, self.relu(self.conv3(r)))
        return self.fc(self.gap(self.avg(c)).flatten(1))


class Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Concat(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b], dim=1)


def make_block(dims: int) -> Block:
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = Block(dims).double().eval()
        with torch.no_grad():
            model.bn1.running_var.uniform_(0.5, 2.0)
            model.bn1.weight.uniform_(0.5, 1.5)
            model.bn1.weight[0] = -0.7  # a negative scale: merged weights change sign
    return model


RECORDED = ["bn1", "pool", "add", "cat", "avg", "gap", "fc"]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "composite", ["epsilon", "epsilon_plus", "epsilon_gamma_box", "zplus", "flat"]
)
def test_relevance_is_conserved_at_every_layer(dims, composite):
    # (alpha-beta is conservative only where a neuron has contributions of both signs, so
    # it is not in this list.)
    model = make_block(dims)
    x = make_input(dims, 2, channels=2, dtype=torch.float64)
    comp = build_composite(composite, epsilon=1e-12)
    with lrp_pass(model, x, comp, method="lrp", epsilon=1e-12, record=RECORDED) as run:
        tape = run()
    assert tape.summary["folded_after"] == ["conv1"]
    out = tape.output
    score = out[:, 0].sum()
    rel, layers = tape.relevance(score, [tape.layer_outputs[n] for n in RECORDED])
    per_sample = out[:, 0].detach()
    for name, r in zip(["input", *RECORDED], [rel, *layers]):
        totals = r.reshape(r.shape[0], -1).sum(1)
        assert torch.allclose(totals, per_sample, rtol=1e-5, atol=0), (name, totals, per_sample)


@pytest.mark.parametrize("dims", [2, 3])
def test_explainer_conserves_and_reports(dims):
    model = make_block(dims)
    x = make_input(dims, 3, channels=2, dtype=torch.float64)
    exp = trustmap.get_method("lrp")(model, composite="epsilon_plus", epsilon=1e-9).explain(x)
    totals = exp.attributions.reshape(3, -1).sum(1)
    scores = exp.output.gather(1, exp.target[:, None]).squeeze(1)
    assert torch.allclose(totals, scores, rtol=1e-6)
    assert exp.params["composite"] == "epsilon_plus"
    assert exp.params["epsilon"] == 1e-9
    assert_no_hooks(model)


def test_bias_absorbs_relevance_under_epsilon():
    # With biases, epsilon-LRP conserves the score minus what the biases take.
    lin = nn.Linear(5, 1).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    rel, out, _ = run_engine(Single(lin), x, rules.epsilon(0.0), torch.ones(1, 1))
    assert torch.allclose(rel.sum(), out.sum() - lin.bias.detach().sum())


def test_deep_taylor_is_zplus_with_zbox_at_the_input():
    model = make_tiny(2, in_channels=2).double().eval()
    x = make_input(2, 2, channels=2, dtype=torch.float64)
    dt = trustmap.explain(model, x, "deep_taylor", target=1)
    custom = {
        "conv1": rules.zbox(),
        nn.Conv2d: rules.zplus(),
        nn.Linear: rules.zplus(),
        nn.AdaptiveAvgPool2d: rules.zplus(),
    }
    lrp = trustmap.explain(model, x, "lrp", target=1, composite=custom)
    assert torch.allclose(dt, lrp, rtol=1e-12, atol=1e-15)
    # DTD with bias-free... TinyCNN has biases, which z+ ignores: the map still sums to
    # the score wherever the positive contributions do not vanish.
    assert dt.abs().sum() > 0


def test_custom_composite_by_name_type_and_rule_name():
    model = make_tiny(2).double().eval()
    x = make_input(2, 1, dtype=torch.float64)
    named = trustmap.explain(model, x, "lrp", composite={"conv2": "zplus"}, epsilon=1e-3)
    typed = trustmap.explain(
        model, x, "lrp", composite={nn.Conv2d: rules.epsilon(1e-3), "conv2": "zplus"}, epsilon=1e-3
    )
    assert torch.allclose(named, typed)
    plain = trustmap.explain(model, x, "lrp", composite="epsilon", epsilon=1e-3)
    assert not torch.allclose(named, plain)
    exp = trustmap.get_method("lrp")(model, composite={"conv2": "zplus"}).explain(x)
    assert exp.params["composite"] == "custom('conv2': zplus)"


def test_inplace_and_functional_forms_agree():
    """ReLU(inplace=True) after a convolution and ``out += identity`` give the same
    relevance as their out-of-place forms."""

    class Net(nn.Module):
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            self.inplace = inplace
            self.c1 = nn.Conv2d(1, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.c1(x)
            h = h.relu_() if self.inplace else F.relu(h)
            out = self.bn(self.c2(h))
            if self.inplace:
                out += h
                out = F.relu(out, inplace=True)
            else:
                out = F.relu(out + h)
            return self.fc(out.mean((2, 3)))

    torch.manual_seed(0)
    a = Net(True).double().eval()
    with torch.no_grad():
        a.bn.running_mean.uniform_(-0.3, 0.3)
        a.bn.bias.uniform_(-0.3, 0.3)
    b = Net(False).double().eval()
    b.load_state_dict(a.state_dict())
    x = make_input(2, 2, dtype=torch.float64)
    for comp in ("epsilon", "epsilon_plus", "epsilon_gamma_box"):
        ra = trustmap.explain(a, x, "lrp", target=0, composite=comp)
        rb = trustmap.explain(b, x, "lrp", target=0, composite=comp)
        assert torch.allclose(ra, rb, rtol=1e-10, atol=1e-14), comp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_target_kinds(dtype):
    model = make_tiny(2).to(dtype).eval()
    x = make_input(2, 2, dtype=dtype)
    by_class = trustmap.explain(model, x, "lrp", target=torch.tensor([0, 2]))
    by_callable = trustmap.explain(
        model,
        x,
        "lrp",
        target=lambda out: (
            out[:, 0] * torch.tensor([1.0, 0.0], dtype=dtype)
            + out[:, 2] * torch.tensor([0.0, 1.0], dtype=dtype)
        ),
    )
    assert by_class.dtype == dtype
    assert torch.allclose(by_class, by_callable, rtol=1e-4 if dtype == torch.float32 else 1e-10)


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------
class Wrap(nn.Module):
    def __init__(self, body: nn.Module, head_in: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.body = body
        self.fc = nn.Linear(head_in, 2)

    def forward(self, x):
        return self.fc(self.body(self.conv(x)).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        return x * torch.relu(x.mean(1, keepdim=True))


class Normalise(nn.Module):
    def forward(self, x):
        return x / x.abs().amax(dim=(1, 2, 3), keepdim=True)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        b, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)
        out, _ = self.mha(seq, seq, seq)
        return out.transpose(1, 2).reshape(b, c, h, w)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x):
        b, c, h, w = x.shape
        out, _ = self.lstm(x.flatten(2).transpose(1, 2))
        return out.transpose(1, 2).reshape(b, c, h, w)


UNSUPPORTED = {
    "gelu": (nn.Sequential(nn.GELU()), "body.0", "GELU"),
    "sigmoid": (nn.Sequential(nn.Sigmoid()), "body.0", "Sigmoid"),
    "silu": (nn.Sequential(nn.SiLU()), "body.0", "SiLU"),
    "relu6": (nn.Sequential(nn.ReLU6()), "body.0", "ReLU6"),
    "layernorm": (nn.Sequential(nn.LayerNorm([4, 8, 8])), "body.0", "LayerNorm"),
    "groupnorm": (nn.Sequential(nn.GroupNorm(2, 4)), "body.0", "GroupNorm"),
    "batch_stats": (
        nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)),
        "body.0",
        "BatchNorm2d",
    ),
    "gate": (Gate(), "body", "Gate"),
    "normalise": (Normalise(), "body", "Normalise"),
    "attention": (Attention(), "body.mha", "MultiheadAttention"),
    "lstm": (Recurrent(), "body.lstm", "LSTM"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
@pytest.mark.parametrize("method", ["lrp", "deep_taylor"])
def test_unsupported_layer_raises_naming_it(case, method):
    body, path, type_name = UNSUPPORTED[case]
    torch.manual_seed(0)
    model = Wrap(body).eval()
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(UnsupportedLayerError) as err:
        trustmap.explain(model, x, method)
    assert repr(path) in str(err.value) and type_name in str(err.value), str(err.value)
    assert_no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())


def test_softmax_output_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2), nn.Softmax(1))
    x = torch.rand(1, 1, 6, 6)
    model(x)
    with pytest.raises(UnsupportedLayerError, match="softmax"):
        trustmap.explain(model.eval(), x, "lrp")


def test_torchscript_is_refused():
    model = torch.jit.script(make_tiny(2).eval())
    with pytest.raises(ValueError, match="TorchScript"):
        trustmap.explain(model, make_input(2, 1), "lrp")


def test_input_layer_rule_on_a_hidden_layer_is_refused():
    model = make_tiny(2).eval()
    with pytest.raises(ValueError, match=r"'conv2'.*intermediate"):
        trustmap.explain(model, make_input(2, 1), "lrp", composite={"conv2": "flat"})


def test_input_rule_needs_a_layer_on_the_input():
    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x - 0.5).mean((2, 3))

    with pytest.raises(ValueError, match=r"epsilon_gamma_box.*sub"):
        trustmap.explain(
            Shifted().eval(), torch.rand(1, 1, 6, 6), "lrp", composite="epsilon_gamma_box"
        )


def test_box_bounds_are_checked():
    model = make_tiny(2).eval()
    x = make_input(2, 1)
    with pytest.raises(ValueError, match="outside the box"):
        trustmap.explain(model, x, "deep_taylor", low=0.0, high=1.0)
    with pytest.raises(ValueError, match="broadcastable"):
        trustmap.explain(model, x, "deep_taylor", low=torch.zeros(3, 3))


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"composite": "nope"}, ValueError),
        ({"composite": 3}, TypeError),
        ({"composite": {3: "zplus"}}, TypeError),
        ({"composite": {"conv1": "nope"}}, TypeError),
        ({"epsilon": -1.0}, ValueError),
        ({"gamma": "big"}, ValueError),
    ],
)
def test_bad_parameters(params, error):
    with pytest.raises(error):
        trustmap.explain(make_tiny(2).eval(), make_input(2, 1), "lrp", **params)


def test_flat_on_average_pooling_is_refused():
    model = Single(nn.AvgPool2d(2))
    with pytest.raises(ValueError, match="average pooling"):
        trustmap.explain(
            model,
            torch.rand(1, 1, 4, 4),
            "lrp",
            composite={nn.AvgPool2d: "wsquare"},
            target=lambda out: out.sum((1, 2, 3)),
        )


# ----------------------------------------------------------------------------------------
# MONAI networks
# ----------------------------------------------------------------------------------------
def monai_model(arch: str, dims: int) -> nn.Module:
    from monai.networks.nets import DenseNet121, resnet18

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if arch == "densenet":
            return DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2).eval()
        return resnet18(spatial_dims=dims, n_input_channels=1, num_classes=2).eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", ["densenet", "resnet"])
def test_monai_networks_conserve_relevance(arch, dims):
    model = monai_model(arch, dims)
    head = model.class_layers.out if arch == "densenet" else model.fc
    with torch.no_grad():
        head.bias.zero_()
    shape = (1, 1, 64, 64) if dims == 2 else (1, 1, 32, 64, 64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exp = trustmap.get_method("lrp")(model, composite="epsilon_plus").explain(x, target=1)
    score = exp.output[0, 1]
    error = (exp.attributions.sum() - score).abs() / score.abs()
    assert torch.isfinite(exp.attributions).all()
    assert error < 1e-3, f"relative conservation error {float(error):.2e}"
    assert_no_hooks(model)
