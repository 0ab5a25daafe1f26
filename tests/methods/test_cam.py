"""CAM family: formulas against float64 references on tiny CNNs, analytic identities,
layer resolution, targets, errors and hook hygiene."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trustmap
from trustmap.core.hooks import model_guard
from trustmap.core.targets import resolve_target
from trustmap.methods.cam import _layer
from trustmap.methods.cam.ablation_cam import ablated_scores, ablation_cam_weights

CAM_METHODS = [
    "ablation_cam",
    "cam",
    "eigen_cam",
    "grad_cam",
    "grad_cam_pp",
    "guided_grad_cam",
    "hires_cam",
    "layer_cam",
    "respond_cam",
    "score_cam",
    "xgrad_cam",
]
DTYPE = torch.float64


def conv(dim: int, *args, **kwargs) -> nn.Module:
    return (nn.Conv2d if dim == 2 else nn.Conv3d)(*args, **kwargs)


def pool(dim: int, kind: str = "avg") -> nn.Module:
    if kind == "max":
        return nn.AdaptiveMaxPool2d(1) if dim == 2 else nn.AdaptiveMaxPool3d(1)
    return nn.AdaptiveAvgPool2d(1) if dim == 2 else nn.AdaptiveAvgPool3d(1)


def gap_cnn(dim: int, *, out: int = 3, kind: str = "avg", bias: bool = True, stride: int = 2):
    """Conv-ReLU-Conv-ReLU-GlobalPool-Flatten-Linear; layer '3' feeds the pooling."""
    torch.manual_seed(0)
    return nn.Sequential(
        conv(dim, 1, 4, 3, padding=1),
        nn.ReLU(),
        conv(dim, 4, 6, 3, padding=1, stride=stride),
        nn.ReLU(inplace=True),
        pool(dim, kind),
        nn.Flatten(),
        nn.Linear(6, out, bias=bias),
    ).to(DTYPE)


def deep_head_cnn(dim: int, out: int = 3):
    """Layer '3' is followed by a conv and a ReLU, so dS/dA varies over positions."""
    torch.manual_seed(1)
    return nn.Sequential(
        conv(dim, 1, 4, 3, padding=1),
        nn.ReLU(),
        conv(dim, 4, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        conv(dim, 6, 5, 3, padding=1),
        nn.ReLU(),
        pool(dim),
        nn.Flatten(),
        nn.Linear(5, out),
    ).to(DTYPE)


def image(dim: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spatial = (8, 8) if dim == 2 else (4, 6, 6)
    return torch.randn(b, 1, *spatial, generator=g, dtype=DTYPE)


def upsample(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)


def act_and_grad(model: nn.Sequential, split: int, x: torch.Tensor, target):
    """A = model[:split](x), G = dS/dA, computed by splitting the Sequential."""
    act = model[:split](x).detach().requires_grad_(True)
    output = model[split:](act)
    resolved = resolve_target(target, output.detach())
    (grad,) = torch.autograd.grad(resolved.scores(output).sum(), act)
    return act.detach(), grad, output.detach()


def sdims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def cw(w: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Channel-weighted sum with weights (B, K)."""
    return (w.reshape(*w.shape, *([1] * (act.ndim - 2))) * act).sum(1, keepdim=True)


def reference(name: str, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Signed map at layer resolution, written from the papers' formulas."""
    d = sdims(act)
    if name == "grad_cam":
        return cw(grad.mean(d), act)
    if name == "grad_cam_pp":
        s = act.sum(d, keepdim=True)
        den = 2 * grad**2 + s * grad**3
        alpha = torch.where(grad != 0, grad**2 / torch.where(den != 0, den, 1), 0)
        return cw((alpha * grad.clamp(min=0)).sum(d), act)
    if name == "layer_cam":
        return (grad.clamp(min=0) * act).sum(1, keepdim=True)
    if name == "hires_cam":
        return (grad * act).sum(1, keepdim=True)
    if name in ("xgrad_cam", "respond_cam"):
        return cw((act * grad).sum(d) / act.sum(d), act)
    raise AssertionError(name)


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> None:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) + 1e-300
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


def hooks_left(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
    ]


