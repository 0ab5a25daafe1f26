"""Model-weight randomization (Arun et al. 2021, criterion 2): stages, copies, maps, baseline."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn

from tests.conftest import assert_no_hooks
from trustmap.models import create
from trustmap.trust.randomization import (
    Stage,
    cascading_randomization,
    independent_randomization,
    model_stages,
    randomization_baseline,
    randomized_models,
)

# -- helpers ------------------------------------------------------------------------------


def minmax_post(attributions) -> np.ndarray:
    """|A| summed over channels, min-max per image (constant -> 0): a reference post-processing
    independent of trustmap.trust.postprocess."""
    a = np.abs(np.asarray(torch.as_tensor(attributions).detach(), dtype=np.float64)).sum(1)
    flat = a.reshape(a.shape[0], -1)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((flat - lo) / span * (hi > lo)).reshape(a.shape)


def sk_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([structural_similarity(x, y, data_range=1.0) for x, y in zip(a, b)])


def input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    xg = x.detach().requires_grad_(True)
    out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), xg)
    return grad


def trained(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every parameter and BatchNorm statistic away from its initial value, as
    training would, so that re-initialising it is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen, dtype=buf.dtype))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen, dtype=buf.dtype))
    return model


def small_cnn(dims: int = 2) -> nn.Module:
    return trained(create("small_cnn", spatial_dims=dims, width=2, seed=0).double())


def images(dims: int, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    spatial = (16, 16) if dims == 2 else (8, 8, 8)
    return torch.randn((batch, 1, *spatial), generator=gen, dtype=torch.float64)


def stage_params(model: nn.Module, stages: list[Stage]) -> list[set[str]]:
    names = dict(model.named_modules())
    out = []
    for stage in stages:
        ids = {id(p) for m in stage.modules for p in names[m].parameters()}
        out.append({n for n, p in model.named_parameters() if id(p) in ids})
    return out


def changed_params(model: nn.Module, reference: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, reference[n])}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], flags) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert flags_of(model) == flags
    assert_no_hooks(model)


def flags_of(model: nn.Module):
    return [
        (m.training, [p.requires_grad for p in m.parameters(recurse=False)])
        for m in model.modules()
    ]


class Scale(nn.Module):
    """y = s * x with a learnt scalar s (no reset_parameters: redrawn from N(0, 0.01))."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * x


class LinearToy(nn.Module):
    """f(x) = W (s x) + b. Its gradient map for class c is s W[c], whatever x is."""

    def __init__(self, pixels: int = 64) -> None:
        super().__init__()
        self.scale = Scale()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(pixels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.scale(x)))


# -- stage discovery ----------------------------------------------------------------------


def test_stages_small_cnn_2d_and_3d():
    for dims in (2, 3):
        stages = model_stages(create("small_cnn", spatial_dims=dims, width=2))
        assert [s.name for s in stages] == ["logits", "block4", "block3", "block2", "block1"]
        assert stages[0].modules == ("fc",)
        assert stages[1].modules == ("features.block4",)
        assert stages[-1].modules == ("features.block1",)


def test_stages_resnet18_fold_the_stem_norm():
    model = create("resnet18", spatial_dims=2, widen_factor=0.0625)
    stages = model_stages(model)
    assert [s.name for s in stages] == ["logits", "layer4", "layer3", "layer2", "layer1", "conv1"]
    assert stages[0].modules == ("fc",)
    assert stages[-1].modules == ("conv1", "bn1")


def test_stages_densenet121():
    model = create("densenet121", spatial_dims=2, init_features=4, growth_rate=2, bn_size=2)
    stages = model_stages(model)
    assert [s.name for s in stages] == [
        "logits", "denseblock4", "transition3", "denseblock3", "transition2",
        "denseblock2", "transition1", "denseblock1", "conv0",
    ]  # fmt: skip
    assert stages[0].modules == ("class_layers.out",)
    assert stages[1].modules == ("features.denseblock4", "features.norm5")
    assert stages[-1].modules == ("features.conv0", "features.norm0")


def test_stages_of_a_plain_sequential():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2),
    )  # fmt: skip
    stages = model_stages(model)
    assert stages == [Stage("logits", ("7",)), Stage("3", ("3",)), Stage("0", ("0", "1"))]


