"""Statistics and verdicts of the trust protocol (Arun et al. 2021, "Statistical analysis").

Arun et al. 2021 compare each saliency method's per-image scores with a low
baseline by a linear mixed-effects model (R lme4/lmerTest): method as the fixed effect,
image as a random intercept, two-sided, alpha .05, with Tukey HSD post hoc. Every function
here takes a tidy DataFrame with one row per image x method (columns ``image``, ``method``,
``value``) and returns plain Python values, never NaN: a statistic that cannot be computed
is None and the ``note`` says why.

Model: ``value_ij = beta_0 + beta_method(j) + u_i + e_ij``, ``u_i ~ N(0, tau^2)``,
``e_ij ~ N(0, sigma^2)``, fitted by REML with statsmodels' ``MixedLM``; the p-value of a
method is the Wald test of its coefficient.

Differences from the paper's R analysis, each forced by what statsmodels offers:

- ``MixedLM`` reports Wald z p-values; lmerTest uses t with Satterthwaite degrees of freedom.
  Here the Wald statistic is referred to t(images - 1) instead: for 2 balanced levels it
  equals the paired t statistic, so the p-value is exactly the paired t-test's, and with a
  dozen images the normal reference would be wildly anti-conservative (z = 29: 1e-173
  against 1e-11).
- ``pairwise_tukeyhsd`` is the one-way Tukey HSD over all rows; it ignores the pairing by
  image that multcomp's ``glht`` on the mixed model uses, so it is more conservative.

>>> import pandas as pd
>>> df = pd.DataFrame({"image": ["a", "b", "c", "a", "b", "c"],
...                    "method": ["AVG"] * 3 + ["gradient"] * 3,
...                    "value": [0.2, 0.3, 0.25, 0.8, 0.9, 0.85]})
>>> compare_to_level(df, "AVG")["gradient"].verdict
'pass'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.regression.mixed_linear_model import MixedLM
from statsmodels.stats.multicomp import pairwise_tukeyhsd
from statsmodels.tools.sm_exceptions import ConvergenceWarning, SingularMatrixWarning

__all__ = [
    "Comparison",
    "compare_to_constant",
    "compare_to_level",
    "compare_to_sample",
    "summarize",
    "tukey_hsd",
    "verdict",
]

Verdict = Literal["pass", "fail", "uncertain"]
TestName = Literal["mixedlm", "paired_t", "one_sample_t", "welch_t", "degenerate"]

_COLUMNS = ("image", "method", "value")

# lme4's isSingular(): a fit is singular when the relative standard deviation of the random
# intercept, theta = tau / sigma, is below 1e-4.
_SINGULAR_THETA = 1e-4

# statsmodels warns "on the boundary" whenever tau^2 < 0.01 in the units of the data. Scores
# in [0, 1] (AUPRC, SSIM) have tau^2 below that almost always, so the warning says nothing;
# the scale-free lme4 criterion above judges singularity instead.
_BOUNDARY_MESSAGE = "The MLE may be on the boundary of the parameter space."
# An optimizer handing over to the next one is not a failure; the last one's failure shows in
# ``result.converged``.
_RETRY_PREFIX = "Retrying MixedLM optimization"


@dataclass(frozen=True)
class Comparison:
    """One method's scores compared with a baseline, and the verdict.

    Attributes
    ----------
    method : str
        The method compared.
    mean, sd, n : float or None, float or None, int
        Summary of the method's values (sd with ddof=1, None when n < 2).
    baseline_mean, baseline_sd : float or None
        Summary of the baseline (the constant itself and None for a fixed baseline).
    p_value : float or None
        Two-sided p-value; None when it cannot be computed (see ``note``).
    verdict : {"pass", "fail", "uncertain"}
        See :func:`verdict`.
    test : {"mixedlm", "paired_t", "one_sample_t", "welch_t", "degenerate"}
        The test that gave ``p_value``.
    effect : float or None
        The estimated difference method - baseline that the test assessed: the mixed-model
        coefficient, or the mean (paired) difference for the t-tests.
    note : str or None
        Why a fallback was used, warnings raised during the fit, or why a value is None.
    """

    method: str
    mean: float | None
    sd: float | None
    n: int
    baseline_mean: float | None
    baseline_sd: float | None
    p_value: float | None
    verdict: Verdict
    test: TestName
    effect: float | None
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-safe values: Python floats and ints, None instead of NaN or inf."""
        return {key: _json_safe(value) for key, value in asdict(self).items()}


