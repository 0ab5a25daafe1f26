"""RISE: the expectation identity on models linear in the mask, determinism, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny


class Linear(nn.Module):
    """Two logits; logit 1 is ``sum(w * x) + bias``, so with a zero baseline the target
    score of a masked input is linear in the mask."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).flatten(1).sum(1) + self.bias
        return torch.stack([torch.zeros_like(s), s], 1)


def interpolation_kernel(spatial: tuple[int, ...], cell: tuple[int, ...]) -> torch.Tensor:
    """``K(u, v) = E_shift[sum_j a_j(u) a_j(v)]`` for masks made as the docstring says:
    a grid of ``ceil(s / c) + 1`` nodes, upsampled (align_corners=False) to
    ``nodes * c`` voxels, cropped at a uniform shift in ``[0, c)``. Built here from unit
    grids, independently of trustmap's mask code."""
    nodes = tuple(math.ceil(s / c) + 1 for s, c in zip(spatial, cell))
    n_nodes = math.prod(nodes)
    unit = torch.eye(n_nodes, dtype=torch.float64).reshape(n_nodes, 1, *nodes)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    up = F.interpolate(
        unit, size=tuple(n * c for n, c in zip(nodes, cell)), mode=mode, align_corners=False
    )
    n_vox = math.prod(spatial)
    kernel = torch.zeros((n_vox, n_vox), dtype=torch.float64)
    shifts = list(itertools.product(*(range(c) for c in cell)))
    for shift in shifts:
        crop = up[(slice(None), 0, *(slice(s, s + n) for s, n in zip(shift, spatial)))]
        a = crop.reshape(n_nodes, n_vox)  # a[j, u]
        kernel += a.T @ a
    return kernel / len(shifts)


def expected_rise(model: Linear, x: torch.Tensor, p: float, kernel: torch.Tensor) -> torch.Tensor:
    """``E[S(v)] = bias + p sum(w x) + (1 - p) (K (sum_c w x))(v)``.

    Derivation: ``S(v) = 1/(n p) sum_i f(M_i) M_i(v)`` with ``f(M) = bias + sum_u
    wx(u) M(u)``. ``M(u) = sum_j a_j(u) g_j`` with ``g_j ~ Bernoulli(p)`` independent and
    ``sum_j a_j(u) = 1`` (linear interpolation), so ``E[M(v)] = p`` and
    ``E[M(u) M(v)] = p^2 + p (1 - p) sum_j a_j(u) a_j(v)``.
    """
    wx = (model.w * x[0]).sum(0).reshape(-1)
    total = wx.sum()
    e = model.bias + p * total + (1 - p) * (kernel @ wx)
    return e.reshape(x.shape[2:]).detach()


def replicate_maps(model, x, n_runs: int, **params) -> torch.Tensor:
    maps = [
        trustmap.get_method("rise")(model, seed=s, **params).explain(x, target=1).attributions
        for s in range(n_runs)
    ]
    return torch.stack([m[0, 0] for m in maps])


def assert_unbiased(maps: torch.Tensor, expected: torch.Tensor) -> None:
    """The mean of independent runs is within 5 standard errors of ``expected`` at every
    voxel, and the estimate is informative (its error is small against the signal)."""
    mean = maps.mean(0)
    se = maps.std(0) / math.sqrt(maps.shape[0])
    z = (mean - expected).abs() / se
    assert float(z.max()) < 5.0, f"max z-score {float(z.max()):.2f}"
    spread = float(expected.max() - expected.min())
    assert float((mean - expected).abs().max()) < 0.1 * spread


