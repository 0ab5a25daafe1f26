"""Binary classification metrics with bootstrap confidence intervals (Katzmann et al.
2021, Table 1).

Schutte et al. 2020 (Katzmann et al. 2021, section 3.3) check that a classifier is fit for its task
before explaining it: accuracy, F1, sensitivity, specificity, PPV, NPV, informedness,
markedness, MCC and ROC AUC on the test set, each with a 95 % confidence interval.

>>> report = classification_report([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], n_boot=200)
>>> report.confusion
((1, 1), (1, 1))
>>> report.accuracy.value
0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from trustmap.core.seeding import resolve_seed

__all__ = ["METRICS", "ClassificationReport", "MetricCI", "classification_report"]

METRICS = (
    "accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "informedness",
    "markedness",
    "mcc",
    "roc_auc",
)

# Why a metric has no value, keyed by metric; used when its denominator is zero.
_UNDEFINED = {
    "accuracy": "no cases",
    "f1": "no positive cases and no positive predictions (2TP + FP + FN = 0)",
    "sensitivity": "no positive cases (TP + FN = 0)",
    "specificity": "no negative cases (TN + FP = 0)",
    "ppv": "no positive predictions (TP + FP = 0)",
    "npv": "no negative predictions (TN + FN = 0)",
    "informedness": "needs both positive and negative cases",
    "markedness": "needs both positive and negative predictions",
    "mcc": "a row or column of the confusion matrix is empty (one class or one prediction)",
    "roc_auc": "needs both positive and negative cases",
}

# Confusion counts of this many cases are held at once while bootstrapping: bounds memory
# (8 bytes each) for large test sets while keeping the work vectorised.
_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class MetricCI:
    """A metric's value and its bootstrap confidence interval.

    ``value`` is None when the metric is undefined on the data (a zero denominator);
    ``low``/``high`` are None when no interval could be computed. ``reason`` says why, or
    notes that the interval uses only the resamples on which the metric is defined.
    """

    value: float | None
    low: float | None
    high: float | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "low": self.low, "high": self.high, "reason": self.reason}

    def format(self, digits: int = 3) -> str:
        """``".809 [.757, .860]"`` style, as in Katzmann et al.'s (2021) Table 1; ``"n/a"``
        if undefined."""
        if self.value is None:
            return "n/a"
        text = f"{self.value:.{digits}f}"
        if self.low is not None and self.high is not None:
            text += f" [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return text


@dataclass(frozen=True)
class ClassificationReport:
    """Test-set performance of a binary classifier at one threshold.

    ``confusion`` is ``((tn, fp), (fn, tp))``: rows are the true class (0, 1), columns
    the predicted class. Every metric is a :class:`MetricCI` with a ``1 - alpha``
    stratified percentile-bootstrap interval over cases.
    """

    n: int
    n_positive: int
    n_negative: int
    prevalence: float
    threshold: float
    confusion: tuple[tuple[int, int], tuple[int, int]]
    accuracy: MetricCI
    f1: MetricCI
    sensitivity: MetricCI
    specificity: MetricCI
    ppv: MetricCI
    npv: MetricCI
    informedness: MetricCI
    markedness: MetricCI
    mcc: MetricCI
    roc_auc: MetricCI
    n_boot: int
    alpha: float
    seed: int
    ci_method: str = "stratified percentile bootstrap over cases"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (no NaN: undefined values are None with a reason)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MetricCI):
                out[f.name] = value.to_dict()
            elif f.name == "confusion":
                out[f.name] = [list(row) for row in value]
            else:
                out[f.name] = value
        return out

    def format_table(self, digits: int = 3) -> str:
        """Metric, value and interval, one per line, for consoles and logs."""
        width = max(len(name) for name in METRICS)
        (tn, fp), (fn, tp) = self.confusion
        level = round(100 * (1 - self.alpha), 6)
        lines = [
            f"n={self.n} (positive {self.n_positive}, negative {self.n_negative}), "
            f"threshold {self.threshold:g}, {level:g}% CI from {self.n_boot} resamples",
            f"confusion [[tn, fp], [fn, tp]] = [[{tn}, {fp}], [{fn}, {tp}]]",
        ]
        for name in METRICS:
            metric: MetricCI = getattr(self, name)
            line = f"{name:<{width}}  {metric.format(digits)}"
            if metric.reason:
                line += f"  ({metric.reason})"
            lines.append(line)
        return "\n".join(lines)


def _as_1d(name: str, values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU or requiring grad
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a 1-D array of numbers: {err}") from None
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one value per case), got shape {array.shape}; for "
            "probabilities of two classes pass the positive column, e.g. p[:, 1]"
        )
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    return array


def _validate(
    y_true: Any, y_score: Any, threshold: float, n_boot: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_1d("y_true", y_true)
    scores = _as_1d("y_score", y_score).astype(np.float64)
    if labels.shape != scores.shape:
        raise ValueError(
            f"y_true and y_score must have the same length, got {labels.size} and {scores.size}"
        )
    if labels.size == 0:
        raise ValueError("y_true is empty: no cases to evaluate")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"y_true must hold 0 or 1; case {first} is {labels[first].item()!r} "
            f"({int(bad.sum())} invalid labels)"
        )
    if not np.isfinite(scores).all():
        first = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"y_score must be finite; case {first} is {scores[first].item()!r}")
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError(
            f"y_score must be probabilities P(positive) in [0, 1], got values in "
            f"[{scores.min():g}, {scores.max():g}]; for logits use softmax(logits)[:, 1] "
            "or sigmoid(logit)"
        )
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not (0 <= threshold <= 1):
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (0 < alpha < 1):
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    return labels.astype(np.int64), scores


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN (internal only) where ``den`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict:
    """Every count-based metric, element-wise over arrays of confusion counts."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    sens = _divide(tp, tp + fn)
    spec = _divide(tn, tn + fp)
    ppv = _divide(tp, tp + fp)
    npv = _divide(tn, tn + fn)
    # The product of the square roots, not the root of the product: the four-fold
    # product of counts loses precision (and overflows int64 in other code) first.
    margins = np.sqrt(tp + fp) * np.sqrt(tp + fn) * np.sqrt(tn + fp) * np.sqrt(tn + fn)
    return {
        "accuracy": _divide(tp + tn, tp + tn + fp + fn),
        "f1": _divide(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "informedness": sens + spec - 1,
        "markedness": ppv + npv - 1,
        "mcc": _divide(tp * tn - fp * fn, margins),
    }


def _counts_matrix(indices: np.ndarray, size: int) -> np.ndarray:
    """``(R, size)`` multiplicities of each case in each of the R resamples."""
    r = indices.shape[0]
    flat = (indices + np.arange(r)[:, None] * size).ravel()
    return np.bincount(flat, minlength=r * size).reshape(r, size).astype(np.float64)


def _resample_metrics(
    m_pos: np.ndarray,
    m_neg: np.ndarray,
    pred_pos: np.ndarray,
    pred_neg: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
) -> dict[str, np.ndarray]:
    """Every metric on R resamples given as multiplicities, NaN where undefined.

    ``m_pos (R, n_pos)`` and ``m_neg (R, n_neg)`` count how often each positive and each
    negative case (negatives sorted by score) is drawn; ``pred_*`` are the cases' 0/1
    predictions; ``left``/``right`` locate each positive's score among the sorted
    negative scores (``searchsorted`` left and right).
    """
    n_pos, n_neg = m_pos.sum(axis=1), m_neg.sum(axis=1)
    tp = m_pos @ pred_pos
    fp = m_neg @ pred_neg
    out = _from_counts(tp, fp, n_neg - fp, n_pos - tp)
    if m_pos.shape[1] and m_neg.shape[1]:
        # AUC = P(score_pos > score_neg) + P(tie) / 2 over the resampled pairs, each case
        # weighted by its multiplicity (the Mann-Whitney U over n_pos n_neg): the running
        # count of drawn negatives up to each positive's score gives all pairs at once.
        cum = np.concatenate([np.zeros((m_neg.shape[0], 1)), np.cumsum(m_neg, axis=1)], axis=1)
        below = cum[:, left]
        ties = cum[:, right] - below
        out["roc_auc"] = (m_pos * (below + 0.5 * ties)).sum(axis=1) / (n_pos * n_neg)
    else:
        out["roc_auc"] = np.full(m_pos.shape[0], np.nan)
    return out


def _bootstrap(
    labels: np.ndarray, scores: np.ndarray, predicted: np.ndarray, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """Each metric on ``n_boot`` stratified resamples (positives and negatives resampled
    separately, each to its own count), NaN where undefined."""
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(labels == 1)
    # Negatives sorted by score, for the cumulative-count AUC of _resample_metrics.
    neg = np.flatnonzero(labels == 0)
    neg = neg[np.argsort(scores[neg], kind="stable")]
    n_pos, n_neg = pos.size, neg.size
    pred_pos, pred_neg = predicted[pos].astype(np.float64), predicted[neg].astype(np.float64)
    left = np.searchsorted(scores[neg], scores[pos], side="left")
    right = np.searchsorted(scores[neg], scores[pos], side="right")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    chunk = max(1, _CHUNK_CELLS // max(labels.size, 1))
    for start in range(0, n_boot, chunk):
        r = min(chunk, n_boot - start)
        m_pos = _counts_matrix(rng.integers(0, max(n_pos, 1), (r, n_pos)), n_pos)
        m_neg = _counts_matrix(rng.integers(0, max(n_neg, 1), (r, n_neg)), n_neg)
        for name, values in _resample_metrics(
            m_pos, m_neg, pred_pos, pred_neg, left, right
        ).items():
            parts[name].append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def classification_report(
    y_true: Any,
    y_score: Any,
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int | None = 0,
    alpha: float = 0.05,
) -> ClassificationReport:
    """Katzmann et al.'s (2021) Table 1 metrics with stratified percentile-bootstrap intervals.

    A case is predicted positive when ``y_score >= threshold``. With ``TP, FP, TN, FN`` its
    confusion counts: accuracy ``(TP+TN)/n``, F1 ``2TP/(2TP+FP+FN)``, sensitivity
    ``TP/(TP+FN)``, specificity ``TN/(TN+FP)``, PPV ``TP/(TP+FP)``, NPV ``TN/(TN+FN)``,
    informedness ``sens+spec-1``, markedness ``PPV+NPV-1``, MCC
    ``(TP TN - FP FN)/sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))`` and ROC AUC (threshold-free,
    ``sklearn.metrics.roc_auc_score``).

    Confidence intervals: ``n_boot`` resamples of the cases drawn with replacement
    separately within positives and within negatives (so every resample keeps the
    observed class counts and both classes), with ``numpy.random.default_rng(seed)``; the
    interval is the ``alpha/2`` and ``1-alpha/2`` percentiles of the metric over the
    resamples on which it is defined.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        True labels, 0 or 1.
    y_score : array-like of shape (n,)
        Predicted probability of the positive class, in ``[0, 1]``.
    threshold : float
        Decision threshold in ``[0, 1]``.
    n_boot : int
        Bootstrap resamples; 0 gives values without intervals.
    seed : int or None
        Seed of the bootstrap; None draws one from the OS (recorded in the report).
    alpha : float
        ``1 - alpha`` is the coverage of the intervals.

    Returns
    -------
    ClassificationReport
        A frozen dataclass; ``.to_dict()`` is JSON-serialisable. A metric whose
        denominator is zero (e.g. PPV without positive predictions) has ``value=None``
        and a ``reason``; no NaN is ever returned.

    Raises
    ------
    ValueError, TypeError
        For inputs of different lengths, labels other than 0/1, non-finite scores or
        scores outside ``[0, 1]``, and invalid options.
    """
    labels, scores = _validate(y_true, y_score, threshold, n_boot, alpha)
    seed = resolve_seed(seed)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    tn = int(np.sum(~predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    n_pos, n_neg = tp + fn, tn + fp
    points = {name: float(v) for name, v in _from_counts(tp, fp, tn, fn).items()}
    points["roc_auc"] = float(roc_auc_score(labels, scores)) if n_pos and n_neg else math.nan
    boot = _bootstrap(labels, scores, predicted, n_boot, seed) if n_boot else {}

    metrics: dict[str, MetricCI] = {}
    for name in METRICS:
        value = points[name]
        if math.isnan(value):
            metrics[name] = MetricCI(None, None, None, _UNDEFINED[name])
            continue
        if not n_boot:
            metrics[name] = MetricCI(value, None, None, "no interval: n_boot=0")
            continue
        samples = boot[name]
        defined = samples[~np.isnan(samples)]
        if defined.size == 0:
            metrics[name] = MetricCI(
                value, None, None, f"undefined on every resample: {_UNDEFINED[name]}"
            )
            continue
        low, high = np.percentile(defined, [50 * alpha, 100 - 50 * alpha])
        reason = None
        if defined.size < n_boot:
            reason = f"interval from the {defined.size} of {n_boot} resamples where it is defined"
        metrics[name] = MetricCI(value, float(low), float(high), reason)

    return ClassificationReport(
        n=int(labels.size),
        n_positive=n_pos,
        n_negative=n_neg,
        prevalence=n_pos / labels.size,
        threshold=float(threshold),
        confusion=((tn, fp), (fn, tp)),
        n_boot=n_boot,
        alpha=float(alpha),
        seed=seed,
        **metrics,
    )
