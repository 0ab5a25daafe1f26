"""Meaningful and extremal perturbation: planted evidence, the area constraint, the
smooth-max operator, gradients confined to the mask, determinism, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.methods.perturbation.extremal_perturbation import kernel_offsets, smooth_max_mask


class Spot(nn.Module):
    """Two logits: 0, and ``gain * mean(x over a box) - offset``. With a zero baseline only
    the box matters, and deleting it flips the prediction."""

    def __init__(self, spatial: tuple[int, ...], box: tuple[slice, ...]) -> None:
        super().__init__()
        w = torch.zeros(spatial)
        w[box] = 1.0 / w[box].numel()
        self.register_buffer("w", w)
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale * (x[:, 0] * self.w).flatten(1).sum(1) - 4.0
        return torch.stack([torch.zeros_like(s), s], 1)


SPOTS = {
    2: ((24, 24), (slice(4, 10), slice(12, 18))),
    3: ((12, 12, 12), (slice(2, 5), slice(6, 9), slice(3, 6))),
}


def spot_case(dims: int) -> tuple[Spot, torch.Tensor, tuple[slice, ...]]:
    spatial, box = SPOTS[dims]
    gen = torch.Generator().manual_seed(0)
    x = 1.0 + 0.1 * torch.rand((1, 1, *spatial), generator=gen)
    return Spot(spatial, box), x, box


def inside_outside(a: torch.Tensor, box: tuple[slice, ...]) -> tuple[float, float]:
    inside = torch.zeros(a.shape[2:], dtype=torch.bool)
    inside[box] = True
    return float(a[0, 0][inside].mean()), float(a[0, 0][~inside].mean())


def far_from(box: tuple[slice, ...], spatial: tuple[int, ...], distance: int) -> torch.Tensor:
    """Voxels more than ``distance`` voxels (Chebyshev) away from the box."""
    near = torch.zeros((1, 1, *spatial))
    near[(0, 0, *box)] = 1.0
    pool = torch.nn.functional.max_pool2d if len(spatial) == 2 else torch.nn.functional.max_pool3d
    near = pool(near, 2 * distance + 1, stride=1, padding=distance)
    return near[0, 0] == 0


# ------------------------------------------------------------------------------------
# meaningful perturbation
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_meaningful_deletes_the_planted_box(dims):
    model, x, box = spot_case(dims)
    size = x.shape[2] // 2
    # A lighter TV weight than the default keeps the halo around the box small on so
    # small an image.
    exp = trustmap.get_method("meaningful_perturbation")(
        model, n_iter=60, baseline="zeros", mask_size=size, tv_coeff=0.02, seed=0
    ).explain(x, target=1)
    a = exp.attributions
    assert a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    inside, outside = inside_outside(a, box)
    assert inside > 0.95
    assert outside < 0.3 * inside
    assert float(a[0, 0][far_from(box, x.shape[2:], 3)].mean()) < 0.1
    clean = torch.sigmoid(model(x)[0, 1].detach()).item()
    assert exp.params["final_probability"][0] < 0.05 < 0.9 < clean


def test_meaningful_l1_term_keeps_the_mask():
    # A huge area penalty makes deleting anything more costly than the score it removes.
    model, x, _ = spot_case(2)
    exp = trustmap.get_method("meaningful_perturbation")(
        model, n_iter=20, baseline="zeros", l1_coeff=100.0, seed=0
    ).explain(x, target=1)
    assert float(exp.attributions.max()) < 0.05


def test_meaningful_leaves_no_gradients_and_is_seeded():
    model, x, _ = spot_case(2)
    flags = [p.requires_grad for p in model.parameters()]
    mp = trustmap.get_method("meaningful_perturbation")
    first = mp(model, n_iter=4, jitter=2, seed=3).explain(x, target=1)
    second = mp(model, n_iter=4, jitter=2, seed=3).explain(x, target=1)
    other = mp(model, n_iter=4, jitter=2, seed=4).explain(x, target=1)
    assert torch.equal(first.attributions, second.attributions)
    assert not torch.equal(first.attributions, other.attributions)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert_no_hooks(model)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_iter": 0}, "n_iter"),
        ({"lr": 0.0}, "lr"),
        ({"tv_beta": 0.5}, "tv_beta"),
        ({"l1_coeff": -1.0}, "l1_coeff"),
        ({"mask_size": 40}, "larger than the image"),
        ({"mask_size": (4, 4, 4)}, "one per spatial dimension"),
        ({"jitter": -1}, "jitter"),
        ({"baseline": "bogus"}, "baseline"),
    ],
)
def test_meaningful_errors(params, message):
    with pytest.raises(ValueError, match=message):
        trustmap.explain(make_tiny(2), make_input(2, 1), "meaningful_perturbation", **params)


# ------------------------------------------------------------------------------------
# extremal perturbation
# ------------------------------------------------------------------------------------
AREAS = (0.05, 0.1, 0.2)


@pytest.mark.parametrize(
    ("dims", "params"),
    [(2, {"step": 1}), (3, {"step": 1, "sigma": 2.0})],
    ids=["2d", "3d"],
)
def test_extremal_masks_respect_their_areas(dims, params):
    model = make_tiny(dims)
    shape = (1, 1, 32, 32) if dims == 2 else (1, 1, 12, 12, 12)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exp = trustmap.get_method("extremal_perturbation")(
        model, areas=AREAS, n_iter=30, seed=0, **params
    ).explain(x)
    masks = exp.params["masks"]
    assert masks.shape == (shape[0], len(AREAS), *shape[2:])
    achieved = (masks > 0.5).flatten(2).float().mean(2)
    assert torch.allclose(achieved, torch.tensor(exp.params["achieved_areas"]))
    for i, area in enumerate(AREAS):
        assert (achieved[:, i] - area).abs().max() <= 0.25 * area + 0.01, (area, achieved)
    # Nested areas: a larger area keeps more.
    assert (achieved[:, 1:] > achieved[:, :-1]).all()
    assert torch.equal(exp.attributions, masks.sum(1, keepdim=True))


@pytest.mark.parametrize("dims", [2, 3])
def test_extremal_keeps_the_planted_box(dims):
    model, x, box = spot_case(dims)
    exp = trustmap.get_method("extremal_perturbation")(
        model, areas=0.15, n_iter=60, baseline="zeros", step=1, sigma=2.0, seed=0
    ).explain(x, target=1)
    inside, outside = inside_outside(exp.attributions, box)
    assert inside > 0.9
    assert outside < 0.2
    clean = float(model(x)[0, 1].detach())
    assert exp.params["final_score"][0][0] > 0.9 * clean


def test_extremal_batch_rows_are_independent():
    model = make_tiny(2).double()
    x = make_input(2, 3, dtype=torch.float64)
    ep = trustmap.get_method("extremal_perturbation")
    batch = ep(model, areas=(0.1, 0.3), n_iter=5, seed=0).explain(x).attributions
    alone = ep(model, areas=(0.1, 0.3), n_iter=5, seed=0).explain(x[2:3]).attributions
    assert torch.allclose(batch[2:3], alone, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())


def naive_smooth_max(p: torch.Tensor, step: int, sigma: float) -> torch.Tensor:
    """Direct definition at the nodes: smax over the ball of offsets of k_d p(u + d)."""
    nodes = p.shape[2:]
    out = torch.zeros_like(p)
    for u in itertools.product(*(range(n) for n in nodes)):
        z = []
        for d, k in kernel_offsets(step, sigma, len(nodes)):
            v = tuple(a + b for a, b in zip(u, d))
            inside = all(0 <= c < n for c, n in zip(v, nodes))
            z.append(k * p[(slice(None), 0, *v)] if inside else torch.zeros(p.shape[0]))
        z = torch.stack(z, 1).to(p.dtype)
        out[(slice(None), 0, *u)] = (z * torch.softmax(20 * z, 1)).sum(1)
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_smooth_max_matches_its_definition_and_gradient(dims):
    gen = torch.Generator().manual_seed(0)
    n = 4 if dims == 2 else 3
    p = torch.rand((2, 1, *([n] * dims)), generator=gen, dtype=torch.float64)
    spatial = (n,) * dims
    # step 1: the node grid is the image, so the mask is the smooth max itself.
    got = smooth_max_mask(p, 1, 1.5, spatial)
    assert torch.allclose(got, naive_smooth_max(p, 1, 1.5), atol=1e-12)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: smooth_max_mask(q, 2, 2.5, (2 * n - 1,) * dims), (p,))


def test_smooth_max_of_one_node_is_a_blob():
    params = torch.zeros((1, 1, 9, 9), dtype=torch.float64)
    params[0, 0, 4, 4] = 1.0
    m = smooth_max_mask(params, 1, 3.0, (9, 9))[0, 0]
    assert float(m.min()) >= 0 and float(m.max()) <= 1
    # Flat out to sigma / 2 (1.5 voxels): the centre and its 4-neighbours are ~1.
    assert float(m[4, 4]) > 0.99 and float(m[4, 5]) > 0.99 and float(m[3, 4]) > 0.99
    # Decreasing away from the node.
    row = m[4, 4:]
    assert (row[1:] <= row[:-1] + 1e-12).all() and float(row[-1]) < 0.5


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"areas": 0.0}, "areas"),
        ({"areas": 1.0}, "areas"),
        ({"areas": ()}, "areas"),
        ({"areas": ("a",)}, "areas"),
        ({"n_iter": 0}, "n_iter"),
        ({"step": 0}, "step"),
        ({"step": 40}, "larger than the image"),
        ({"sigma": 0.0}, "sigma"),
        ({"area_weight": -1.0}, "area_weight"),
        ({"jitter": -2}, "jitter"),
    ],
)
def test_extremal_errors(params, message):
    with pytest.raises(ValueError, match=message):
        trustmap.explain(make_tiny(2), make_input(2, 1), "extremal_perturbation", **params)