def verdict(
    diff: float | None,
    p_value: float | None,
    *,
    alpha: float = 0.05,
    higher_is_better: bool = True,
) -> Verdict:
    """Verdict of Arun et al.'s (2021) footnotes: passed, did not pass, or uncertain.

    ``"pass"`` when ``p_value < alpha`` and the difference (method - baseline) points the
    good way, ``"fail"`` when it is significant the other way, ``"uncertain"`` otherwise
    (not significant, zero difference, or a p-value or difference that is None or NaN).

    Parameters
    ----------
    diff : float or None
        Estimated difference method - baseline.
    p_value : float or None
        Two-sided p-value of that difference.
    alpha : float
        Significance level, in (0, 1).
    higher_is_better : bool
        True for utility and SSIM vs 0.5; False for the randomization baseline, where a map
        that degraded (lower SSIM) passes.
    """
    _check_alpha(alpha)
    if diff is None or p_value is None:
        return "uncertain"
    diff, p_value = float(diff), float(p_value)
    if math.isnan(diff) or math.isnan(p_value):
        return "uncertain"
    if not 0.0 <= p_value <= 1.0:
        raise ValueError(f"p_value must lie in [0, 1], got {p_value}")
    if p_value >= alpha or diff == 0.0:
        return "uncertain"
    return "pass" if (diff > 0.0) == higher_is_better else "fail"


