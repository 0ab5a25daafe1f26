"""Post-processing of raw attributions into [0, 1] maps (Arun et al.'s (2021) reference recipe)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from trustmap.trust.postprocess import PostprocessConfig, postprocess

# Two channels of a 3 x 3 map. |A| summed over channels gives the values 0..8 scrambled,
# with 8 an outlier (80): the 99th percentile clips it.
CH0 = np.array([[-1.0, 2.0, 0.0], [3.0, -40.0, 1.0], [0.5, -2.0, 4.0]])
CH1 = np.array([[2.0, -2.0, 1.0], [-1.0, 40.0, 4.0], [-0.5, 4.0, 3.0]])
ATTR = np.stack([CH0, CH1])  # sum of |.|: [[3, 4, 1], [4, 80, 5], [1, 6, 7]]


def test_default_matches_a_hand_computation():
    summed = np.array([[3.0, 4.0, 1.0], [4.0, 80.0, 5.0], [1.0, 6.0, 7.0]])
    # Sorted: 1 1 3 4 4 5 6 7 80; the 99th percentile sits at index 0.99 * 8 = 7.92,
    # between 7 and 80: 7 + 0.92 * 73 = 74.16.
    clip = 7.0 + 0.92 * 73.0
    expected = (np.minimum(summed, clip) - 1.0) / (clip - 1.0)
    got = postprocess(ATTR)
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    assert got.min() == 0.0 and got.max() == 1.0


def test_options_by_hand():
    # No clipping: plain min-max of the sum of |A|.
    got = postprocess(ATTR, clip_percentile=None)
    summed = np.abs(ATTR).sum(0)
    np.testing.assert_allclose(got, (summed - 1) / 79, atol=1e-7)
    # Mean over channels: the same after min-max (a positive scale).
    np.testing.assert_allclose(postprocess(ATTR, reduce_channels="mean"), postprocess(ATTR))
    # Signed sum: the +-40 cancel in the centre; both tails clipped at 1% / 99%.
    signed = ATTR.sum(0)  # [[1, 0, 1], [2, 0, 5], [0, 2, 7]]
    low, high = np.percentile(signed, 1), np.percentile(signed, 99)
    expected = (np.clip(signed, low, high) - low) / (high - low)
    np.testing.assert_allclose(postprocess(ATTR, absolute=False), expected, atol=1e-7)
    # max_abs keeps the channel value of largest magnitude, sign included.
    pick = np.where(np.abs(CH0) >= np.abs(CH1), CH0, CH1)
    raw = postprocess(ATTR, absolute=False, reduce_channels="max_abs", clip_percentile=None,
                      normalize=None)  # fmt: skip
    np.testing.assert_allclose(raw, pick, atol=1e-7)
    assert raw.min() == -40.0
    # normalize=None leaves the clipped values.
    clipped = postprocess(ATTR, normalize=None)
    assert clipped.max() == pytest.approx(74.16, abs=1e-4) and clipped.min() == 1.0


def test_percentile_and_minmax_are_per_map():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 2, 12, 12))
    b = rng.normal(size=(1, 2, 12, 12)) * 1000  # another scale must not leak into map 0
    batch = postprocess(np.concatenate([a, b]))
    assert batch.shape == (2, 12, 12)
    np.testing.assert_array_equal(batch[0], postprocess(a[0]))
    np.testing.assert_array_equal(batch[1], postprocess(b[0]))


def test_constant_maps_become_zeros_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = postprocess(np.full((2, 1, 5, 5), 3.0))
        zeros = postprocess(np.zeros((1, 6, 6)), clip_percentile=None)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(zeros, 0.0)
    # One constant map in a batch does not disturb the others.
    mixed = np.stack([np.full((1, 4, 4), 2.0), np.arange(16.0).reshape(1, 4, 4)])
    got = postprocess(mixed, clip_percentile=None)
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_allclose(got[1], np.arange(16.0).reshape(4, 4) / 15, atol=1e-7)


def test_layouts_types_and_devices():
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(2, 5, 6, 7))  # one volume (C, D, H, W)
    one = postprocess(vol, spatial_dims=3)
    assert one.shape == (5, 6, 7)
    np.testing.assert_array_equal(postprocess(vol[None]), one[None])  # (B, C, D, H, W)
    assert postprocess(vol).shape == (2, 6, 7)  # 4 axes default to (B, C, H, W)
    assert postprocess(vol[:, 0], spatial_dims=2).shape == (6, 7)
    t = torch.from_numpy(vol[None]).float()
    out = postprocess(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.device == t.device
    np.testing.assert_allclose(out.numpy(), postprocess(vol[None].astype(np.float32)), atol=0)


def test_input_is_not_modified():
    attr = np.random.default_rng(2).normal(size=(1, 3, 8, 8))
    copy = attr.copy()
    t = torch.from_numpy(attr.copy())
    postprocess(attr, absolute=False)
    postprocess(t)
    np.testing.assert_array_equal(attr, copy)
    np.testing.assert_array_equal(t.numpy(), copy)


def test_config_form_equals_keywords_and_is_hashable():
    cfg = PostprocessConfig(absolute=False, reduce_channels="mean", clip_percentile=95)
    assert cfg.clip_percentile == 95.0 and isinstance(cfg.clip_percentile, float)
    assert cfg.as_dict() == {
        "absolute": False,
        "reduce_channels": "mean",
        "clip_percentile": 95.0,
        "normalize": "minmax",
    }
    assert PostprocessConfig(clip_percentile=99) == PostprocessConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.absolute = True  # type: ignore[misc]
    np.testing.assert_array_equal(
        postprocess(ATTR, config=cfg),
        postprocess(ATTR, absolute=False, reduce_channels="mean", clip_percentile=95.0),
    )
    with pytest.raises(TypeError, match="either config or keyword"):
        postprocess(ATTR, config=cfg, absolute=False)


def test_errors_name_the_problem():
    bad = ATTR.copy()
    bad[0, 0, 0] = np.nan
    bad[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="1 NaN and 1 Inf"):
        postprocess(bad)
    with pytest.raises(ValueError, match="reduce_channels must be one of"):
        postprocess(ATTR, reduce_channels="max")
    with pytest.raises(ValueError, match="normalize must be one of"):
        PostprocessConfig(normalize="zscore")
    with pytest.raises(ValueError, match=r"in \(0, 100\]"):
        PostprocessConfig(clip_percentile=0)
    with pytest.raises(ValueError, match="at least 50"):
        PostprocessConfig(absolute=False, clip_percentile=10)
    with pytest.raises(TypeError, match="True or False"):
        PostprocessConfig(absolute="yes")
    with pytest.raises(ValueError, match=r"\(C, H, W\), \(B, C, H, W\)"):
        postprocess(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spatial_dims=3"):
        postprocess(np.zeros((1, 4, 4)), spatial_dims=3)