# ---------------------------------------------------------------------------------------
# Gradient-weighted formulas
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize(
    "name", ["grad_cam", "grad_cam_pp", "layer_cam", "hires_cam", "xgrad_cam", "respond_cam"]
)
def test_gradient_weighted_formulas(name, relu, dim):
    model = deep_head_cnn(dim)
    x = image(dim)
    target = torch.tensor([0, 2])
    act, grad, _ = act_and_grad(model, 4, x, target)
    expected = reference(name, act, grad)
    # Respond-CAM is signed by definition and takes no relu flag.
    params = {} if name == "respond_cam" else {"relu": relu}
    if relu and name != "respond_cam":
        expected = expected.clamp(min=0)
    got = trustmap.explain(model, x, name, target=target, layer="3", **params)
    assert got.shape == (2, 1, *x.shape[2:])
    assert_close(got, upsample(expected, x))
    assert float(expected.abs().max()) > 0


def test_methods_differ_when_gradient_varies_over_positions():
    # Guards against the formulas above collapsing into one another.
    model, x = deep_head_cnn(2), image(2)
    maps = {
        n: trustmap.explain(model, x, n, layer="3", relu=False)
        for n in ("grad_cam", "grad_cam_pp", "layer_cam", "hires_cam", "xgrad_cam")
    }
    names = list(maps)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(maps[a], maps[b]), (a, b)


# ---------------------------------------------------------------------------------------
# Analytic identities on a global-average-pooling + linear head
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_cam_equals_n_times_grad_cam_on_gap_linear_head(dim):
    # S = sum_k v_k mean_s A_k + b, so G_k = v_k / N everywhere and
    # Grad-CAM = sum_k (v_k / N) A_k = CAM / N. HiResCAM (G constant over positions),
    # XGrad-CAM and Respond-CAM (sum(A v/N) / sum(A) = v/N) reduce to the same map.
    model, x = gap_cnn(dim), image(dim)
    target = torch.tensor([1, 2])
    cam = trustmap.explain(model, x, "cam", target=target)
    n = model[:4](x).shape[2:].numel()
    grad_cam = trustmap.explain(model, x, "grad_cam", target=target, relu=False)
    assert_close(cam, n * grad_cam)
    for other in ("hires_cam", "xgrad_cam"):
        assert_close(trustmap.explain(model, x, other, target=target, relu=False), grad_cam)
    assert_close(trustmap.explain(model, x, "respond_cam", target=target), grad_cam)
    # CAM itself: the class row of the linear layer times the activations, bias excluded.
    act = model[:4](x)
    direct = cw(model[6].weight[target], act)
    assert_close(cam, upsample(direct, x))
    assert bool((cam < 0).any()), "CAM is signed"


def test_cam_with_global_max_pooling_head():
    model, x = gap_cnn(2, kind="max"), image(2)
    cam = trustmap.explain(model, x, "cam", target=0)
    direct = cw(model[6].weight[[0, 0]], model[:4](x))
    assert_close(cam, upsample(direct, x))