def test_expectation_identity_single_voxel_cells():
    # cell = 1: the masks are the binary grids themselves, so K is the identity and
    # E[S] = bias + p * sum(w x) + (1 - p) * w x.
    x = torch.rand((1, 2, 6, 7), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = Linear(x.shape[1:])
    p = 0.3
    maps = replicate_maps(model, x, 8, n_samples=3000, cell=1, p=p, batch_size=4096)
    wx = (model.w * x[0]).sum(0)
    expected = (model.bias + p * wx.sum() + (1 - p) * wx).detach()
    assert_unbiased(maps, expected)


@pytest.mark.parametrize(
    ("spatial", "cell"), [((9, 11), (3, 4)), ((5, 6, 4), (2, 3, 2))], ids=["2d", "3d"]
)
def test_expectation_identity_smooth_masks(spatial, cell):
    x = torch.rand(
        (1, 1, *spatial), dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    model = Linear(x.shape[1:], seed=1)
    p = 0.5
    maps = replicate_maps(model, x, 8, n_samples=3000, cell=cell, p=p, batch_size=4096)
    assert_unbiased(maps, expected_rise(model, x, p, interpolation_kernel(spatial, cell)))


def test_p_one_gives_the_score_everywhere():
    # Every mask keeps everything: S(v) = f(x) exactly.
    x = make_input(2, 2, dtype=torch.float64)
    model = Linear(x.shape[1:])
    exp = trustmap.get_method("rise")(model, n_samples=5, p=1.0, seed=0).explain(x, target=1)
    score = model(x)[:, 1].detach()
    assert torch.allclose(exp.attributions, score.view(2, 1, 1, 1).expand_as(exp.attributions))


def test_shape_3d_and_seed_reported():
    model = make_tiny(3)
    x = make_input(3, 2)
    exp = trustmap.get_method("rise")(model, n_samples=6).explain(x)
    assert exp.attributions.shape == (2, 1, 8, 8, 8)
    assert isinstance(exp.params["seed"], int)
    again = trustmap.get_method("rise")(model, n_samples=6, seed=exp.params["seed"]).explain(x)
    assert torch.equal(exp.attributions, again.attributions)
    assert exp.params["cell"] == [2, 2, 2]  # ceil(8 / 7)
    assert_no_hooks(model)


def test_batching_does_not_change_the_result():
    model = make_tiny(2).double()
    x = make_input(2, 3, dtype=torch.float64)
    rise = trustmap.get_method("rise")
    full = rise(model, n_samples=20, cell=4, seed=5).explain(x).attributions
    chunked = rise(model, n_samples=20, cell=4, seed=5, batch_size=7).explain(x).attributions
    alone = rise(model, n_samples=20, cell=4, seed=5).explain(x[1:2]).attributions
    other = rise(model, n_samples=20, cell=4, seed=6).explain(x).attributions
    assert torch.allclose(full, chunked, atol=1e-12)
    assert torch.allclose(full[1:2], alone, atol=1e-12)
    assert not torch.allclose(full, other)


def test_baseline_is_used():
    model = make_tiny(2)
    x = make_input(2, 1)
    rise = trustmap.get_method("rise")
    zeros = rise(model, n_samples=10, seed=0).explain(x).attributions
    const = rise(model, n_samples=10, seed=0, baseline=0.0).explain(x).attributions
    blur = rise(model, n_samples=10, seed=0, baseline="blur").explain(x).attributions
    assert torch.equal(zeros, const)
    assert not torch.allclose(zeros, blur)


def test_no_gradients_left_on_the_model():
    model = make_tiny(2)
    trustmap.explain(model, make_input(2, 1), "rise", n_samples=4, seed=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_samples": 0}, "n_samples"),
        ({"p": 0.0}, "p must be in"),
        ({"p": 1.5}, "p must be in"),
        ({"cell": 17}, "larger than the image"),
        ({"cell": (2, 2, 2)}, "one per spatial dimension"),
        ({"cell": 0}, "positive"),
        ({"baseline": torch.zeros(3, 3)}, "broadcast"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_errors(params, message):
    with pytest.raises(ValueError, match=message):
        trustmap.explain(make_tiny(2), make_input(2, 1), "rise", seed=0, **params)
