"""XRAI against PAIR ``saliency`` (the reference implementation) in float64.

PAIR works on one ``(H, W, C)`` numpy image and asks a ``call_model_function`` for input
gradients; the adapters below translate. Region algorithm tests hand PAIR our integrated
gradients through ``base_attribution`` so that they compare segmentation, dilation,
greedy selection, stopping rules and fill exactly; the end-to-end test lets PAIR compute
its own integrated gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency.core import xrai as pair_xrai
from saliency.core.base import INPUT_OUTPUT_GRADIENTS
from saliency.core.xrai import XRAI as PairXRAI
from saliency.core.xrai import XRAIParameters

import trustmap
import trustmap.methods.gradient.xrai  # registers "xrai" before __init__ lists it
from tests.conftest import make_tiny
from trustmap.methods.gradient._segments import Membership, greedy_regions
from trustmap.methods.gradient.integrated_gradients import path_rule

N_STEPS = 5


def phantom(batch: int, channels: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth background, two bright blobs and mild noise: real segment structure."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(batch):
        chans = []
        for _ in range(channels):
            c = torch.rand(4, generator=gen, dtype=torch.float64) * size
            img = 0.3 * torch.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (0.1 * size) ** 2)
            img = img + 0.8 * torch.exp(-((yy - c[2]) ** 2 + (xx - c[3]) ** 2) / 30.0)
            img = img + 0.2 * yy / size + 0.05 * torch.randn(img.shape, generator=gen)
            chans.append(img)
        out.append(torch.stack(chans))
    return torch.stack(out).to(torch.float64)


def setup(channels: int, batch: int = 2):
    model = make_tiny(2, in_channels=channels).double().eval()
    x = phantom(batch, channels)
    target = torch.tensor([1, 2, 0][:batch])
    return model, x, target


def mean_ig(model, x, target, n_steps=N_STEPS) -> torch.Tensor:
    """Integrated gradients from black and white, averaged (XRAI's base attribution)."""
    maps = [
        trustmap.explain(
            model, x, "integrated_gradients", target=target, baseline=b, n_steps=n_steps
        )
        for b in ("min", "max")
    ]
    return (maps[0] + maps[1]) / 2


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def assert_maps_equal(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-9) -> None:
    scale = np.abs(ref).max()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= rtol * scale, np.abs(ours - ref).max() / scale


@pytest.mark.parametrize(
    ("channels", "batch", "area", "min_diff"),
    [(1, 2, 1.0, 50), (3, 1, 0.4, 20)],
    ids=["grey", "rgb-area"],
)
def test_region_algorithm_matches_pair(channels, batch, area, min_diff):
    model, x, target = setup(channels, batch)
    ours = trustmap.explain(
        model,
        x,
        "xrai",
        target=target,
        n_steps=N_STEPS,
        area_threshold=area,
        min_pixel_diff=min_diff,
    )
    assert torch.equal(ours[:, :1].expand_as(ours), ours)
    attr = mean_ig(model, x, target)
    params = XRAIParameters(area_threshold=area)
    params.experimental_params["min_pixel_diff"] = min_diff
    for i in range(x.shape[0]):
        ref = PairXRAI().GetMask(
            hwc(x[i]), None, base_attribution=hwc(attr[i]), extra_parameters=params
        )
        assert_maps_equal(ours[i, 0].numpy(), ref)


def test_native_resolution_matches_pair_without_resize():
    model, x, target = setup(1, batch=1)
    ours = trustmap.explain(model, x, "xrai", target=target, n_steps=N_STEPS, resize=None)
    default = trustmap.explain(model, x, "xrai", target=target, n_steps=N_STEPS)
    assert not torch.equal(ours, default), "resize had no effect"
    attr = mean_ig(model, x, target)
    for i in range(x.shape[0]):
        segs = pair_xrai._get_segments_felzenszwalb(hwc(x[i]), resize_image=False)
        ref = PairXRAI().GetMask(hwc(x[i]), None, segments=segs, base_attribution=hwc(attr[i]))
        assert_maps_equal(ours[i, 0].numpy(), ref)


def pair_model_function(model, cls: int, n_steps: int):
    """PAIR's call_model_function, turning PAIR's IG rule into the trapezoid rule.

    PAIR integrates with ``sum_k g(alpha_k) / n`` over ``n`` equally spaced nodes that
    include both ends. With ``batch_size = n_steps`` each call holds one whole path in
    node order, so weighting row ``k`` by ``n * w_k`` (trapezoid weights) makes PAIR
    compute exactly trustmap's rule.
    """
    _, weights = path_rule(n_steps, "trapezoid", torch.float64)
    scale = (n_steps * weights).numpy()[:, None, None, None]

    def call(batch, call_model_args=None, expected_keys=None):
        assert batch.shape[0] == n_steps
        xb = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
        xb.requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xb)[:, cls].sum(), xb)
        return {INPUT_OUTPUT_GRADIENTS: grad.numpy().transpose(0, 2, 3, 1) * scale}

    return call


