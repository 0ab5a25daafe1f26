"""AUPRC and AUROC of saliency maps against masks: known answers and the scikit-learn oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from trustmap.metrics import EmptyMaskError, auprc, auprc_batch, auroc, auroc_batch


def _sk_auprc(m: np.ndarray, k: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(k.ravel(), m.ravel())
    return auc(recall, precision)


def _mask(shape: tuple[int, ...], rng: np.random.Generator, frac: float = 0.2) -> np.ndarray:
    k = rng.random(shape) < frac
    k.flat[0], k.flat[-1] = True, False  # at least one positive and one negative
    return k


def _tied_map(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    # Few distinct values, so most thresholds have ties (as clipped maps do).
    return rng.integers(0, 6, size=shape) / 5.0


@pytest.mark.parametrize("shape", [(12, 12), (4, 6, 5)])
def test_perfect_map_scores_one(shape):
    k = _mask(shape, np.random.default_rng(0))
    perfect = k.astype(np.float64)
    assert auprc(perfect, k) == pytest.approx(1.0, abs=1e-15)
    assert auroc(perfect, k) == pytest.approx(1.0, abs=1e-15)
    assert auprc(perfect, k, kind="average_precision") == pytest.approx(1.0, abs=1e-15)


def test_inverted_map_known_answers():
    k = _mask((10, 10), np.random.default_rng(1))
    p = k.mean()
    inverted = 1.0 - k
    assert auroc(inverted, k) == pytest.approx(0.0, abs=1e-15)
    # The curve goes (R, P) = (0, 1) -> (0, 0) [all negatives first] -> (1, p): area p / 2.
    assert auprc(inverted, k) == pytest.approx(p / 2, abs=1e-15)
    assert auprc(inverted, k, kind="average_precision") == pytest.approx(p, abs=1e-15)


def test_constant_map_is_defined():
    k = np.zeros((8, 8), bool)
    k[:2, :3] = True
    p = k.mean()
    m = np.full((8, 8), 0.4)
    assert auroc(m, k) == 0.5 == roc_auc_score(k.ravel(), m.ravel())
    # The trapezoid joins (0, 1) to (1, p); scikit-learn's auc over the PR curve agrees.
    assert auprc(m, k) == pytest.approx((1 + p) / 2, abs=1e-15)
    assert _sk_auprc(m, k) == pytest.approx((1 + p) / 2, abs=1e-15)
    assert auprc(m, k, kind="average_precision") == pytest.approx(p, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    shape = [(16, 16), (9, 13), (5, 6, 7)][seed % 3]
    k = _mask(shape, rng, frac=rng.uniform(0.02, 0.6))
    for m in (_tied_map(shape, rng), rng.random(shape), rng.normal(size=shape)):
        assert abs(auprc(m, k) - _sk_auprc(m, k)) < 1e-12
        assert abs(auroc(m, k) - roc_auc_score(k.ravel(), m.ravel())) < 1e-12
        ap = average_precision_score(k.ravel(), m.ravel())
        assert abs(auprc(m, k, kind="average_precision") - ap) < 1e-12


def test_only_the_ranking_matters():
    rng = np.random.default_rng(3)
    k = _mask((12, 12), rng)
    m = _tied_map((12, 12), rng)
    transformed = np.exp(3 * m) - 7  # strictly increasing: same ranking, same ties
    assert auprc(transformed, k) == pytest.approx(auprc(m, k), abs=1e-15)
    assert auroc(transformed, k) == pytest.approx(auroc(m, k), abs=1e-15)


def test_tensors_float32_and_01_masks_agree_with_numpy():
    rng = np.random.default_rng(4)
    k = _mask((10, 11), rng)
    m = rng.random((10, 11)).astype(np.float32)
    expected = (auprc(m, k), auroc(m, k))
    assert auprc(torch.from_numpy(m), torch.from_numpy(k)) == expected[0]
    assert auroc(m, k.astype(np.uint8)) == expected[1]
    assert auprc(m, k.astype(np.float32)) == expected[0]
    assert auroc(torch.from_numpy(m), torch.from_numpy(k.astype(np.float64))) == expected[1]


def test_inputs_are_not_modified():
    rng = np.random.default_rng(5)
    k = _mask((9, 9), rng)
    m = rng.random((9, 9))
    m_copy, k_copy = m.copy(), k.copy()
    auprc(m, k)
    auroc_batch(m[None], k[None])
    np.testing.assert_array_equal(m, m_copy)
    np.testing.assert_array_equal(k, k_copy)


@pytest.mark.parametrize("spatial", [(14, 14), (6, 5, 7)])
def test_batch_equals_single_calls(spatial):
    rng = np.random.default_rng(6)
    n = 7
    maps = np.stack([_tied_map(spatial, rng) for _ in range(n)])
    masks = np.stack([_mask(spatial, rng, frac=0.1 + 0.1 * i) for i in range(n)])
    np.testing.assert_allclose(
        auprc_batch(maps, masks), [auprc(m, k) for m, k in zip(maps, masks)], rtol=0, atol=1e-15
    )
    np.testing.assert_allclose(
        auroc_batch(maps, masks), [auroc(m, k) for m, k in zip(maps, masks)], rtol=0, atol=1e-15
    )
    ap = auprc_batch(maps, masks, kind="average_precision")
    np.testing.assert_allclose(
        ap, [auprc(m, k, kind="average_precision") for m, k in zip(maps, masks)], atol=1e-15
    )


def test_batch_skips_and_counts_empty_masks():
    rng = np.random.default_rng(7)
    maps = rng.random((5, 8, 8))
    masks = np.stack([_mask((8, 8), rng) for _ in range(5)])
    masks[1] = False
    masks[3] = False
    with pytest.raises(EmptyMaskError, match=r"images 1, 3"):
        auprc_batch(maps, masks)
    values, kept = auprc_batch(maps, masks, skip_empty=True)
    np.testing.assert_array_equal(kept, [0, 2, 4])
    assert not np.isnan(values).any()
    np.testing.assert_allclose(values, [auprc(maps[i], masks[i]) for i in kept], atol=1e-15)
    roc, kept_roc = auroc_batch(maps, masks, skip_empty=True)
    np.testing.assert_array_equal(kept_roc, kept)
    np.testing.assert_allclose(roc, [auroc(maps[i], masks[i]) for i in kept], atol=1e-15)
    values, kept = auprc_batch(maps[[1]], masks[[1]], skip_empty=True)
    assert values.shape == (0,) and kept.shape == (0,)


def test_batch_rejects_a_full_mask_even_when_skipping():
    maps = np.random.default_rng(8).random((3, 8, 8))
    masks = np.zeros((3, 8, 8), bool)
    masks[:, 0, 0] = True
    masks[2] = True
    with pytest.raises(ValueError, match=r"positive everywhere \(images 2\)"):
        auroc_batch(maps, masks, skip_empty=True)


def test_errors_name_the_problem():
    m = np.random.default_rng(9).random((8, 8))
    k = np.zeros((8, 8), bool)
    k[2, 2] = True
    with pytest.raises(ValueError, match=r"map \(8, 8\) and mask \(8, 9\)"):
        auprc(m, np.zeros((8, 9), bool))
    with pytest.raises(ValueError, match=r"map \(1, 8, 8\) and mask \(8, 8\)"):
        auroc(m[None], k)
    with pytest.raises(EmptyMaskError, match="no positive"):
        auprc(m, np.zeros((8, 8)))
    assert issubclass(EmptyMaskError, ValueError)
    with pytest.raises(ValueError, match="positive everywhere"):
        auroc(m, np.ones((8, 8), bool))
    with pytest.raises(ValueError, match=r"only 0 and 1.*0\.5"):
        auprc(m, np.where(k, 1.0, 0.5))
    bad = m.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        auprc(bad, k)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="1 Inf"):
        auroc(bad, k)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(D, H, W\)"):
        auprc(m.ravel(), k.ravel())
    with pytest.raises(ValueError, match="kind must be one of"):
        auprc(m, k, kind="roc")
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, D, H, W\)"):
        auprc_batch(m, k)