class FunctionalReLUNet(nn.Module):
    """``F.relu`` between the last conv and the pooling, as in torchvision's DenseNet: no
    module outputs the pooled feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3, padding=1, stride=2)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_cam_sees_through_a_functional_relu_before_the_pooling():
    torch.manual_seed(9)
    model, x = FunctionalReLUNet().to(DTYPE), image(2)
    exp = trustmap.get_method("cam")(model).explain(x, 2)
    assert exp.params["layer"] == "conv"
    features = F.relu(model.conv(x))
    assert_close(exp.attributions, upsample(cw(model.fc.weight[[2, 2]], features), x))
    assert not torch.allclose(features, model.conv(x))


def test_cam_single_logit_target_zero_negates_the_weights():
    model, x = gap_cnn(2, out=1), image(2)
    one = trustmap.explain(model, x, "cam", target=1)
    zero = trustmap.explain(model, x, "cam", target=0)
    assert_close(zero, -one)
    assert_close(one, upsample(cw(model[6].weight.expand(2, 6), model[:4](x)), x))


def test_cam_on_monai_densenet_matches_grad_cam(dense):
    model, x = dense
    cam = trustmap.explain(model, x, "cam", target=1)
    grad_cam = trustmap.explain(model, x, "grad_cam", target=1, relu=False)
    assert_close(cam, 4 * grad_cam, rtol=1e-8)  # 2 x 2 positions at 64 x 64


@pytest.mark.parametrize("dim", [2, 3])
def test_respond_cam_sums_to_the_score_for_a_bias_free_gap_head(dim):
    # sum_s sum_k w_k A_k = sum_k sum_s A_k G_k = sum_k v_k mean_s A_k = S (no bias).
    # The layer halves each side and bilinear/trilinear upsampling by an integer factor
    # with align_corners=False preserves the mean, so the upsampled map sums to
    # 2^dim * S.
    model, x = gap_cnn(dim, bias=False), image(dim)
    got = trustmap.explain(model, x, "respond_cam", target=1)
    score = model(x)[:, 1]
    factor = x.shape[2:].numel() / model[:4](x).shape[2:].numel()
    assert factor == 2**dim
    assert torch.allclose(got.sum(sdims(got)).squeeze(1), factor * score, rtol=1e-10)


# ---------------------------------------------------------------------------------------
# Perturbation-weighted and class-agnostic methods
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_score_cam_against_a_direct_loop(dim):
    model, x = deep_head_cnn(dim), image(dim)
    target = torch.tensor([2, 0])
    act = model[:4](x)
    base = torch.softmax(model(torch.zeros_like(x)), 1)[[0, 1], target]
    weights = torch.zeros(2, act.shape[1], dtype=DTYPE)
    for i in range(2):
        for k in range(act.shape[1]):
            h = upsample(act[i : i + 1, k : k + 1], x[:1])
            span = h.max() - h.min()
            h = (h - h.min()) / span if span > 0 else torch.zeros_like(h)
            prob = torch.softmax(model(x[i : i + 1] * h), 1)[0, target[i]]
            weights[i, k] = prob - base[i]
    signed = cw(weights, act)
    got = trustmap.explain(model, x, "score_cam", target=target, layer="3", relu=False)
    assert_close(got, upsample(signed, x))
    # Rectified at the layer's resolution, then upsampled.
    chunked = trustmap.explain(model, x, "score_cam", target=target, layer="3", batch_size=5)
    assert_close(chunked, upsample(signed.clamp(min=0), x))


def test_score_cam_single_logit_uses_sigmoid_and_constant_channel_gives_zero_mask():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).to(DTYPE)
    model[0].weight.data[2] = 0  # channel 2 is constant (its bias): mask of zeros
    head = nn.Linear(3, 1).to(DTYPE)
    full = nn.Sequential(model, head)
    x = image(2, b=1)
    act = model[:2](x)
    base = torch.sigmoid(-full(torch.zeros_like(x)))[0, 0]
    weights = []
    for k in range(3):
        h = act[:, k : k + 1]
        span = h.max() - h.min()
        h = (h - h.min()) / span if span > 0 else torch.zeros_like(h)
        weights.append(torch.sigmoid(-full(x * h))[0, 0] - base)
    assert float(weights[2].detach()) == 0.0
    expected = cw(torch.stack(weights)[None], act)
    got = trustmap.explain(full, x, "score_cam", target=0, layer="0.1", relu=False)
    assert_close(got, expected)


@pytest.mark.parametrize("dim", [2, 3])
def test_eigen_cam_is_the_first_principal_direction_projection(dim):
    model, x = deep_head_cnn(dim), image(dim)
    act = model[:4](x)
    expected = []
    for i in range(2):
        mat = act[i].reshape(act.shape[1], -1).T  # (N, K)
        # Independently of the SVD: top eigenvector of M^T M.
        _, vecs = torch.linalg.eigh(mat.T @ mat)
        proj = mat @ vecs[:, -1]
        proj = proj if proj.sum() >= 0 else -proj
        expected.append(proj.clamp(min=0).reshape(1, 1, *act.shape[2:]))
    got = trustmap.explain(model, x, "eigen_cam", layer="3")
    assert_close(got, upsample(torch.cat(expected), x), rtol=1e-8)
    # Class-agnostic, but the target is resolved and reported.
    exp = trustmap.get_method("eigen_cam")(model, layer="3").explain(x, torch.tensor([1, 2]))
    assert exp.target.tolist() == [1, 2]
    assert_close(exp.attributions, got)


@pytest.mark.parametrize("dim", [2, 3])
def test_ablation_cam_against_a_direct_loop(dim):
    model, x = deep_head_cnn(dim), image(dim)
    target = torch.tensor([1, 0])
    act = model[:4](x)
    y = model(x)[[0, 1], target]
    weights = torch.zeros(2, act.shape[1], dtype=DTYPE)
    for k in range(act.shape[1]):
        ablated = act.clone()
        ablated[:, k] = 0
        yk = model[4:](ablated)[[0, 1], target]
        weights[:, k] = (y - yk) / y
    signed = cw(weights, act)
    got = trustmap.explain(model, x, "ablation_cam", target=target, layer="3", relu=False)
    assert_close(got, upsample(signed, x), rtol=1e-8)
    chunked = trustmap.explain(model, x, "ablation_cam", target=target, layer="3", batch_size=4)
    assert_close(chunked, upsample(signed.clamp(min=0), x), rtol=1e-8)


def _ablation_pass(model, x, target, layer):
    explainer = trustmap.get_method("ablation_cam")(model, layer=layer)
    with model_guard(model):
        return _layer.layer_pass(explainer, x, target, layer, gradient=False)


def test_ablation_fast_path_equals_repeated_inputs():
    model, x = deep_head_cnn(2), image(2)
    lp = _ablation_pass(model, x, torch.tensor([1, 2]), "3")
    channels = torch.tensor([0, 3, 5, 1])
    for i in range(2):
        fast = ablated_scores(model, x[i : i + 1], lp, i, channels, expand=True)
        slow = ablated_scores(model, x[i : i + 1], lp, i, channels, expand=False)
        assert_close(fast, slow, rtol=1e-12)
    _, used_fast = ablation_cam_weights(model, x, lp, batch_size=4)
    assert used_fast


class CatNet(nn.Module):
    """A skip connection concatenated after layer 'act': the fast path cannot expand."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(7, 5, 1)
        self.fc = nn.Linear(5, 3)

    def tail(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mix(torch.cat([a, s], 1)))
        return self.fc(h.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        return self.tail(self.act(self.body(s)), s)


def test_ablation_falls_back_to_repeated_inputs_and_stays_exact():
    torch.manual_seed(4)
    model, x = CatNet().to(DTYPE), image(2)
    lp = _ablation_pass(model, x, 2, "act")
    with pytest.raises(RuntimeError):
        ablated_scores(model, x[:1], lp, 0, torch.tensor([0, 1]), expand=True)
    assert not hooks_left(model)
    weights, used_fast = ablation_cam_weights(model, x, lp, batch_size=3)
    assert not used_fast
    s = torch.relu(model.stem(x))
    a = model.act(model.body(s))
    y = model.tail(a, s)[:, 2]
    expected = torch.zeros_like(weights)
    for k in range(4):
        ablated = a.clone()
        ablated[:, k] = 0
        expected[:, k] = (y - model.tail(ablated, s)[:, 2]) / y
    assert_close(weights, expected, rtol=1e-10)
    got = trustmap.explain(model, x, "ablation_cam", target=2, layer="act", relu=False)
    assert_close(got, cw(expected, a))
    assert not hooks_left(model)


class TwiceNet(nn.Module):
    """One ReLU module used twice: CAM methods read (and ablate) its last call."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.c2(self.relu(self.c1(x))))
        return self.fc(torch.tanh(h).mean((2, 3)))


def test_module_called_twice_uses_its_last_call():
    torch.manual_seed(5)
    model, x = TwiceNet().to(DTYPE), image(2)
    a = model.relu(model.c2(model.relu(model.c1(x)))).detach().requires_grad_(True)
    score = model.fc(torch.tanh(a).mean((2, 3)))[:, 1]
    (g,) = torch.autograd.grad(score.sum(), a)
    got = trustmap.explain(model, x, "grad_cam", target=1, layer="relu", relu=False)
    assert_close(got, upsample(cw(g.mean((2, 3)), a.detach()), x))
    a = a.detach()
    y = model.fc(torch.tanh(a).mean((2, 3)))[:, 1]
    w = torch.zeros(2, 4, dtype=DTYPE)
    for k in range(4):
        ab = a.clone()
        ab[:, k] = 0
        w[:, k] = (y - model.fc(torch.tanh(ab).mean((2, 3)))[:, 1]) / y
    got = trustmap.explain(model, x, "ablation_cam", target=1, layer="relu", relu=False)
    assert_close(got, upsample(cw(w, a), x))


@pytest.mark.parametrize("dim", [2, 3])
def test_guided_grad_cam_is_guided_backprop_times_upsampled_grad_cam(dim):
    model, x = deep_head_cnn(dim), image(dim)
    gb = trustmap.explain(model, x, "guided_backprop", target=1)
    gc_map = trustmap.explain(model, x, "grad_cam", target=1, layer="3")
    got = trustmap.explain(model, x, "guided_grad_cam", target=1, layer="3")
    assert got.shape == x.shape
    assert_close(got, gb * gc_map)
    assert float(got.abs().max()) > 0


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------


def test_single_logit_target_zero_negates_the_signed_grad_cam():
    model, x = deep_head_cnn(2, out=1), image(2)
    one = trustmap.explain(model, x, "grad_cam", target=1, layer="3", relu=False)
    zero = trustmap.explain(model, x, "grad_cam", target=0, layer="3", relu=False)
    assert_close(zero, -one)


def test_per_sample_and_callable_targets():
    model, x = deep_head_cnn(2), image(2)
    per_class = [
        trustmap.explain(model, x, "grad_cam", target=c, layer="3", relu=False) for c in range(3)
    ]
    mixed = trustmap.explain(
        model, x, "grad_cam", target=torch.tensor([2, 0]), layer="3", relu=False
    )
    assert_close(mixed[0], per_class[2][0])
    assert_close(mixed[1], per_class[0][1])
    # The signed Grad-CAM map is linear in the score.
    diff = trustmap.explain(
        model, x, "grad_cam", target=lambda out: out[:, 0] - out[:, 1], layer="3", relu=False
    )
    assert_close(diff, per_class[0] - per_class[1])
    none = trustmap.explain(model, x, "grad_cam", layer="3", relu=False)
    pred = model(x).argmax(1)
    assert_close(none, torch.cat([per_class[int(pred[i])][i : i + 1] for i in range(2)]))


def test_region_target_on_a_segmentation_model():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).to(DTYPE)
    x = image(2)
    mask = torch.zeros(8, 8)
    mask[2:5, 3:7] = 1
    act = model[:2](x).detach().requires_grad_(True)
    score = (model[2:](act)[:, 1] * mask).sum((1, 2))
    (g,) = torch.autograd.grad(score.sum(), act)
    got = trustmap.explain(model, x, "hires_cam", target=(1, mask), layer="1", relu=False)
    assert_close(got, (g * act.detach()).sum(1, keepdim=True))
    with pytest.raises(ValueError, match="region targets are not supported"):
        trustmap.explain(model, x, "cam", target=(1, mask), layer="1")


@pytest.mark.parametrize("name", ["eigen_cam", "score_cam", "ablation_cam", "grad_cam"])
def test_a_target_that_cannot_score_the_output_fails_for_every_method(name):
    model, x = gap_cnn(2), image(2)
    with pytest.raises(ValueError, match="callable target"):
        trustmap.explain(model, x, name, target=lambda out: out.sum())
    assert not hooks_left(model)


def test_cam_refuses_callable_targets():
    model, x = gap_cnn(2), image(2)
    with pytest.raises(ValueError, match="grad_cam"):
        trustmap.explain(model, x, "cam", target=lambda out: out[:, 0])


# ---------------------------------------------------------------------------------------
# Layer resolution
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense() -> tuple[nn.Module, torch.Tensor]:
    """MONAI DenseNet121 and a 64 x 64 image, built once for the module."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(7)
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).to(DTYPE)
    # DenseNet121 downsamples 32x: 64x64 leaves a 2x2 map. At 32x32 the last block is
    # 1x1, which by design is not a spatial feature map.
    return model, image(2, b=1).repeat(1, 1, 8, 8)


