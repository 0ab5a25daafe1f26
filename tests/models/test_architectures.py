"""Reference architectures (2D and 3D) and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap
from trustmap.models import (
    SmallCNN,
    create,
    is_localizer,
    list_architectures,
    load_checkpoint,
    save_checkpoint,
)

CLASSIFIERS = ("small_cnn", "attention_cnn", "resnet18", "densenet121")
# densenet121 downsamples 32-fold: 29 pixels per axis is its minimum (tested below); batch 2
# so that its BatchNorm can train on the 1-pixel final map.
SHAPES = {
    (2, "small_cnn"): (2, 1, 32, 32),
    (3, "small_cnn"): (1, 1, 16, 32, 32),
    (2, "attention_cnn"): (2, 1, 32, 32),
    (3, "attention_cnn"): (2, 1, 16, 32, 32),
    (2, "resnet18"): (2, 1, 32, 32),
    (3, "resnet18"): (2, 1, 16, 32, 32),
    (2, "densenet121"): (2, 1, 32, 32),
    (3, "densenet121"): (2, 1, 29, 29, 29),
}
# Narrow DenseNet121 (same 6/12/24/16 layout, kwargs passed through to MONAI) keeps the 3D
# test fast; the minimum size depends on the downsampling only, not on the width.
SMALL = {
    "small_cnn": {"width": 8},
    "attention_cnn": {"width": 4},
    "resnet18": {},
    "densenet121": {"init_features": 16, "growth_rate": 8},
}


@pytest.fixture(scope="module")
def classifiers():
    """Each classifier built once (DenseNet121 takes seconds to initialise in 3D)."""
    return {
        (name, dims): create(name, dims, in_channels=1, num_classes=3, seed=0, **SMALL[name])
        for name in CLASSIFIERS
        for dims in (2, 3)
    }


def _input(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_list_architectures():
    assert list_architectures() == [
        "attention_cnn",
        "attention_unet",
        "autoencoder",
        "box_localizer",
        "densenet121",
        "resnet18",
        "small_cnn",
        "unet",
        "vae",
    ]


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("dims", [2, 3])
def test_classifier_logits_and_backprop(classifiers, name, dims):
    model = classifiers[(name, dims)].train()
    x = _input(SHAPES[(dims, name)]).requires_grad_(True)
    out = model(x)
    assert out.shape == (x.shape[0], 3)
    out[:, 1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    first = next(p for p in model.parameters() if p.ndim > 1)
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_in_channels(name):
    model = create(name, spatial_dims=2, in_channels=3, num_classes=2, seed=0, **SMALL[name])
    assert model(_input((2, 3, 32, 32))).shape == (2, 2)
    with pytest.raises(RuntimeError):
        model(_input((2, 1, 32, 32)))


def test_densenet121_minimum_size_3d(classifiers):
    model = classifiers[("densenet121", 3)].eval()
    with torch.no_grad():
        assert model(_input((2, 1, 29, 29, 29))).shape == (2, 3)
        with pytest.raises(RuntimeError):
            model(_input((2, 1, 28, 29, 29)))


@pytest.mark.parametrize("dims", [2, 3])
def test_small_cnn_structure(dims):
    model = create("small_cnn", spatial_dims=dims, num_classes=2)
    assert isinstance(model, SmallCNN)
    conv_type = nn.Conv2d if dims == 2 else nn.Conv3d
    bn_type = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    blocks = list(model.features.children())
    assert len(blocks) == 4
    relus = []
    for block, c_out, stride in zip(blocks, (32, 64, 128, 256), (1, 2, 2, 2)):
        conv, bn, relu = list(block.children())
        assert type(conv) is conv_type
        assert conv.out_channels == c_out
        assert conv.kernel_size == (3,) * dims
        assert conv.stride == (stride,) * dims
        assert conv.padding == (1,) * dims
        assert type(bn) is bn_type and bn.num_features == c_out
        assert type(relu) is nn.ReLU and not relu.inplace
        relus.append(relu)
    # One ReLU module per block, so a hook on one sees one activation.
    assert len({id(r) for r in relus}) == 4
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 4
    assert model.fc.in_features == 256 and model.fc.out_features == 2
    # Stride 1 then 2, 2, 2: a 32-pixel axis ends at 4 before global pooling.
    x = _input((1, 1) + (32,) * dims)
    assert model.features(x).shape == (1, 256) + (4,) * dims


def test_small_cnn_width():
    model = create("small_cnn", width=8)
    assert [b.conv.out_channels for b in model.features] == [8, 16, 32, 64]
    assert model.fc.in_features == 64


def test_small_cnn_default_cam_layer_is_last_block():
    model = create("small_cnn", width=8, seed=0).eval()
    cam = trustmap.explain(model, _input((2, 1, 32, 32)), "grad_cam")
    assert cam.shape == (2, 1, 32, 32)
    from trustmap.methods.cam._layer import default_layer

    # The last module finishing with a spatial map: the feature stack ending in block4's ReLU.
    assert default_layer(model, _input((1, 1, 32, 32))) == "features"


def test_resnet18_kwargs_pass_through():
    model = create("resnet18", conv1_t_size=3, conv1_t_stride=1, seed=0)
    assert model.conv1.kernel_size == (3, 3)


def test_localizers_are_built():
    unet = create("unet", spatial_dims=3, channels=(4, 8, 16), strides=(2, 2))
    assert is_localizer(unet) and unet.target_kind == "mask"
    assert unet(_input((1, 1, 8, 16, 16))).shape == (1, 1, 8, 16, 16)
    boxes = create("box_localizer", width=4)
    assert is_localizer(boxes) and boxes.target_kind == "boxes"
    assert not is_localizer(create("small_cnn", width=4))


def test_seed_gives_same_weights_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = create("small_cnn", width=4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = create("small_cnn", width=4, seed=3)
    c = create("small_cnn", width=4, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_create_errors():
    with pytest.raises(ValueError, match=r"did you mean 'small_cnn'") as err:
        create("smal_cnn")
    assert "densenet121" in str(err.value)  # lists the names
    with pytest.raises(ValueError, match="unknown architecture"):
        create("inception_v3_xx")
    for dims in (1, 4, True):
        with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
            create("small_cnn", spatial_dims=dims)
    with pytest.raises(ValueError, match="in_channels"):
        create("small_cnn", in_channels=0)
    with pytest.raises(ValueError, match="num_classes"):
        create("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="2D only"):
        create("box_localizer", spatial_dims=3)
    with pytest.raises(ValueError, match="num_classes must be 1 or 2"):
        create("unet", num_classes=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        create("small_cnn", depth=5)
    with pytest.raises(ValueError, match="width"):
        create("small_cnn", width=0)
    with pytest.raises(ValueError, match="set by create"):
        create("resnet18", n_input_channels=3)
    with pytest.raises(ValueError, match="seed"):
        create("small_cnn", seed=-1)


# -- checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "dims", "kwargs", "shape"),
    [
        ("small_cnn", 2, {"width": 8}, (2, 1, 24, 24)),
        ("small_cnn", 3, {"width": 4}, (1, 1, 8, 16, 16)),
        (
            "unet",
            2,
            {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
            (1, 1, 20, 20),
        ),
        ("box_localizer", 2, {"width": 4, "score_threshold": 0.2}, (1, 1, 32, 32)),
    ],
)
def test_checkpoint_round_trip(tmp_path, arch, dims, kwargs, shape):
    model = create(arch, spatial_dims=dims, in_channels=1, num_classes=2, seed=1, **kwargs)
    # Train-mode steps change the BatchNorm running statistics, which must survive too.
    model.train()
    with torch.no_grad():
        model(_input(shape, seed=5) * 3 + 1)
    path = tmp_path / "model.pt"
    extra = {"epoch": 7, "dataset": "cxr-pneumothorax", "auc": [0.9, 0.85, 0.95], "ok": True}
    out_path = save_checkpoint(
        path,
        model,
        arch=arch,
        spatial_dims=dims,
        in_channels=1,
        num_classes=2,
        extra=extra,
        **kwargs,
    )
    assert out_path == path and path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "model.pt"]  # no temp file left
    loaded, info = load_checkpoint(path)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert info["arch"] == arch and info["spatial_dims"] == dims
    assert info["in_channels"] == 1 and info["num_classes"] == 2
    assert info["extra"] == extra
    assert dict(info["create_kwargs"]) == kwargs
    assert info["format"] == "trustmap-checkpoint" and info["version"] == 1
    assert "state_dict" not in info
    x = _input(shape, seed=2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    if arch == "box_localizer":
        assert loaded.score_threshold == 0.2


def test_checkpoint_is_weights_only_loadable(tmp_path):
    model = create("small_cnn", width=4)
    path = tmp_path / "m.pt"
    save_checkpoint(
        path, model, arch="small_cnn", spatial_dims=2, in_channels=1, num_classes=2, width=4
    )
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {
        "format",
        "version",
        "arch",
        "spatial_dims",
        "in_channels",
        "num_classes",
        "create_kwargs",
        "state_dict",
        "extra",
    }


def test_checkpoint_corrupt_and_foreign_files(tmp_path):
    model = create("small_cnn", width=4)
    good = tmp_path / "good.pt"
    save_checkpoint(
        good, model, arch="small_cnn", spatial_dims=2, in_channels=1, num_classes=2, width=4
    )
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    bare = tmp_path / "bare_state_dict.pt"
    torch.save(model.state_dict(), bare)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "trustmap-checkpoint", "obj": _Opaque()}, pickled)
    newer = tmp_path / "newer.pt"
    payload = torch.load(good, weights_only=True)
    torch.save({**payload, "version": 99}, newer)
    wrong = tmp_path / "wrong_arch_args.pt"
    torch.save({**payload, "create_kwargs": {"width": 8}}, wrong)

    for path, message in [
        (truncated, "corrupt or truncated"),
        (garbage, "not a readable trustmap checkpoint"),
        (bare, "not a trustmap checkpoint"),
        (pickled, "not a readable trustmap checkpoint"),
        (newer, "version 99"),
        (wrong, "do not fit"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


class _Opaque:
    pass


def test_save_checkpoint_refuses_what_cannot_be_loaded(tmp_path):
    model = create("small_cnn", width=4)
    path = tmp_path / "m.pt"
    common = {"arch": "small_cnn", "spatial_dims": 2, "in_channels": 1, "num_classes": 2}
    save_checkpoint(path, model, **common, width=4, extra={"epoch": 1})
    before = path.read_bytes()
    # Weights of width 4 declared as the default width 32.
    with pytest.raises(ValueError, match="do not fit"):
        save_checkpoint(path, model, **common)
    with pytest.raises(ValueError, match="JSON-like"):
        save_checkpoint(path, model, **common, width=4, extra={"curve": torch.zeros(3)})
    with pytest.raises(ValueError, match="finite"):
        save_checkpoint(path, model, **common, width=4, extra={"loss": float("nan")})
    with pytest.raises(ValueError, match="unknown architecture"):
        save_checkpoint(path, model, **{**common, "arch": "vgg"}, width=4)
    # Nothing was written by the refused calls.
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1]["extra"] == {"epoch": 1}
