"""Classification metrics of Katzmann et al.'s (2021) Table 1 with bootstrap intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from trustmap.metrics import ClassificationReport, MetricCI, classification_report
from trustmap.metrics.classification import METRICS, _from_counts, _resample_metrics


def _scores(n, seed=0, separation=1.0):
    """Labels and probabilities from two overlapping logistic populations."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    logit = rng.normal(size=n) + separation * (2 * y - 1)
    return y, 1 / (1 + np.exp(-logit))


def test_hand_computed_confusion_values():
    # 4 positives: 3 scored >= 0.5 (TP = 3, FN = 1); 6 negatives: 2 scored >= 0.5 (FP = 2,
    # TN = 4). The score exactly at the threshold counts as a positive prediction.
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.5, 0.2, 0.7, 0.6, 0.4, 0.3, 0.1, 0.0]
    r = classification_report(y, s, n_boot=200)
    assert r.confusion == ((4, 2), (1, 3))
    assert (r.n, r.n_positive, r.n_negative, r.prevalence) == (10, 4, 6, 0.4)
    expected = {
        "accuracy": 7 / 10,
        "sensitivity": 3 / 4,
        "specificity": 4 / 6,
        "ppv": 3 / 5,
        "npv": 4 / 5,
        "f1": 2 * 3 / (2 * 3 + 2 + 1),
        "informedness": 3 / 4 + 4 / 6 - 1,
        "markedness": 3 / 5 + 4 / 5 - 1,
        "mcc": (3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5),
        # Pairs (positive, negative) ranked correctly: 0.9 and 0.8 beat all 6 negatives,
        # 0.5 beats 4, 0.2 beats 2 (0.1, 0.0): 6 + 6 + 4 + 2 = 18 of 24.
        "roc_auc": 18 / 24,
    }
    for name, value in expected.items():
        assert getattr(r, name).value == pytest.approx(value, abs=1e-12), name


def test_against_sklearn():
    y, s = _scores(300, seed=1)
    r = classification_report(y, s, threshold=0.4, n_boot=10)
    pred = (s >= 0.4).astype(int)
    assert r.mcc.value == pytest.approx(matthews_corrcoef(y, pred), abs=1e-12)
    assert r.roc_auc.value == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r.accuracy.value == pytest.approx(np.mean(pred == y), abs=1e-12)


def test_resampled_auc_and_counts_match_weighted_sklearn():
    """The vectorised per-resample AUC equals sklearn's AUC with each case weighted by its
    multiplicity in the resample (ties included)."""
    rng = np.random.default_rng(3)
    y = np.array([1] * 7 + [0] * 9)
    s = np.round(rng.random(16), 1)  # coarse: many ties within and across classes
    pred = s >= 0.5
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    neg = neg[np.argsort(s[neg], kind="stable")]
    left = np.searchsorted(s[neg], s[pos], side="left")
    right = np.searchsorted(s[neg], s[pos], side="right")
    m_pos = rng.integers(0, 3, (5, pos.size)).astype(float)
    m_neg = rng.integers(0, 3, (5, neg.size)).astype(float)
    m_pos[:, 0] += 1  # every resample keeps both classes
    m_neg[:, 0] += 1
    out = _resample_metrics(m_pos, m_neg, pred[pos] * 1.0, pred[neg] * 1.0, left, right)
    for r in range(5):
        weights = np.concatenate([m_pos[r], m_neg[r]])
        labels = np.concatenate([y[pos], y[neg]])
        scores = np.concatenate([s[pos], s[neg]])
        preds = np.concatenate([pred[pos], pred[neg]]).astype(int)
        assert out["roc_auc"][r] == pytest.approx(
            roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12
        )
        # Expand the weights into repeated cases for the count-based metrics.
        rep = np.repeat(np.arange(labels.size), weights.astype(int))
        assert out["mcc"][r] == pytest.approx(matthews_corrcoef(labels[rep], preds[rep]), abs=1e-12)
        assert out["accuracy"][r] == pytest.approx(np.mean(labels[rep] == preds[rep]), abs=1e-12)


def test_intervals_contain_estimate_and_narrow_with_n():
    small = classification_report(*_scores(120, seed=2), n_boot=500)
    large = classification_report(*_scores(2400, seed=2), n_boot=500)
    for name in METRICS:
        for r in (small, large):
            m = getattr(r, name)
            assert m.low <= m.value <= m.high, (name, m)
        assert (large_w := getattr(large, name).high - getattr(large, name).low) < 0.5 * (
            getattr(small, name).high - getattr(small, name).low
        ), (name, large_w)


