"""SSIM of [0, 1] maps: scikit-image is the oracle for ssim and for the vectorised ssim_batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from trustmap.metrics import ssim, ssim_batch


def _skimage(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=1.0
    )


def _stack(spatial: tuple[int, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random maps plus the special cases: constant vs random, identical, identical
    constants, constant vs a different constant, zeros vs ones, smooth vs noise."""
    rng = np.random.default_rng(seed)
    a = rng.random((n, *spatial))
    b = rng.random((n, *spatial))
    a[0] = 0.3
    b[1] = a[1]
    a[2] = b[2] = 0.7
    a[3], b[3] = 0.2, 0.9
    a[4], b[4] = 0.0, 1.0
    grid = np.indices(spatial).sum(0) / sum(s - 1 for s in spatial)
    a[5], b[5] = grid, np.clip(grid + 0.1 * rng.normal(size=spatial), 0, 1)
    return a, b


@pytest.mark.parametrize("spatial", [(16, 16), (7, 7), (9, 12), (7, 8, 9), (10, 10, 10)])
def test_ssim_batch_matches_skimage_loop(spatial):
    a, b = _stack(spatial, 8, seed=len(spatial) * 10 + spatial[0])
    expected = np.array([_skimage(x, y) for x, y in zip(a, b)])
    got = ssim_batch(a, b)
    assert got.shape == (8,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    assert got[1] == pytest.approx(1.0, abs=1e-12)  # identical maps
    assert got[2] == pytest.approx(1.0, abs=1e-12)  # identical constant maps


def test_ssim_batch_handles_many_small_maps_in_one_pass():
    # More maps than fit in one chunk, so several chunks are concatenated.
    a, b = _stack((8, 8), 300, seed=1)
    expected = np.array([_skimage(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(ssim_batch(a, b), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("spatial", [(12, 10), (8, 9, 7)])
def test_ssim_is_skimage_and_defined_for_constant_maps(spatial):
    a, b = _stack(spatial, 6, seed=2)
    for x, y in zip(a, b):
        assert ssim(x, y) == _skimage(x, y)
        assert np.isfinite(ssim(x, y))
    assert ssim(a[2], b[2]) == pytest.approx(1.0, abs=1e-12)
    constant = np.full(spatial, 0.5)
    assert ssim(constant, constant) == pytest.approx(1.0, abs=1e-12)
    # Two different constants: only the luminance term differs,
    # (2 * .2 * .9 + C1) / (.2^2 + .9^2 + C1) with C1 = 1e-4.
    expected = (2 * 0.2 * 0.9 + 1e-4) / (0.2**2 + 0.9**2 + 1e-4)
    assert ssim(a[3], b[3]) == pytest.approx(expected, abs=1e-12)


def test_ssim_is_symmetric_and_dtype_independent():
    a, b = _stack((11, 13), 6, seed=3)
    x, y = a[5], b[5]
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-15)
    assert ssim(x.astype(np.float32), y.astype(np.float32)) == ssim(
        x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    )
    assert ssim(torch.from_numpy(x), torch.from_numpy(y)) == ssim(x, y)
    np.testing.assert_array_equal(
        ssim_batch(torch.from_numpy(a), torch.from_numpy(b)), ssim_batch(a, b)
    )


def test_inputs_are_not_modified():
    a, b = _stack((9, 9), 6, seed=4)
    a_copy, b_copy = a.copy(), b.copy()
    ssim_batch(a, b)
    ssim(a[0], b[0])
    np.testing.assert_array_equal(a, a_copy)
    np.testing.assert_array_equal(b, b_copy)


def test_errors_name_the_problem():
    x = np.random.default_rng(5).random((10, 10))
    with pytest.raises(ValueError, match=r"\(10, 10\) and \(10, 11\)"):
        ssim(x, np.zeros((10, 11)))
    y = x.copy()
    y[0, 0], y[1, 1] = -0.5, 1.0
    with pytest.raises(ValueError, match=r"b has values in \[-0\.5, 1\]"):
        ssim(x, y)
    with pytest.raises(ValueError, match=r"b has values in \[0, 2\]"):
        ssim(x, np.full((10, 10), 2.0) * (x > 0.5))
    with pytest.raises(ValueError, match=r"7 x 7 window.*\(6, 10\).*axis 0"):
        ssim(np.zeros((6, 10)), np.zeros((6, 10)))
    with pytest.raises(ValueError, match=r"7 x 7 x 7 window.*\(8, 8, 5\).*axis 2"):
        ssim_batch(np.zeros((2, 8, 8, 5)), np.zeros((2, 8, 8, 5)))
    bad = x.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="a contains 1 NaN"):
        ssim(bad, x)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(D, H, W\)"):
        ssim(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, D, H, W\)"):
        ssim_batch(x, x)