def test_default_layer_plain_cnn_and_cache():
    model, x = deep_head_cnn(2), image(2)
    exp = trustmap.get_method("grad_cam")(model).explain(x, 0)
    assert exp.params["layer"] == "5"  # the ReLU after the last conv feeds the pooling
    assert list(_layer._DEFAULT_LAYERS[model]) == [(8, 8)]
    assert _layer._DEFAULT_LAYERS[model][(8, 8)][-1][0] == "5"
    explicit = trustmap.explain(model, x, "grad_cam", target=0, layer="5")
    assert_close(exp.attributions, explicit)
    assert _layer.default_layer(gap_cnn(3), image(3)) == "3"
    n = len(_layer._DEFAULT_LAYERS)
    del model, exp
    gc.collect()
    assert len(_layer._DEFAULT_LAYERS) < n, "the cache must not keep models alive"


def test_default_layer_depends_on_the_input_size():
    # At 2 x 2 the stride-2 conv leaves one position, so the last spatial map is '1'.
    model = gap_cnn(2)
    small, large = image(2)[..., :2, :2], image(2)
    assert trustmap.get_method("grad_cam")(model).explain(small).params["layer"] == "1"
    assert trustmap.get_method("grad_cam")(model).explain(large).params["layer"] == "3"
    cache = _layer._DEFAULT_LAYERS[model]
    assert {key: maps[-1][0] for key, maps in cache.items()} == {(2, 2): "1", (8, 8): "3"}