def test_accuracy_interval_matches_its_standard_error():
    """With class counts fixed (stratified resampling), accuracy's variance is
    (n_pos sens (1 - sens) + n_neg spec (1 - spec)) / n^2: the 95 % percentile interval
    must be close to +-1.96 of its square root."""
    y, s = _scores(3000, seed=4)
    r = classification_report(y, s, n_boot=2000, seed=1)
    sens, spec = r.sensitivity.value, r.specificity.value
    se = math.sqrt(r.n_positive * sens * (1 - sens) + r.n_negative * spec * (1 - spec)) / r.n
    width = r.accuracy.high - r.accuracy.low
    assert width == pytest.approx(2 * 1.959964 * se, rel=0.12)
    r90 = classification_report(y, s, n_boot=2000, seed=1, alpha=0.1)
    assert r90.accuracy.high - r90.accuracy.low == pytest.approx(2 * 1.644854 * se, rel=0.12)


def test_seed_determinism():
    y, s = _scores(200, seed=5)
    a = classification_report(y, s, seed=7)
    b = classification_report(y, s, seed=7)
    c = classification_report(y, s, seed=8)
    assert a == b
    assert a.to_dict() == b.to_dict()
    assert (a.roc_auc.low, a.roc_auc.high) != (c.roc_auc.low, c.roc_auc.high)
    drawn = classification_report(y, s, seed=None)
    assert isinstance(drawn.seed, int)
    assert classification_report(y, s, seed=drawn.seed) == drawn


def test_undefined_metrics_are_none_with_reason_and_json_has_no_nan():
    # Nothing predicted positive: PPV and markedness and MCC are undefined.
    r = classification_report([0, 1, 1, 0], [0.2, 0.3, 0.4, 0.1], n_boot=100)
    assert r.confusion == ((2, 0), (2, 0))
    for name in ("ppv", "markedness", "mcc"):
        metric = getattr(r, name)
        assert metric.value is None and metric.low is None and metric.high is None
        assert metric.reason
    assert r.sensitivity.value == 0 and r.specificity.value == 1
    assert r.roc_auc.value == 1.0
    text = json.dumps(r.to_dict(), allow_nan=False)
    assert json.loads(text)["ppv"] == {
        "value": None,
        "low": None,
        "high": None,
        "reason": "no positive predictions (TP + FP = 0)",
    }
    # One class only: AUC, specificity and informedness are undefined.
    one = classification_report([1, 1, 1], [0.2, 0.6, 0.9], n_boot=100)
    for name in ("roc_auc", "specificity", "informedness", "mcc"):
        assert getattr(one, name).value is None
    assert one.sensitivity.value == pytest.approx(2 / 3)
    json.dumps(one.to_dict(), allow_nan=False)
    # A metric defined on the data but not on every resample says so.
    assert one.npv.value == 0.0 and "resamples where it is defined" in one.npv.reason


def test_report_is_frozen_and_serialisable():
    r = classification_report(*_scores(50), n_boot=50)
    assert isinstance(r, ClassificationReport) and isinstance(r.mcc, MetricCI)
    with pytest.raises(AttributeError):
        r.n = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        r.mcc.value = 1.0  # type: ignore[misc]
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["confusion"] == [list(row) for row in r.confusion]
    assert set(METRICS) <= set(d) and d["n_boot"] == 50 and d["seed"] == 0
    table = r.format_table()
    assert "roc_auc" in table and r.roc_auc.format() in table


def test_no_bootstrap():
    r = classification_report(*_scores(40), n_boot=0)
    assert r.accuracy.value is not None and r.accuracy.low is None and r.accuracy.high is None


def test_accepts_tensors_and_bools():
    y, s = _scores(60)
    a = classification_report(torch.tensor(y).bool(), torch.tensor(s, requires_grad=True))
    b = classification_report(y.tolist(), s.tolist())
    assert a == b


def test_input_errors():
    with pytest.raises(ValueError, match="same length"):
        classification_report([0, 1], [0.5])
    with pytest.raises(ValueError, match="case 1 is 2"):
        classification_report([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite; case 1"):
        classification_report([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match=r"probabilities P\(positive\) in \[0, 1\]"):
        classification_report([0, 1], [-2.0, 3.5])
    with pytest.raises(ValueError, match="1-D"):
        classification_report([0, 1], [[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [])
    with pytest.raises(TypeError, match="numbers"):
        classification_report(["a", "b"], [0.1, 0.2])
    with pytest.raises(ValueError, match="threshold"):
        classification_report([0, 1], [0.1, 0.2], threshold=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        classification_report([0, 1], [0.1, 0.2], n_boot=-1)
    with pytest.raises(ValueError, match="alpha"):
        classification_report([0, 1], [0.1, 0.2], alpha=0)
    with pytest.raises(ValueError, match="seed"):
        classification_report([0, 1], [0.1, 0.2], seed=-3)


def test_from_counts_vectorised():
    out = _from_counts(np.array([3, 0]), np.array([2, 0]), np.array([4, 5]), np.array([1, 5]))
    assert out["accuracy"][0] == pytest.approx(0.7)
    assert math.isnan(out["ppv"][1]) and math.isnan(out["mcc"][1])
    assert out["npv"][1] == pytest.approx(0.5)