def test_end_to_end_with_pair_integrated_gradients():
    model, x, target = setup(1)
    ours = trustmap.explain(model, x, "xrai", target=target, n_steps=N_STEPS)
    params = XRAIParameters(steps=N_STEPS)
    for i in range(x.shape[0]):
        ref = PairXRAI().GetMask(
            hwc(x[i]),
            pair_model_function(model, int(target[i]), N_STEPS),
            batch_size=N_STEPS,
            extra_parameters=params,
        )
        # PAIR accumulates the path gradients in float32.
        assert_maps_equal(ours[i, 0].numpy(), ref, rtol=1e-5)


def run_greedy(attr: np.ndarray, masks: list[np.ndarray], area: float, min_diff: int):
    seg, pix = np.nonzero(np.stack(masks).reshape(len(masks), -1))
    members = Membership.from_pairs(seg, pix, len(masks), attr.size)
    out = greedy_regions(attr.reshape(-1), members, area_threshold=area, min_pixel_diff=min_diff)
    return out.reshape(attr.shape)


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 1, 0)])
def test_greedy_ties_and_min_pixel_diff_follow_pair(order):
    """A and B tie on gain density but leave different remainders; Z has exactly
    ``min_pixel_diff`` pixels and the highest density, so it must be taken first."""
    attr = np.full((6, 8), -1.0)
    a = np.zeros_like(attr, dtype=bool)
    b = np.zeros_like(a)
    z = np.zeros_like(a)
    a[0, 0:8] = True  # O = row 0 cols 0-3 (1.0), P = cols 4-7 (0.0): mean 0.5
    attr[0, 0:4], attr[0, 4:8] = 1.0, 0.0
    b[0, 0:4] = True  # B = O + Q, Q = rows 1-3 cols 0-3 with four 1.0: mean 0.5
    b[1:4, 0:4] = True
    attr[1:4, 0:4] = 0.0
    attr[1, 0:4] = 1.0
    z[5, 4:8] = True
    attr[5, 4:8] = 5.0
    masks = [[a, b, z][k] for k in order]
    ref, _ = PairXRAI._xrai(attr, masks, area_perc_th=1.0, min_pixel_diff=4)
    np.testing.assert_array_equal(run_greedy(attr, masks, 1.0, 4), ref)
    assert ref[5, 4] == 5.0
    # The tie is real: the first of A and B wins and the map depends on which.
    first = a if order.index(0) < order.index(1) else b
    assert (ref[first] == 0.5).all()


@pytest.mark.parametrize(
    ("seed", "quantised", "area", "min_diff"),
    [
        (0, True, 1.0, 1),
        (2, True, 1.0, 1),
        (1, False, 1.0, 10),
        (3, True, 0.5, 5),
        (4, False, 0.0, 3),
    ],
)
def test_greedy_merge_matches_pair_on_random_overlapping_masks(seed, quantised, area, min_diff):
    """Random rectangles (overlapping, nested, duplicated). Quantised attributions give
    gains that tie exactly in PAIR's fresh means but not in running sums."""
    rng = np.random.default_rng(seed)
    h, w = 24, 20
    masks = []
    for _ in range(40):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        hi = 8 if quantised else 14
        m = np.zeros((h, w), dtype=bool)
        m[y0 : y0 + rng.integers(2, hi), x0 : x0 + rng.integers(2, hi)] = True
        masks.append(m)
    masks += [masks[3].copy(), masks[0] | masks[1]]
    if quantised:
        attr = np.round(rng.integers(0, 4, size=(h, w)) * 0.1, 10)
    else:
        attr = rng.normal(size=(h, w))
    ref, _ = PairXRAI._xrai(attr, masks, area_perc_th=area, min_pixel_diff=min_diff)
    np.testing.assert_array_equal(run_greedy(attr, masks, area, min_diff), ref)