def test_default_layer_of_monai_densenet121(dense):
    model, x = dense
    _layer._DEFAULT_LAYERS.pop(model, None)
    exp = trustmap.get_method("grad_cam")(model).explain(x, 1)
    assert exp.params["layer"] == "class_layers.relu"


def test_default_layer_is_the_last_feature_map_not_a_child_of_a_residual_block():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x

    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), Residual(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).to(DTYPE)
    assert _layer.default_layer(model, image(2)) == "1"


# ---------------------------------------------------------------------------------------
# Errors and hygiene
# ---------------------------------------------------------------------------------------


def test_wrong_layer_name_suggests(dense):
    with pytest.raises(ValueError, match=r"no layer named 'class_layers\.rel'.*did you mean"):
        trustmap.explain(*dense, "grad_cam", layer="class_layers.rel")
    assert not hooks_left(dense[0])
    model, x = gap_cnn(2), image(2)
    with pytest.raises(TypeError, match="module name"):
        trustmap.explain(model, x, "grad_cam", layer=3)


@pytest.mark.parametrize("name", CAM_METHODS)
def test_model_without_convolution_is_refused(name):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).to(DTYPE)
    with pytest.raises(ValueError, match="convolutional model with a spatial feature map"):
        trustmap.explain(model, image(2), name)
    assert not hooks_left(model)