class Blocks(nn.Module):
    """A ModuleList body and a two-layer head: the list is opened, the head's last layer
    is the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)
        )
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def test_stages_module_list_and_mlp_head():
    stages = model_stages(Blocks())
    assert [s.name for s in stages] == [
        "logits", "head.0", "blocks.2", "blocks.1", "blocks.0", "stem",
    ]  # fmt: skip
    assert stages[0].modules == ("head.2",)


def test_stages_look_through_a_wrapper():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create("small_cnn", width=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

    stages = model_stages(Wrapper())
    assert [s.name for s in stages] == ["logits", "block4", "block3", "block2", "block1"]
    assert stages[0].modules == ("backbone.fc",)


class HeadFirst(nn.Module):
    """Registers its classifier before its convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.conv2 = nn.Conv2d(2, 3, 3)
        self.conv3 = nn.Conv2d(3, 3, 1)
        self.unused = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv3(self.conv2(self.conv1(x))).mean(dim=(2, 3)))


def test_registration_order_versus_execution_order():
    model = HeadFirst()
    # Without an input, registration order is assumed: the last registered is "logits".
    assert [s.modules[0] for s in model_stages(model)] == [
        "unused", "conv3", "conv2", "conv1", "fc",
    ]  # fmt: skip
    # With an input, the forward pass decides; a module never called is left out.
    stages = model_stages(model, example_input=torch.randn(1, 1, 8, 8))
    assert stages == [
        Stage("logits", ("fc",)), Stage("conv3", ("conv3",)),
        Stage("conv2", ("conv2",)), Stage("conv1", ("conv1",)),
    ]  # fmt: skip
    assert_no_hooks(model)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "densenet121"])
def test_stages_cover_every_parameter_once(arch):
    kwargs = {
        "small_cnn": {"width": 2},
        "resnet18": {"widen_factor": 0.0625},
        "densenet121": {"init_features": 4, "growth_rate": 2, "bn_size": 2},
    }[arch]
    model = create(arch, spatial_dims=2, **kwargs)
    sets = stage_params(model, model_stages(model))
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    assert set().union(*sets) == {n for n, _ in model.named_parameters()}


def test_explicit_stages():
    model = create("small_cnn", width=2)
    stages = model_stages(
        model, [["fc"], ("deep", ["features.block4", "features.block3"]), "features.block1"]
    )
    assert stages == [
        Stage("logits", ("fc",)),
        Stage("deep", ("features.block4", "features.block3")),
        Stage("block1", ("features.block1",)),
    ]
    assert model_stages(model, stages) == stages


def test_stage_errors():
    model = create("small_cnn", width=2)
    with pytest.raises(ValueError, match="has no parameters to randomize"):
        model_stages(nn.Sequential(nn.ReLU(), nn.Flatten()))
    with pytest.raises(ValueError, match=r"no module named 'features.blok4'.*'features.block4'"):
        model_stages(model, [["fc"], ["features.blok4"]])
    with pytest.raises(ValueError, match="'pool' has no parameters"):
        model_stages(model, [["fc"], ["pool"]])
    with pytest.raises(ValueError, match="overlaps"):
        model_stages(model, [["features"], ["features.block1"]])
    with pytest.raises(ValueError, match="named 'a'"):
        model_stages(model, [("a", ["fc"]), ("a", ["features.block1"])])
    with pytest.raises(ValueError, match="empty"):
        model_stages(model, [])


# -- randomized copies ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_exactly_the_expected_parameters_change(mode):
    model = small_cnn()
    model.train()
    model.features.block2.conv.weight.requires_grad_(False)
    before, flags = snapshot(model), flags_of(model)
    stages = model_stages(model)
    sets = stage_params(model, stages)
    work_ids = set()
    for k, (name, work) in enumerate(randomized_models(model, stages, mode=mode, seed=3)):
        assert name == stages[k].name
        work_ids.add(id(work))
        assert not any(m.training for m in work.modules())
        assert all(p.dtype == torch.float64 for p in work.parameters())
        expected = set().union(*sets[: k + 1]) if mode == "cascading" else sets[k]
        assert changed_params(work, before) == expected
    # One copy, randomized progressively or restored between stages.
    assert len(work_ids) == 1
    assert not work.features.block2.conv.weight.requires_grad
    assert_untouched(model, before, flags)


def test_norm_layers_return_to_their_initial_state():
    model = small_cnn()
    stages = model_stages(model)
    *_, (_, work) = randomized_models(model, stages, seed=0)
    bn = work.features.block1.bn
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_randomized_weights_are_seeded_and_shared_between_modes():
    model = small_cnn()
    stages = model_stages(model)

    def weights(mode, seed):
        return [(n, snapshot(w)) for n, w in randomized_models(model, stages, mode=mode, seed=seed)]

    state = torch.random.get_rng_state()
    a, b, c = weights("cascading", 5), weights("cascading", 5), weights("cascading", 6)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for (_, sa), (_, sb), (_, sc) in zip(a, b, c):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not torch.equal(sa["fc.weight"], sc["fc.weight"])
    # Stage k draws the same new weights in both modes.
    independent = weights("independent", 5)
    for k, stage in enumerate(stages):
        for key in a[k][1]:
            if key.startswith(stage.modules[0] + "."):
                assert torch.equal(a[k][1][key], independent[k][1][key]), key


