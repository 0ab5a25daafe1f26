"""ae_anomaly: the reconstruction error of an autoencoder (Huff et al. 2021, section 2.3)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import make_input, make_tiny
from trustmap.models import create, save_checkpoint


class ByShape(nn.Module):
    """One tiny untrained autoencoder per (spatial dims, channel count), picked by the input's
    shape, so that one parameter set serves every input of the registry contract."""

    def __init__(self) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(
            {
                f"{d}d{c}c": create("autoencoder", d, c, 1, width=2, depth=2, seed=10 * d + c)
                for d in (2, 3)
                for c in (1, 2)
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets[f"{x.ndim - 2}d{x.shape[1]}c"](x)


@functools.cache
def contract_autoencoder() -> ByShape:
    return ByShape()


class Constant(nn.Module):
    """Reconstructs every image as the constant ``value`` (a worst-case normal model)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value) + 0 * self.dummy


def test_error_is_the_analytic_difference() -> None:
    model = make_tiny(2)
    x = make_input(2, 3)
    absolute = trustmap.explain(model, x, "ae_anomaly", autoencoder=Constant(0.25))
    squared = trustmap.explain(model, x, "ae_anomaly", autoencoder=Constant(0.25), error="squared")
    assert torch.allclose(absolute, (x - 0.25).abs())
    assert torch.allclose(squared, (x - 0.25) ** 2)
    identity = trustmap.explain(model, x, "ae_anomaly", autoencoder=lambda t: t.clone())
    assert torch.equal(identity, torch.zeros_like(x))


def test_smoothing_keeps_the_mean_and_lowers_the_peak() -> None:
    model = make_tiny(2)
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1.0
    raw = trustmap.explain(model, x, "ae_anomaly", autoencoder=Constant(0.0))
    smooth = trustmap.explain(model, x, "ae_anomaly", autoencoder=Constant(0.0), smooth=1.0)
    assert smooth.max() < raw.max()
    assert torch.isclose(smooth.sum(), raw.sum(), atol=1e-5)
    assert smooth[0, 0].argmax() == raw[0, 0].argmax()


def test_independent_of_the_classifier_weights() -> None:
    ae = contract_autoencoder()
    x = make_input(2, 2)
    a = trustmap.get_method("ae_anomaly")(make_tiny(2, seed=0), autoencoder=ae).explain(x)
    b = trustmap.get_method("ae_anomaly")(make_tiny(2, seed=5), autoencoder=ae).explain(x)
    assert torch.equal(a.attributions, b.attributions)
    assert trustmap.get_method("ae_anomaly").model_dependent is False
    assert a.params["anomaly_score"] == pytest.approx(a.attributions.flatten(1).mean(1).tolist())


def test_loads_a_checkpoint_and_checks_what_it_was_trained_for(tmp_path) -> None:
    ae = create("autoencoder", 2, 1, 1, width=2, depth=2, seed=0).eval()
    save_checkpoint(
        tmp_path / "model.pt",
        ae,
        arch="autoencoder",
        spatial_dims=2,
        in_channels=1,
        num_classes=1,
        extra={"input_size": [16, 16]},
        width=2,
        depth=2,
    )
    model = make_tiny(2)
    x = make_input(2, 2)
    from_dir = trustmap.explain(model, x, "ae_anomaly", autoencoder=str(tmp_path))
    with torch.no_grad():
        expected = (x - ae(x)).abs()
    assert torch.allclose(from_dir, expected, atol=1e-6)
    with pytest.raises(ValueError, match="trained at size"):
        trustmap.explain(model, make_input(2, 1)[..., :8, :8], "ae_anomaly", autoencoder=tmp_path)
    with pytest.raises(ValueError, match="1-channel 2D"):
        trustmap.explain(
            make_tiny(2, in_channels=2),
            make_input(2, 1, channels=2),
            "ae_anomaly",
            autoencoder=tmp_path,
        )
    classifier = create("small_cnn", 2, 1, 2, width=2)
    save_checkpoint(
        tmp_path / "cls.pt",
        classifier,
        arch="small_cnn",
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        width=2,
    )
    with pytest.raises(ValueError, match="not an autoencoder"):
        trustmap.explain(model, x, "ae_anomaly", autoencoder=tmp_path / "cls.pt")
    with pytest.raises(FileNotFoundError, match="no autoencoder checkpoint"):
        trustmap.explain(model, x, "ae_anomaly", autoencoder=tmp_path / "missing")


def test_without_an_autoencoder_one_clear_error() -> None:
    with pytest.raises(ValueError, match="needs a trained autoencoder"):
        trustmap.explain(make_tiny(2), make_input(2, 1), "ae_anomaly")
    with pytest.raises(ValueError, match="error must be one of"):
        trustmap.explain(
            make_tiny(2), make_input(2, 1), "ae_anomaly", autoencoder=Constant(0.0), error="l1"
        )
