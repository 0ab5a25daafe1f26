"""Grad-CAM and guided Grad-CAM against captum in float64, 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap

captum_attr = pytest.importorskip("captum.attr")

DTYPE = torch.float64


def cnn(dim: int) -> nn.Sequential:
    """Layer '3' (4 x 4 in 2D) is followed by a conv and a ReLU, so the gradient at the
    layer varies over positions and the upsampling is not trivial."""
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d(1) if dim == 2 else nn.AdaptiveAvgPool3d(1)
    torch.manual_seed(11)
    return nn.Sequential(
        conv(1, 4, 3, padding=1),
        nn.ReLU(),
        conv(4, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        conv(6, 5, 3, padding=1),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(5, 3),
    ).to(DTYPE)


def image(dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(12)
    spatial = (8, 8) if dim == 2 else (4, 6, 6)
    return torch.randn(3, 1, *spatial, generator=g, dtype=DTYPE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


MODE = {2: "bilinear", 3: "trilinear"}


@pytest.mark.parametrize("layer", ["3", "1"])
@pytest.mark.parametrize("dim", [2, 3])
def test_grad_cam_matches_captum_layer_grad_cam(dim, layer):
    model, x = cnn(dim).eval(), image(dim)
    target = torch.tensor([0, 2, 1])
    ref = captum_attr.LayerGradCam(model, model[int(layer)]).attribute(
        x, target=target, relu_attributions=True
    )
    ref = captum_attr.LayerAttribution.interpolate(ref, x.shape[2:], interpolate_mode=MODE[dim])
    got = trustmap.explain(model, x, "grad_cam", target=target, layer=layer)
    assert got.shape == ref.shape
    assert float(ref.abs().max()) > 0
    assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("dim", [2, 3])
def test_guided_grad_cam_matches_captum(dim):
    model, x = cnn(dim).eval(), image(dim)
    target = torch.tensor([1, 1, 0])
    ref = captum_attr.GuidedGradCam(model, model[3]).attribute(
        x, target=target, interpolate_mode=MODE[dim]
    )
    got = trustmap.explain(model, x, "guided_grad_cam", target=target, layer="3")
    assert got.shape == x.shape
    assert float(ref.abs().max()) > 0
    assert rel_err(got, ref) < 1e-6