# -- maps -----------------------------------------------------------------------------------


def test_linear_model_known_answer():
    """Gradient maps of f(x) = W (s x) + b are |W[c]| after min-max, whatever s and x are:
    randomizing s leaves the map unchanged (SSIM 1); randomizing the linear layer gives
    exactly |W'[c]| for the class c predicted by the TRAINED model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LinearToy().double()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([10.0, -10.0], dtype=torch.float64))  # predicts 0
    x = images(2, 6)[:, :, :8, :8]
    before, flags = snapshot(model), flags_of(model)

    expected_trained = minmax_post(model.fc.weight[0].detach().view(1, 1, 8, 8)).repeat(6, 0)
    copies = randomized_models(model, mode="independent", seed=4)
    _, logits_only = next(copies)
    expected_random = minmax_post(logits_only.fc.weight[0].detach().view(1, 1, 8, 8)).repeat(6, 0)
    # The randomized model would explain class 1 for some images if asked for its own
    # prediction; the test explains class 0 throughout.
    assert (logits_only(x).argmax(1) == 1).any()
    # s has no reset_parameters: it is redrawn from N(0, 0.01^2), the rest restored.
    _, scale_only = next(copies)
    assert 0 < abs(float(scale_only.scale.s.detach())) < 0.05
    assert torch.equal(scale_only.fc.weight, model.fc.weight)

    for mode in ("cascading", "independent"):
        result = cascading_randomization(
            model, "gradient", x, mode=mode, seed=4, postprocess=minmax_post, similarity=sk_ssim
        )
        assert result.stage_names == ["logits", "scale"]
        np.testing.assert_allclose(result.maps[0], expected_trained, atol=1e-6)
        np.testing.assert_allclose(result.maps[1], expected_random, atol=1e-6)
        np.testing.assert_allclose(
            result.ssim[0], sk_ssim(expected_random, expected_trained), atol=1e-9
        )
        assert result.ssim[0].max() < 0.9
        if mode == "cascading":  # s randomized on top of W': the map is still |W'[c]|
            np.testing.assert_allclose(result.ssim[1], result.ssim[0], atol=1e-9)
    # Randomizing only s (independent): the map is unchanged.
    np.testing.assert_allclose(result.ssim[1], 1.0, atol=1e-9)
    assert_untouched(model, before, flags)


@pytest.mark.parametrize("dims", [2, 3])
def test_cascading_maps_shapes_and_determinism(dims):
    model = small_cnn(dims)
    x = images(dims, 3)
    before, flags = snapshot(model), flags_of(model)
    seen: list[str] = []
    run = dict(method=input_gradient, x=x, postprocess=minmax_post, similarity=sk_ssim)
    result = cascading_randomization(model, **run, seed=7, progress=seen.append)
    assert seen == result.stage_names == ["logits", "block4", "block3", "block2", "block1"]
    assert result.ssim.shape == (5, 3)
    assert result.maps.shape == (6, 3, *x.shape[2:]) and result.maps.dtype == np.float32
    assert result.seed == 7 and result.mode == "cascading"
    # Stage maps match the maps of the yielded copies, and SSIM is of those maps.
    with torch.no_grad():
        target = copy.deepcopy(model).eval()(x).argmax(1)
    for k, (_, work) in enumerate(randomized_models(model, seed=7)):
        direct = minmax_post(input_gradient(work, x, target))
        np.testing.assert_allclose(result.maps[k + 1], direct, atol=1e-6)
    recomputed = np.stack([sk_ssim(m, result.maps[0]) for m in result.maps[1:]])
    np.testing.assert_allclose(result.ssim, recomputed, atol=1e-5)

    again = cascading_randomization(model, **run, seed=7)
    assert np.array_equal(again.maps, result.maps) and np.array_equal(again.ssim, result.ssim)
    other = cascading_randomization(model, **run, seed=8)
    assert not np.array_equal(other.maps[1:], result.maps[1:])
    assert np.array_equal(other.maps[0], result.maps[0])
    assert_untouched(model, before, flags)


def test_unseeded_run_records_its_seed():
    model = small_cnn()
    x = images(2, 2)
    run = dict(method=input_gradient, x=x, postprocess=minmax_post, similarity=sk_ssim)
    first = cascading_randomization(model, **run, seed=None)
    again = cascading_randomization(model, **run, seed=first.seed)
    assert np.array_equal(first.maps, again.maps)


def test_independent_wrapper_batches_and_reference_maps():
    model = small_cnn()
    x = images(2, 5)
    run = dict(postprocess=minmax_post, similarity=sk_ssim, seed=2)
    full = independent_randomization(model, input_gradient, x, **run)
    assert full.mode == "independent"
    batched = independent_randomization(model, input_gradient, x, batch_size=2, **run)
    np.testing.assert_allclose(batched.maps, full.maps, atol=1e-6)

    calls = []

    def counting(m, xb, t):
        calls.append(xb.shape[0])
        return input_gradient(m, xb, t)

    reference = full.maps[0].astype(np.float64)
    given = independent_randomization(model, counting, x, reference_maps=reference, **run)
    assert len(calls) == len(full.stage_names)  # the trained maps were not recomputed
    np.testing.assert_allclose(given.ssim, full.ssim, atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(4, 16, 16\); expected \(5, 16, 16\)"):
        independent_randomization(model, input_gradient, x, reference_maps=reference[:4], **run)


def test_original_untouched_when_the_explainer_raises():
    model = small_cnn()
    model.train()
    before, flags = snapshot(model), flags_of(model)
    calls = []

    def failing(m, xb, t):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("explainer failed")
        return input_gradient(m, xb, t)

    with pytest.raises(RuntimeError, match="explainer failed"):
        cascading_randomization(
            model, failing, images(2, 2), postprocess=minmax_post, similarity=sk_ssim
        )
    assert_untouched(model, before, flags)

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("forward failed")

    broken = Broken()
    with pytest.raises(RuntimeError, match="forward failed"):
        model_stages(broken, example_input=torch.zeros(1, 1, 4, 4))
    assert_no_hooks(broken)
    assert broken.training


def test_records_and_errors():
    model = small_cnn()
    x = images(2, 2)
    result = cascading_randomization(
        model, input_gradient, x, postprocess=minmax_post, similarity=sk_ssim
    )
    records = result.as_records(["a", "b"])
    assert len(records) == 10
    assert records[1] == {"image": "b", "stage": "logits", "value": float(result.ssim[0, 1])}
    with pytest.raises(ValueError, match="3 image ids for 2 images"):
        result.as_records(["a", "b", "c"])
    with pytest.raises(ValueError, match="mode must be one of"):
        cascading_randomization(model, input_gradient, x, mode="random")
    with pytest.raises(ValueError, match="has no parameters to randomize"):
        cascading_randomization(
            nn.Sequential(nn.Flatten()), input_gradient, x, postprocess=minmax_post
        )
    with pytest.raises(TypeError, match="params only apply"):
        cascading_randomization(model, input_gradient, x, params={"a": 1})


def test_default_postprocess_and_similarity():
    pytest.importorskip("trustmap.trust.postprocess")
    pytest.importorskip("trustmap.metrics.similarity")
    model = small_cnn()
    result = cascading_randomization(model, "gradient", images(2, 2))
    assert result.ssim.shape == (5, 2) and np.isfinite(result.ssim).all()


# -- baseline -------------------------------------------------------------------------------


def test_baseline_pairs_are_distinct_and_seeded():
    maps = np.random.default_rng(0).random((12, 16, 16))
    values, pairs = randomization_baseline(
        maps, n_pairs=50, seed=3, similarity=sk_ssim, return_pairs=True
    )
    assert values.shape == (50,) and pairs.shape == (50, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 50
    np.testing.assert_allclose(values, sk_ssim(maps[pairs[:, 0]], maps[pairs[:, 1]]))
    same = randomization_baseline(maps, seed=3, similarity=sk_ssim, return_pairs=True)[1]
    other = randomization_baseline(maps, seed=4, similarity=sk_ssim, return_pairs=True)[1]
    assert np.array_equal(same, pairs) and not np.array_equal(other, pairs)


def test_baseline_known_answers():
    maps = np.random.default_rng(1).random((5, 16, 16))
    values, pairs = randomization_baseline(maps, n_pairs=50, similarity=sk_ssim, return_pairs=True)
    # 5 maps give only 10 pairs: all of them are used and the length says so.
    assert values.shape == (10,)
    assert {tuple(sorted(p)) for p in pairs.tolist()} == {
        (i, j) for i in range(5) for j in range(i + 1, 5)
    }
    same = np.repeat(maps[:1], 4, axis=0)
    np.testing.assert_allclose(randomization_baseline(same, similarity=sk_ssim), 1.0)
    with pytest.raises(ValueError, match="at least 2 maps, got 1"):
        randomization_baseline(maps[:1], similarity=sk_ssim)
    with pytest.raises(ValueError, match="shape"):
        randomization_baseline(maps[0], similarity=sk_ssim)