def test_layer_errors():
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            h = self.conv(x)
            return h, h.mean()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = TupleOut()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            h, _ = self.block(x)
            return self.fc(h.mean((2, 3)))

    model, x = Net().to(DTYPE), image(2)
    with pytest.raises(TypeError, match="returns tuple"):
        trustmap.explain(model, x, "grad_cam", layer="block")
    assert not hooks_left(model)
    with pytest.raises(ValueError, match="feature map"):
        trustmap.explain(model, x, "grad_cam", layer="fc")
    assert not hooks_left(model)


def test_cam_refuses_a_head_that_is_not_global_pooling_and_linear():
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 64, 2)
    ).to(DTYPE)
    with pytest.raises(ValueError, match=r"layer '1'.*Use 'grad_cam'"):
        trustmap.explain(model, image(2), "cam")
    assert not hooks_left(model)
    # A softmax after the linear layer is not CAM's head either.
    soft = nn.Sequential(gap_cnn(2), nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="grad_cam"):
        trustmap.explain(soft, image(2), "cam")


def test_parameter_validation():
    model, x = gap_cnn(2), image(2)
    with pytest.raises(TypeError, match="relu"):
        trustmap.explain(model, x, "grad_cam", relu="yes")
    with pytest.raises(ValueError, match="batch_size"):
        trustmap.explain(model, x, "score_cam", batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        trustmap.explain(model, x, "ablation_cam", batch_size=-1)
    with pytest.raises(TypeError, match="does not take"):
        trustmap.explain(model, x, "eigen_cam", relu=False)


def test_score_independent_of_the_layer_is_a_clear_error():
    class SideBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.side = nn.Conv2d(1, 2, 3, padding=1)
            self.main = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            self.side(x)  # computed, never used
            return self.fc(self.main(x).mean((2, 3)))

    model, x = SideBranch().to(DTYPE), image(2)
    with pytest.raises(ValueError, match="does not depend on layer 'side'"):
        trustmap.explain(model, x, "grad_cam", layer="side")
    with pytest.raises(ValueError, match="not differentiable"):
        trustmap.explain(model, x, "grad_cam", target=lambda out: torch.zeros(out.shape[0]))
    assert not hooks_left(model)


@pytest.mark.parametrize("name", CAM_METHODS)
@pytest.mark.parametrize("dim", [2, 3])
def test_every_method_runs_leaves_no_hooks_and_keeps_the_model(name, dim):
    model = gap_cnn(dim).float()
    for p in model[0].parameters():
        p.requires_grad_(False)  # frozen layers must stay frozen and still work
    model.train()
    x = image(dim).float()
    x0 = x.clone()
    exp = trustmap.get_method(name)(model).explain(x)
    cls = trustmap.get_method(name)
    assert cls.family == "cam"
    shape = x.shape if name == "guided_grad_cam" else (2, 1, *x.shape[2:])
    assert cls.output == ("input" if name == "guided_grad_cam" else "single")
    assert exp.attributions.shape == shape
    assert exp.attributions.dtype == torch.float32
    assert bool(torch.isfinite(exp.attributions).all())
    assert exp.params["layer"] == "3"
    assert torch.equal(x, x0)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, True]
    assert not hooks_left(model)
