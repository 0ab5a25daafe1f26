"""XRAI behaviour: identities of the region map, 3D supervoxels, user segments, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.morphology import ball, dilation, disk

import trustmap
import trustmap.methods.gradient.xrai  # registers "xrai" before __init__ lists it
from tests.conftest import make_tiny
from trustmap.methods.gradient._segments import dilated_membership

N_STEPS = 4


def smooth_input(shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    """Random but spatially smooth, so that segmentations have real regions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dims = len(shape) - 2
    pool = torch.nn.functional.avg_pool2d if dims == 2 else torch.nn.functional.avg_pool3d
    return pool(x, 5, stride=1, padding=2, count_include_pad=False) * 3


def aggregated_ig(model, x, target, baselines=("min", "max")) -> torch.Tensor:
    """``max_c mean_b IG_b``: the per-pixel attribution XRAI ranks regions by."""
    maps = [
        trustmap.explain(
            model, x, "integrated_gradients", target=target, baseline=b, n_steps=N_STEPS
        )
        for b in baselines
    ]
    return torch.stack(maps).mean(0).amax(1)


def xrai(model, x, target=None, **params) -> torch.Tensor:
    return trustmap.explain(model, x, "xrai", target=target, n_steps=N_STEPS, **params)


@pytest.mark.parametrize(
    ("dims", "shape", "params"),
    [
        (2, (2, 2, 32, 32), {}),
        (2, (2, 2, 32, 32), {"resize": None, "min_size": 30}),
        (3, (1, 1, 16, 16, 16), {}),
        (3, (2, 2, 12, 12, 12), {"scales": (4, 16, 64), "dilation_radius": 1}),
    ],
    ids=["2d", "2d-native", "3d", "3d-options"],
)
def test_region_map_keeps_the_total_and_region_means(dims, shape, params):
    """Each pixel holds the mean attribution of the region that first covered it, so the
    map's sum equals the attribution's sum, and every level set has its own mean."""
    model = make_tiny(dims, in_channels=shape[1]).double()
    x = smooth_input(shape)
    target = torch.tensor([1, 2][: shape[0]])
    out = xrai(model, x, target, **params)
    a = aggregated_ig(model, x, target)
    assert out.shape == x.shape
    assert torch.equal(out, out[:, :1].expand_as(out)), "channels must repeat the map"
    for i in range(shape[0]):
        m = out[i, 0]
        torch.testing.assert_close(m.sum(), a[i].sum(), rtol=1e-9, atol=1e-12)
        values = m.unique()
        assert 3 <= values.numel() < m.numel() / 20, "not a map of a few regions"
        for v in values:
            torch.testing.assert_close(a[i][m == v].mean(), v, rtol=1e-9, atol=1e-12)


def test_one_pixel_segments_give_back_the_aggregated_attribution():
    """With every pixel its own segment the map is ``max_c mean_b IG_b`` itself: checks
    the integrated gradients over both baselines and the channel aggregation."""
    model = make_tiny(2, in_channels=3).double()
    x = smooth_input((2, 3, 10, 12))
    target = torch.tensor([0, 2])
    labels = torch.arange(120).view(10, 12)
    out = xrai(model, x, target, segments=labels, min_pixel_diff=1)
    expected = aggregated_ig(model, x, target)
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-10, atol=1e-14)
    single = xrai(model, x, target, segments=labels, min_pixel_diff=1, baselines="zeros")
    expected = aggregated_ig(model, x, target, baselines=("zeros",))
    torch.testing.assert_close(single[:, 0], expected, rtol=1e-10, atol=1e-14)


def halves(shape_hw):
    h, w = shape_hw
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, : w // 2] = True
    return left


def test_label_map_segments_give_constant_region_values():
    model = make_tiny(2).double()
    x = smooth_input((3, 1, 16, 16), seed=1)
    left = halves((16, 16))
    labels = torch.where(left, 7, -2)
    out = xrai(model, x, segments=labels)
    a = aggregated_ig(model, x, None)
    for i in range(3):
        for region in (left, ~left):
            assert out[i, 0][region].unique().numel() == 1
            torch.testing.assert_close(out[i, 0][region][0], a[i][region].mean())
    # One label map per sample: sample 1 split by rows instead of columns.
    per_sample = torch.stack([labels, labels.T, labels])
    out2 = xrai(model, x, segments=per_sample)
    torch.testing.assert_close(out2[0], out[0])
    assert out2[1, 0][left.T].unique().numel() == 1
    assert not torch.equal(out2[1], out[1])


def test_higher_gain_density_segment_ranks_first():
    """Masks [whole image, better half]: the half with the higher mean goes first even
    though the whole image covers more; the other half then gets its own mean."""
    model = make_tiny(2).double()
    x = smooth_input((1, 1, 16, 16), seed=2)
    target = torch.tensor([1])
    a = aggregated_ig(model, x, target)[0]
    left = halves((16, 16))
    better, worse = (left, ~left) if a[left].mean() > a[~left].mean() else (~left, left)
    whole = torch.ones_like(left)
    out = xrai(model, x, target, segments=[whole, better])[0, 0]
    torch.testing.assert_close(out[better], a[better].mean().expand(128))
    torch.testing.assert_close(out[worse], a[worse].mean().expand(128))
    assert out[better][0] > out[worse][0]
    # Masks may be numpy arrays, given per sample.
    out_np = xrai(model, x, target, segments=[whole.numpy()[None], better.numpy()])[0, 0]
    torch.testing.assert_close(out_np, out)


