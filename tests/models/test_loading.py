"""Bring your own model: every accepted form loads, and the silent mistakes of a first run
(random weights, raw intensities, a 2 x 2 CAM layer, SmoothGrad's dot lattice) warn."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import make_input, make_tiny
from trustmap.core.validation import NotApplicableError, TrustmapWarning
from trustmap.models import create, save_checkpoint
from trustmap.models.loading import input_range_warning, open_model, untrained_warning


def _trained_small_cnn(seed: int = 0) -> nn.Module:
    """small_cnn whose BatchNorm statistics come from images in [0, 1] (as after
    training), without an actual training run."""
    torch.manual_seed(seed)
    model = create("small_cnn", spatial_dims=2, in_channels=1, num_classes=2, width=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(8, 1, 32, 32, generator=gen))
    return model.eval()


# -- the forms of a model -----------------------------------------------------------------


def test_factory_in_the_current_directory_imports_without_pythonpath(tmp_path, monkeypatch):
    package = tmp_path / "mymodels_i20"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def factory():
                torch.manual_seed(0)
                return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    loaded = open_model("mymodels_i20.nets:factory")
    assert loaded.kind == "factory" and isinstance(loaded.model, nn.Module)
    assert sys.path == before, "the current directory is on sys.path only while importing"
    with pytest.raises(ValueError, match="current directory") as err:
        open_model("no_such_package_i20.nets:factory")
    assert "PYTHONPATH" in str(err.value)


def test_state_dict_with_arch(tmp_path):
    model = _trained_small_cnn()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded = open_model(path, arch="small_cnn")
    assert loaded.kind == "state-dict" and loaded.warnings == ()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded.model(x), model(x))
    # wrapped the usual ways (a training script's {"state_dict": ...}, DataParallel)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    torch.testing.assert_close(open_model(path, arch="small_cnn").model(x), model(x))
    with pytest.raises(ValueError, match="--arch"):
        open_model(path)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        open_model(path, arch="resnet18")


def test_trustmap_checkpoint(tmp_path):
    model = _trained_small_cnn()
    path = tmp_path / "model.pt"
    save_checkpoint(
        path, model, arch="small_cnn", spatial_dims=2, in_channels=1, num_classes=2, width=4
    )
    loaded = open_model(path)
    assert loaded.kind == "checkpoint"
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(loaded.model(x), model(x))


def test_torch_export_program(tmp_path):
    model = _trained_small_cnn()
    x = torch.rand(2, 1, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    loaded = open_model(path)
    assert loaded.kind == "export"
    torch.testing.assert_close(loaded.model(x), model(x))
    for name in ("gradient", "grad_cam", "guided_backprop", "deconvnet"):
        expected = trustmap.explain(model, x, name, target=1)
        # guided backprop used to return the plain gradient here: the program calls
        # aten.relu.default, which the modified-ReLU mode did not intercept
        torch.testing.assert_close(trustmap.explain(loaded.model, x, name, target=1), expected)
    with pytest.raises(NotApplicableError, match=r"torch\.export"):
        trustmap.explain(loaded.model, x, "lrp", target=1)


def test_monai_bundle_folder(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(
        json.dumps(
            {
                "num_classes": 2,
                "network_def": {
                    "_target_": "monai.networks.nets.DenseNet",
                    "spatial_dims": 2,
                    "in_channels": 1,
                    "out_channels": "@num_classes",
                    "init_features": 8,
                    "growth_rate": 4,
                    "block_config": [2, 2],
                },
            }
        )
    )
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    reference = DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2)).eval()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    torch.save({"model": reference.state_dict()}, bundle / "models" / "model.pt")
    loaded = open_model(bundle)
    assert loaded.kind == "monai-bundle" and loaded.warnings == ()
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(loaded.model(x), reference(x))
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"models/model\.pt"):
        open_model(bundle)
    with pytest.raises(ValueError, match="not a MONAI bundle"):
        open_model(tmp_path)


def test_unreadable_files_name_the_accepted_forms(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"TorchScript.*torch\.export.*checkpoint.*--arch"):
        open_model(bad)
    with pytest.raises(FileNotFoundError):
        open_model(tmp_path / "missing.pt")


# -- the warnings -------------------------------------------------------------------------


def test_random_weights_warn():
    untrained = create("small_cnn", spatial_dims=2, in_channels=1, num_classes=2, width=4)
    assert "never trained" in untrained_warning(untrained)
    assert untrained_warning(_trained_small_cnn()) is None
    assert untrained_warning(nn.Sequential(nn.Conv2d(1, 1, 3))) is None  # no BatchNorm: silent
    # also through TorchScript, where the BatchNorm class is not nn.BatchNorm2d
    assert "never trained" in untrained_warning(torch.jit.script(untrained))


def test_a_factory_without_weights_warns(tmp_path):
    loaded = open_model("tests.cli.factory:build")  # make_tiny sets BatchNorm statistics
    assert loaded.warnings == ()
    loaded = open_model("tests.models.test_loading:random_factory")
    assert any("randomly initialised" in w for w in loaded.warnings)
    weights = tmp_path / "w.pt"
    torch.save(loaded.model.state_dict(), weights)
    assert open_model("tests.models.test_loading:random_factory", weights).warnings == ()


def random_factory() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_raw_hounsfield_units_warn():
    model = _trained_small_cnn()
    gen = torch.Generator().manual_seed(3)
    windowed = torch.rand(1, 1, 32, 32, generator=gen)
    raw_hu = windowed * 2000 - 1000  # the same image in HU-like units
    assert input_range_warning(model, windowed) is None
    message = input_range_warning(model, raw_hu)
    assert "far outside" in message and "--window" in message
    assert "features.block1.bn" in message
    # through TorchScript too
    assert "far outside" in input_range_warning(torch.jit.script(model), raw_hu)
    # without trained BatchNorm statistics the magnitude alone tells
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    assert "Hounsfield" in input_range_warning(plain, raw_hu)
    assert input_range_warning(plain, windowed) is None


def test_a_cam_layer_of_two_by_two_warns():
    torch.manual_seed(0)
    model = create("resnet18", spatial_dims=2, in_channels=1, num_classes=2).eval()
    with pytest.warns(TrustmapWarning, match=r"'layer4' has a grid of only 2 x 2.*'layer3'"):
        trustmap.explain(model, torch.rand(1, 1, 32, 32), "grad_cam")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrustmapWarning)
        trustmap.explain(model, torch.rand(1, 1, 64, 64), "grad_cam")  # 4 x 4: no warning


def _lattice(a: np.ndarray, period: int) -> float:
    """Coefficient of variation of the mean map by position modulo ``period``, away from
    the border: 0 for a map without a lattice of that period."""
    inner = a[period:-period, period:-period]
    n = inner.shape[0] // period
    cells = inner[: n * period, : n * period].reshape(n, period, n, period).mean((0, 2))
    return float(cells.std() / cells.mean())


def test_smoothgrad_dot_lattice_is_explained_and_averaged_out():
    torch.manual_seed(0)
    model = create("small_cnn", spatial_dims=2, in_channels=1, num_classes=2, width=8).eval()
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(TrustmapWarning, match="lattice of period 8.*shift=8"):
        plain = trustmap.explain(model, x, "smoothgrad", target=1, n_samples=64, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrustmapWarning)
        shifted = trustmap.explain(model, x, "smoothgrad", target=1, n_samples=64, seed=0, shift=8)
    before = _lattice(plain.abs().sum(1)[0].numpy(), 8)
    after = _lattice(shifted.abs().sum(1)[0].numpy(), 8)
    assert before > 0.3 and after < before / 2, (before, after)
    # a model without strided convolutions has no lattice and no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrustmapWarning)
        tiny = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2, 2),
        )
        trustmap.explain(tiny, make_input(2, 1), "smoothgrad", n_samples=2, seed=0)


def test_shift_is_seeded_and_checked():
    model = make_tiny(2)
    x = make_input(2, 1)
    a = trustmap.explain(model, x, "smoothgrad", n_samples=4, seed=1, shift=2)
    b = trustmap.explain(model, x, "smoothgrad", n_samples=4, seed=1, shift=2)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="shift"):
        trustmap.explain(model, x, "smoothgrad", shift=-1)