def summarize(values: Any) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (ddof=1) and count of finite values.

    ``mean`` is None for no values and ``sd`` is None for fewer than 2.

    >>> summarize([1.0, 2.0, 3.0])
    {'mean': 2.0, 'sd': 1.0, 'n': 3}
    """
    array = _as_finite_1d(values, "values")
    n = int(array.size)
    mean = float(array.mean()) if n else None
    sd = float(array.std(ddof=1)) if n >= 2 else None
    return {"mean": mean, "sd": sd, "n": n}


def compare_to_level(
    df: pd.DataFrame,
    reference: str,
    *,
    alpha: float = 0.05,
    higher_is_better: bool = True,
) -> dict[str, Comparison]:
    """Compare every method with a reference level measured on the same images.

    One mixed model ``value ~ C(method, Treatment(reference)) + (1 | image)`` is fitted over
    all levels (REML); each method's p-value is the two-sided Wald test of its coefficient.
    Missing image x method cells are allowed (the model takes unbalanced data). The model
    is replaced by a paired t-test on the images both levels have (``test="paired_t"``, with
    a note) when there are fewer than 3 images, the fit raises, does not converge, is
    singular (random-intercept sd below 1e-4 of the residual sd, lme4's criterion), or gives
    no finite p-value for the method.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns ``image``, ``method``, ``value``; one row per image x method, finite values.
    reference : str
        The level of ``method`` to compare with (the AVG mask, the localizer).
    alpha, higher_is_better
        See :func:`verdict`.

    Returns
    -------
    dict of str to Comparison
        One entry per level other than ``reference``, in order of first appearance.
    """
    _check_alpha(alpha)
    data = _tidy(df)
    reference = str(reference)
    levels = list(pd.unique(data["method"]))
    if reference not in levels:
        raise ValueError(f"reference level {reference!r} is not in df['method'] ({levels})")
    methods = [m for m in levels if m != reference]
    if not methods:
        return {}

    with _quiet():
        fit: dict[str, tuple[float, float]] | None = None
        if data["image"].nunique() < 3:
            fit_note = "fewer than 3 images, no mixed model"
        else:
            design = np.column_stack(
                [np.ones(len(data))] + [(data["method"] == m).to_numpy(float) for m in methods]
            )
            fit, fit_note = _fit_mixed(data, design, [None, *methods])

        wide = data.pivot(index="image", columns="method", values="value")
        # NaN in the pivot marks an image without a value for that level
        base = wide[reference].dropna().to_numpy()
        base_summary = summarize(base)
        out = {}
        for method in methods:
            paired = wide[[method, reference]].dropna()
            diffs = (paired[method] - paired[reference]).to_numpy()
            out[method] = _decide(
                method,
                values=wide[method].dropna().to_numpy(),
                base_summary=base_summary,
                diffs=diffs,
                fit=fit,
                fit_note=fit_note,
                fallback=(
                    "paired_t",
                    lambda p=paired, m=method: stats.ttest_rel(p[m], p[reference]).pvalue,
                ),
                alpha=alpha,
                higher_is_better=higher_is_better,
            )
    return out


def compare_to_constant(
    df: pd.DataFrame,
    constant: float,
    *,
    alpha: float = 0.05,
    higher_is_better: bool = True,
) -> dict[str, Comparison]:
    """Compare every method's mean with a fixed number (Arun et al.'s (2021) low SSIM baseline 0.5).

    Fits ``value - constant ~ 0 + C(method) + (1 | image)`` (REML); each method's p-value is
    the Wald test that its coefficient is 0. When each image has a single value (one method)
    the random intercept cannot be told apart from the residual, so a one-sample t-test is
    used; it is also the fallback under the conditions of :func:`compare_to_level`.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns ``image``, ``method``, ``value``; one row per image x method.
    constant : float
        The fixed baseline.
    alpha, higher_is_better
        See :func:`verdict`.
    """
    _check_alpha(alpha)
    constant = float(constant)
    if not math.isfinite(constant):
        raise ValueError(f"constant must be finite, got {constant}")
    data = _tidy(df)
    methods = list(pd.unique(data["method"]))
    if not methods:
        return {}

    with _quiet():
        fit: dict[str, tuple[float, float]] | None = None
        if not data["image"].duplicated().any():
            fit_note = "one value per image, the image random intercept is not identifiable"
        elif data["image"].nunique() < 3:
            fit_note = "fewer than 3 images, no mixed model"
        else:
            shifted = data.assign(value=data["value"] - constant)
            design = np.column_stack([(data["method"] == m).to_numpy(float) for m in methods])
            fit, fit_note = _fit_mixed(shifted, design, methods)

        base_summary = {"mean": constant, "sd": None}
        out = {}
        for method in methods:
            values = data.loc[data["method"] == method, "value"].to_numpy()
            out[method] = _decide(
                method,
                values=values,
                base_summary=base_summary,
                diffs=values - constant,
                fit=fit,
                fit_note=fit_note,
                fallback=("one_sample_t", lambda v=values: stats.ttest_1samp(v, constant).pvalue),
                alpha=alpha,
                higher_is_better=higher_is_better,
            )
    return out


def compare_to_sample(
    df: pd.DataFrame,
    baseline: Mapping[str, Any],
    *,
    alpha: float = 0.05,
    higher_is_better: bool = False,
) -> dict[str, Comparison]:
    """Compare every method with its own independent baseline sample by Welch's t-test.

    Arun et al.'s (2021) randomization baseline is the SSIM of 50 random pairs of different images,
    so its values belong to image pairs, not to the images the method was scored on: there
    is no shared image to carry a random intercept and the two samples are independent with
    unequal variances, the case of Welch's unequal-variance t-test.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns ``image``, ``method``, ``value`` (e.g. SSIM at full randomization).
    baseline : mapping of str to 1D array-like
        Baseline values per method; every method of ``df`` needs one.
    alpha : float
        See :func:`verdict`.
    higher_is_better : bool
        False by default: a map that degraded below the baseline passes.
    """
    _check_alpha(alpha)
    data = _tidy(df)
    methods = list(pd.unique(data["method"]))
    baseline = {str(key): value for key, value in baseline.items()}
    missing = [m for m in methods if m not in baseline]
    if missing:
        raise ValueError(f"no baseline sample for method(s) {missing}")

    out = {}
    for method in methods:
        values = data.loc[data["method"] == method, "value"].to_numpy()
        sample = _as_finite_1d(baseline[method], f"baseline[{method!r}]")
        effect = float(values.mean() - sample.mean()) if values.size and sample.size else None
        note = None
        if min(values.size, sample.size) < 2:
            p_value, test = None, "degenerate"
            note = f"{values.size} value(s) and {sample.size} baseline value(s), need 2 each"
        elif _is_constant(values) and _is_constant(sample):
            p_value = 1.0 if values[0] == sample[0] else 0.0
            test, note = "degenerate", "zero variance"
            effect = float(values[0] - sample[0])
        else:
            test = "welch_t"
            with _quiet():
                p_value = float(stats.ttest_ind(values, sample, equal_var=False).pvalue)
            if not math.isfinite(p_value):
                note = "the test gave no finite p-value"
        out[method] = _comparison(
            method,
            values,
            summarize(sample),
            p_value=p_value,
            test=test,
            effect=effect,
            note=note,
            alpha=alpha,
            higher_is_better=higher_is_better,
        )
    return out


def tukey_hsd(df: pd.DataFrame, *, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Tukey HSD post hoc test over all levels of ``method`` (baselines included if present).

    Parameters
    ----------
    df : pandas.DataFrame
        Columns ``image``, ``method``, ``value``.
    alpha : float
        Family-wise error rate.

    Returns
    -------
    list of dict
        One row per pair, ``{"group1", "group2", "meandiff", "p_adj", "lower", "upper",
        "reject"}`` with ``meandiff = mean(group2) - mean(group1)`` and its simultaneous
        confidence interval, as in statsmodels' summary table. Values that cannot be
        computed (zero variance, one value per group) are None, with ``reject`` False. Empty
        for fewer than 2 levels.
    """
    _check_alpha(alpha)
    data = _tidy(df)
    if data["method"].nunique() < 2:
        return []
    with _quiet():
        result = pairwise_tukeyhsd(
            data["value"].to_numpy(), data["method"].to_numpy(dtype=object), alpha=alpha
        )
        frame = result.summary_frame()
    rows = []
    for record in frame.to_dict("records"):
        p_adj = _json_safe(record["p-adj"])
        rows.append(
            {
                "group1": str(record["group_c"]),
                "group2": str(record["group_t"]),
                "meandiff": _json_safe(record["meandiff"]),
                "p_adj": p_adj,
                "lower": _json_safe(record["lower"]),
                "upper": _json_safe(record["upper"]),
                "reject": bool(record["reject"]) and p_adj is not None,
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# internals


def _decide(
    method: str,
    *,
    values: np.ndarray,
    base_summary: Mapping[str, Any],
    diffs: np.ndarray,
    fit: Mapping[str, tuple[float, float]] | None,
    fit_note: str | None,
    fallback: tuple[TestName, Callable[[], float]],
    alpha: float,
    higher_is_better: bool,
) -> Comparison:
    """Pick the test for one method: too few values, degenerate, mixed model, or fallback.

    ``diffs`` are the paired differences (or values - constant) that the fallback t-test
    rests on; their mean is the effect unless the mixed model gives a coefficient.
    """

    def build(p_value: float | None, test: TestName, effect: float | None, note: str | None):
        return _comparison(
            method,
            values,
            base_summary,
            p_value=p_value,
            test=test,
            effect=effect,
            note=note,
            alpha=alpha,
            higher_is_better=higher_is_better,
        )

    mean_diff = float(diffs.mean()) if diffs.size else None
    if diffs.size < 2:
        return build(None, "degenerate", mean_diff, f"{diffs.size} paired value(s), need 2")
    if _is_constant(diffs):
        p_value = 1.0 if diffs[0] == 0.0 else 0.0
        return build(p_value, "degenerate", float(diffs[0]), "zero variance")
    if fit is not None and method in fit:
        coef, p_value = fit[method]
        return build(p_value, "mixedlm", coef, fit_note)

    test, run_test = fallback
    p_value = float(run_test())
    notes = [_FALLBACK_LABEL[test], fit_note]
    if not math.isfinite(p_value):
        notes.append("the test gave no finite p-value")
    return build(p_value, test, mean_diff, "; ".join(n for n in notes if n))


_FALLBACK_LABEL = {
    "paired_t": "paired t-test on the images both levels have",
    "one_sample_t": "one-sample t-test",
}


def _comparison(
    method: str,
    values: np.ndarray,
    base_summary: Mapping[str, Any],
    *,
    p_value: float | None,
    test: TestName,
    effect: float | None,
    note: str | None,
    alpha: float,
    higher_is_better: bool,
) -> Comparison:
    summary = summarize(values)
    p_value = _json_safe(p_value)
    effect = _json_safe(effect)
    return Comparison(
        method=method,
        mean=summary["mean"],
        sd=summary["sd"],
        n=summary["n"],
        baseline_mean=_json_safe(base_summary["mean"]),
        baseline_sd=_json_safe(base_summary["sd"]),
        p_value=p_value,
        verdict=verdict(effect, p_value, alpha=alpha, higher_is_better=higher_is_better),
        test=test,
        effect=effect,
        note=note,
    )


def _fit_mixed(
    data: pd.DataFrame, design: np.ndarray, names: list[str | None]
) -> tuple[dict[str, tuple[float, float]] | None, str | None]:
    """REML fit with an image random intercept; ``{name: (coef, p)}`` or None and why.

    ``names`` labels the columns of ``design``; None marks a column that is not reported
    (the intercept). Coefficients with a non-finite p-value are left out.
    """
    groups = pd.factorize(data["image"])[0]
    model = MixedLM(
        data["value"].to_numpy(), design, groups=groups, exog_re=np.ones((len(data), 1))
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = model.fit(reml=True)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError) as err:
            return None, f"mixed model failed ({type(err).__name__}: {err})"

    # A fit is refused for non-convergence, a non-positive-definite Hessian, a singular
    # random-effects covariance, or lme4's singularity criterion; other warnings are kept
    # for the note.
    refused, kept = [], []
    for caught_warning in caught:
        message = str(caught_warning.message)
        if message == _BOUNDARY_MESSAGE or message.startswith(_RETRY_PREFIX):
            continue
        if issubclass(caught_warning.category, ConvergenceWarning | SingularMatrixWarning):
            refused.append(message)
        else:
            kept.append(message)
    if not result.converged:
        refused.insert(0, "the optimizer did not converge")
    theta = math.sqrt(max(float(np.asarray(result.cov_re_unscaled).ravel()[0]), 0.0))
    if theta < _SINGULAR_THETA:
        refused.append(f"singular fit: image random-intercept sd / residual sd = {theta:.1e}")
    if refused:
        return None, "mixed model not used: " + " | ".join(dict.fromkeys(refused + kept))

    params = np.asarray(result.fe_params, dtype=float)
    # statsmodels reports Wald z p-values, which are far too small with a dozen images
    # (z = 29 gives 1e-173). Referring the same statistic to a t distribution with
    # (images - 1) degrees of freedom makes a balanced two-level comparison exactly the
    # paired t-test, and is close to lmerTest's Satterthwaite t for this design.
    wald = np.asarray(result.tvalues, dtype=float)[: len(params)]
    df = max(int(groups.max()) if len(groups) else 0, 1)  # number of images - 1
    pvalues = 2.0 * stats.t.sf(np.abs(wald), df)
    fit = {
        name: (float(coef), float(p))
        for name, coef, p in zip(names, params, pvalues, strict=True)
        if name is not None and math.isfinite(coef) and math.isfinite(p)
    }
    note = "mixed model warnings: " + " | ".join(dict.fromkeys(kept)) if kept else None
    return fit, note


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Validated copy with the three columns, ``method`` as str and ``value`` as float."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in _COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks column(s) {missing}; it has {list(df.columns)}")
    data = df.loc[:, list(_COLUMNS)].copy()
    data["method"] = data["method"].astype(str)
    try:
        data["value"] = pd.to_numeric(data["value"]).astype(float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"df['value'] must be numeric: {err}") from None
    bad = ~np.isfinite(data["value"].to_numpy())
    if bad.any():
        first = data.loc[bad].iloc[0]
        raise ValueError(
            f"df['value'] has {int(bad.sum())} NaN/inf value(s), e.g. method "
            f"{first['method']!r}, image {first['image']!r}; drop or fix them first"
        )
    duplicated = data.duplicated(subset=["image", "method"])
    if duplicated.any():
        first = data.loc[duplicated].iloc[0]
        raise ValueError(
            f"df has {int(duplicated.sum())} repeated image x method row(s), e.g. method "
            f"{first['method']!r}, image {first['image']!r}; filter one criterion, metric "
            "and stage first"
        )
    return data.reset_index(drop=True)


def _as_finite_1d(values: Any, name: str) -> np.ndarray:
    """Float64 1D copy of array-like or tensor ``values``; NaN or inf raise."""
    if hasattr(values, "detach"):  # a torch tensor, recognised without importing torch
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    return array


def _is_constant(array: np.ndarray) -> bool:
    return bool(np.all(array == array[0]))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _json_safe(value: Any) -> Any:
    """Python scalars for numpy ones; None for NaN and inf."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep scipy's and statsmodels' warnings from the caller; what matters goes in notes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