def test_area_threshold_zero_stops_after_one_region():
    model = make_tiny(2).double()
    x = smooth_input((1, 1, 24, 24), seed=3)
    out = xrai(model, x, resize=None, area_threshold=0.0)[0, 0]
    full = xrai(model, x, resize=None)[0, 0]
    assert out.unique().numel() == 2, "one region, then the rest filled with its mean"
    assert full.unique().numel() > 2
    top = out == out.max()
    torch.testing.assert_close(full[top], out[top])


def test_deterministic_float32_and_constant_image():
    model = make_tiny(2, in_channels=2)
    x = smooth_input((1, 2, 20, 20), dtype=torch.float32)
    first, second = xrai(model, x), xrai(model, x)
    assert first.dtype == torch.float32
    assert torch.equal(first, second)
    flat = torch.full((1, 2, 20, 20), 0.3)
    out = xrai(model, flat, resize=None)  # min = max baselines: no attribution, no NaN
    assert torch.equal(out, torch.zeros_like(out))


def test_uniform_baseline_records_its_seed():
    model = make_tiny(2).double()
    x = smooth_input((1, 1, 16, 16))
    seg = halves((16, 16)).long()
    exp = trustmap.get_method("xrai")(
        model, n_steps=N_STEPS, baselines=("uniform", "min"), segments=seg
    ).explain(x)
    again = trustmap.get_method("xrai")(
        model, n_steps=N_STEPS, baselines=("uniform", "min"), segments=seg, seed=exp.params["seed"]
    ).explain(x)
    assert torch.equal(exp.attributions, again.attributions)


@pytest.mark.parametrize(
    ("shape", "radius", "n_labels"),
    [((30, 41), 5, 70), ((30, 41), 2, 3), ((30, 41), 0, 9), ((9, 11, 10), 2, 130)],
)
def test_dilated_membership_equals_skimage_dilation(shape, radius, n_labels):
    """Bitset dilation gives exactly PAIR's per-mask skimage dilation (reflect border),
    including more than 64 labels (several bit words) and labels that do not occur."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, n_labels, size=tuple(max(1, s // 3) for s in shape))
    labels = np.kron(coarse, np.ones((3,) * len(shape), dtype=int))
    labels = np.pad(labels, [(0, s - t) for s, t in zip(shape, labels.shape)], mode="edge")
    labels = labels + 5  # labels start at 5: segments are min..max, as in PAIR
    members = dilated_membership([labels, labels[::-1].copy()], radius)
    fp = disk(radius) if len(shape) == 2 else ball(radius)
    expected = []
    for img in (labels, labels[::-1]):
        for lab in range(img.min(), img.max() + 1):
            mask = img == lab
            expected.append(dilation(mask, fp) if radius else mask)
    assert members.n_segments == len(expected)
    for k, mask in enumerate(expected):
        pix = members.seg_pix[members.seg_ptr[k] : members.seg_ptr[k + 1]]
        np.testing.assert_array_equal(np.sort(pix), np.flatnonzero(mask))


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"segments": torch.zeros(15, 16, dtype=torch.long)}, ValueError, "segments has shape"),
        ({"segments": torch.zeros(3, 16, 16, dtype=torch.long)}, ValueError, r"\(2, 16, 16\)"),
        ({"segments": torch.zeros(16, 16)}, TypeError, "integer labels"),
        (
            {
                "segments": [
                    torch.ones(16, 16, dtype=torch.bool),
                    torch.ones(4, 4, dtype=torch.bool),
                ]
            },
            ValueError,
            r"segments\[1\] has shape",
        ),
        ({"segments": [torch.full((16, 16), 0.5)]}, TypeError, r"segments\[0\]"),
        ({"segments": []}, TypeError, "non-empty list"),
        ({"area_threshold": 1.5}, ValueError, "area_threshold"),
        ({"min_pixel_diff": 0}, ValueError, "min_pixel_diff"),
        ({"baselines": ()}, ValueError, "baselines"),
        ({"scales": (50, -1)}, ValueError, "scales"),
        ({"resize": (0, 224)}, ValueError, "resize"),
        ({"dilation_radius": -1}, ValueError, "dilation_radius"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"rule": "simpson"}, ValueError, "rule"),
        ({"baselines": ("min", "sideways")}, ValueError, "baseline"),
    ],
)
def test_bad_parameters_are_named(params, error, match):
    model = make_tiny(2)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        trustmap.explain(model, x, "xrai", n_steps=2, **params)


def test_3d_scales_must_be_supervoxel_counts():
    model = make_tiny(3)
    x = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="SLIC supervoxel counts"):
        trustmap.explain(model, x, "xrai", n_steps=2, scales=(2.5,))
