"""Occlusion against captum's ``Occlusion`` in float64, 2D and 3D.

captum occludes a window of shape ``sliding_window_shapes`` over ``(C, *spatial)``;
trustmap's occlusion covers all channels, i.e. ``sliding_window_shapes=(C, *window)``.
captum divides its float64 sums by float32 window counts and casts the result to
float32 at the very end (``feature_ablation.format_result``); the exact comparison
replaces only that final cast, so the maps are compared in float64 to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap
from trustmap.methods.perturbation._common import perturbation_baseline

captum_attr = pytest.importorskip("captum.attr")
feature_ablation = pytest.importorskip("captum.attr._core.feature_ablation")

DTYPE = torch.float64


def cnn(dim: int) -> nn.Sequential:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    pool = nn.AdaptiveMaxPool2d(2) if dim == 2 else nn.AdaptiveMaxPool3d(2)
    torch.manual_seed(5)
    return nn.Sequential(
        conv(2, 4, 3, padding=1),
        nn.ReLU(),
        conv(4, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(6 * 2**dim, 3),
    ).to(DTYPE)


def image(dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(6)
    spatial = (13, 16) if dim == 2 else (6, 7, 9)
    return torch.randn(3, 2, *spatial, generator=g, dtype=DTYPE)


@pytest.fixture
def float64_captum(monkeypatch):
    """captum's weighted average without its final float32 cast."""

    def format_result(total_attrib, weights, is_inputs_tuple, use_weights):
        if use_weights:
            attrib = tuple(a / w.to(a.dtype) for a, w in zip(total_attrib, weights))
        else:
            attrib = tuple(total_attrib)
        return attrib if is_inputs_tuple else attrib[0]

    monkeypatch.setattr(feature_ablation, "format_result", format_result)


CASES = {
    # overlapping with cut-off last windows; a window spanning a whole axis; tiling
    2: [((4, 5), (2, 3)), ((3, 16), (2, 1)), ((5, 4), (5, 4))],
    3: [((2, 3, 4), (1, 2, 3)), ((6, 2, 5), (2, 2, 2))],
}


@pytest.mark.parametrize(("dim", "case"), [(d, c) for d, cs in CASES.items() for c in cs])
@pytest.mark.parametrize("baseline", [0.7, "mean", "tensor"])
def test_occlusion_equals_captum(float64_captum, dim, case, baseline):
    model, x = cnn(dim).eval(), image(dim)
    window, stride = case
    target = torch.tensor([0, 2, 1])
    if baseline == "tensor":
        g = torch.Generator().manual_seed(7)
        base = torch.randn(x.shape, generator=g, dtype=DTYPE)
    elif baseline == "mean":
        base = perturbation_baseline(x, "mean")
    else:
        base = baseline
    ref = captum_attr.Occlusion(model).attribute(
        x,
        sliding_window_shapes=(2, *window),
        strides=(2, *stride),
        baselines=base,
        target=target,
        perturbations_per_eval=7,
    )
    assert ref.dtype == DTYPE
    got = trustmap.explain(
        model,
        x,
        "occlusion",
        target=target,
        window=window,
        stride=stride,
        baseline=baseline if baseline != "tensor" else base,
    )
    assert float(ref.abs().max()) > 0
    assert torch.equal(ref[:, 0], ref[:, 1])  # captum's map is the same in every channel
    assert (got[:, 0] - ref[:, 0]).abs().max() < 1e-10


def test_occlusion_matches_unpatched_captum_in_float32():
    model, x = cnn(2).float().eval(), image(2).float()
    ref = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(2, 4, 4), strides=(2, 2, 3), baselines=0.0, target=1
    )
    got = trustmap.explain(model, x, "occlusion", target=1, window=4, stride=(2, 3))
    torch.testing.assert_close(got, ref[:, :1], rtol=1e-5, atol=1e-6)
