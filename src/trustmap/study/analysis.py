"""The analysis of a reader study, as in Katzmann et al. 2021 (Neurocomputing), section 3.4.

Rating design
-------------
* De-randomization: every answer is mapped back to its case, method and criterion (the
  blinding key); its panel position (``slot``) and question position (``seq``) are kept
  for the order-effect checks.
* Raw scores and *z-adjusted* scores, z-normalised "over all answers for the same lesion
  and criterion" (all readers and methods): ``z = (x - mean) / sd`` (sample sd; a case
  whose answers are all equal gets z = 0). Note: the paper's Table 3 equals its Table 2
  minus a per-criterion constant, i.e. its adjustment only centred the scores; ours is
  the z-score the text describes.
* Ranks per question: within one reader's question (one case, one criterion) the methods
  are ranked by their rating, 1 = best, ties sharing the mean rank.
* Means with 95% CIs: percentile bootstrap resampling readers and cases independently
  (the paper does not say how its intervals were made).
* t-tests as in the paper: per reader, the mean over cases; the best method of each
  criterion against every other one, paired over readers, the statistic referred to
  ``t(N - 2)`` (two-tailed), as the paper reports ``t(6)`` for N = 8 readers; the
  standard paired p-value (``t(N - 1)``, scipy's ``ttest_rel``) is reported as well.
* A linear mixed model per criterion, ``rating ~ method`` with crossed random intercepts
  for reader and case, as the better-founded alternative (Wald statistics referred to
  ``t(N - 1)``; Wald z is anti-conservative with a handful of readers).
* Inter-observer reliability, equation 7: the mean pairwise Pearson correlation of the
  readers' questionnaires per criterion; and ICC(2,1) (two-way random effects, absolute
  agreement, single rater; Shrout and Fleiss 1979) with the 95% CI of McGraw and Wong
  1996 (targets: case x method panels; raters: readers).
* Inter-criteria Pearson correlations over all answers (a panel's ratings on the
  criteria), their dendrogram (average linkage on 1 - r), the Kaiser-Meyer-Olkin measure
  and a PCA on the standardized criteria: the general factor Phi, its explained variance
  and its L1-normalized eigenvector.
* The A-vs-B variant check (per method and criterion, readers of variant A against those
  of B, two-sample t-test, ``t(N - 2)``), and two order-effect tests the variants cannot
  see: panel position within a question and drift along the sequence (one OLS of the
  z-adjusted score with reader and method x criterion effects). Holm's correction over
  all of them gives the verdict "no order effect" or the effects found.

Reader-performance design (Sayres et al. 2019, after Huff et al. 2021, section 6)
---------------------------------------------------------------------------------
Per arm (image alone, + prediction, + prediction + map): accuracy, confidence and reading
time with bootstrap CIs; paired t-tests over readers against the image-alone arm; a
logistic GEE (readers as clusters) for accuracy and mixed models for confidence and log
reading time; accuracy split by whether the model was right.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from trustmap.trust.stats import _json_safe, _quiet

__all__ = [
    "ICCResult",
    "KMOResult",
    "PCAResult",
    "RatingAnalysis",
    "ReaderPerformanceAnalysis",
    "analyze_ratings",
    "analyze_reader_performance",
    "bootstrap_means",
    "icc2_1",
    "kmo",
    "order_effects",
    "pairwise_reliability",
    "pca_general_factor",
    "rank_scores",
    "ratings_frame",
    "stars",
    "z_adjust",
]


# ---------------------------------------------------------------------------------------
# inputs


def ratings_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The de-randomized rating answers (``Study.export`` rows, field ``rating``) as a
    frame with ``reader, variant, case, label, label_name, criterion, method, slot, seq,
    position, value``; ``position`` is ``seq / (questions - 1)`` in [0, 1]."""
    df = pd.DataFrame([r for r in rows if r.get("field", "rating") == "rating"])
    if df.empty:
        raise ValueError("the study has no rating answers yet")
    needed = ["reader", "case", "criterion", "method", "slot", "seq", "value"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"the answers lack column(s) {missing}")
    if df["method"].isna().any():
        raise ValueError("some answers have no method: the blinding key does not cover them")
    if "n_questions" not in df.columns:
        df["n_questions"] = df.groupby("reader")["seq"].transform("max") + 1
    for col, default in (("variant", ""), ("label", 0), ("label_name", None)):
        if col not in df.columns:
            df[col] = default
    df["label_name"] = df["label_name"].fillna(df["label"].astype(str))
    df["position"] = df["seq"] / np.maximum(df["n_questions"] - 1, 1)
    df["value"] = df["value"].astype(float)
    dup = df.duplicated(["reader", "case", "criterion", "method"])
    if dup.any():
        raise ValueError(f"{int(dup.sum())} answers repeat a reader x case x criterion x method")
    cols = ["reader", "variant", "case", "label", "label_name", "criterion", "method"]
    return df[[*cols, "slot", "seq", "position", "value"]].reset_index(drop=True)


def z_adjust(df: pd.DataFrame) -> pd.Series:
    """z-normalised scores over all answers for the same case and criterion."""
    grouped = df.groupby(["case", "criterion"])["value"]
    mean = grouped.transform("mean")
    sd = grouped.transform(lambda v: v.std(ddof=1) if len(v) > 1 else 0.0)
    z = (df["value"] - mean) / sd.where(sd > 0)
    return z.fillna(0.0).rename("z")


def rank_scores(df: pd.DataFrame) -> pd.Series:
    """Rank of each answer among the methods of its question (1 = best, ties averaged)."""
    ranks = df.groupby(["reader", "case", "criterion"])["value"].rank(
        ascending=False, method="average"
    )
    return ranks.rename("rank")


def stars(p: float | None) -> str:
    """``*`` p < .05, ``**`` p < .01, ``***`` p < .001 (the paper's Tables 2-4)."""
    if p is None or not math.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


# ---------------------------------------------------------------------------------------
# means with CIs and the paper's t-tests


def bootstrap_means(
    cube: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means and percentile bootstrap CIs of ``cube[reader, case, k]`` per ``k``.

    Readers and cases are resampled independently (a two-way bootstrap), the same
    resamples for every ``k`` so that CIs of different methods are comparable. NaN marks
    a missing answer. Returns ``(mean, low, high)``, each of shape ``(K,)``.
    """
    n_r, n_c, _ = cube.shape
    rng = np.random.default_rng(seed)
    wr = rng.multinomial(n_r, np.full(n_r, 1 / n_r), size=n_boot).astype(float)
    wc = rng.multinomial(n_c, np.full(n_c, 1 / n_c), size=n_boot).astype(float)
    present = np.isfinite(cube).astype(float)
    filled = np.where(np.isfinite(cube), cube, 0.0)
    num = np.einsum("br,rck,bc->bk", wr, filled, wc)
    den = np.einsum("br,rck,bc->bk", wr, present, wc)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num / den
    mean = filled.sum((0, 1)) / np.maximum(present.sum((0, 1)), 1)
    tail = (1 - level) / 2 * 100
    low = np.nanpercentile(boot, tail, axis=0)
    high = np.nanpercentile(boot, 100 - tail, axis=0)
    return mean, low, high


def _paired(best: np.ndarray, other: np.ndarray) -> dict[str, float | None]:
    """The paper's test: paired statistic over readers, p from t(N - 2); also t(N - 1)."""
    ok = np.isfinite(best) & np.isfinite(other)
    a, b = best[ok], other[ok]
    n = len(a)
    out: dict[str, float | None] = {"n": n, "df": n - 2, "t": None, "p": None, "p_paired": None}
    if n < 3:
        return out
    d = a - b
    if np.all(d == d[0]):
        # No spread: the statistic is infinite (or undefined when there is no difference).
        t = math.copysign(math.inf, d[0]) if d[0] != 0 else 0.0
        out.update(t=t, p=0.0 if d[0] != 0 else 1.0, p_paired=0.0 if d[0] != 0 else 1.0)
        return out
    res = stats.ttest_rel(a, b)
    t = float(res.statistic)
    out.update(t=t, p=float(2 * stats.t.sf(abs(t), n - 2)), p_paired=float(res.pvalue))
    return out


@dataclass(frozen=True)
class ScoreTable:
    """One of the paper's Tables 2-4: rows methods, columns criteria.

    ``cells[criterion][method]`` holds ``mean``, ``low``, ``high``, and for every method
    but the criterion's best one the test against the best: ``t``, ``df``, ``p`` (the
    paper's ``t(N - 2)``), ``p_paired`` (``t(N - 1)``) and ``stars``.
    """

    name: str
    higher_is_better: bool
    methods: list[str]
    criteria: list[str]
    best: dict[str, str]
    cells: dict[str, dict[str, dict[str, Any]]]


def score_table(
    df: pd.DataFrame,
    column: str,
    *,
    name: str,
    higher_is_better: bool,
    methods: Sequence[str],
    criteria: Sequence[str],
    n_boot: int,
    seed: int,
) -> ScoreTable:
    """Means, bootstrap CIs and the paper's t-tests of ``df[column]``."""
    readers = sorted(df["reader"].unique())
    cases = sorted(df["case"].unique())
    best: dict[str, str] = {}
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for ci, crit in enumerate(criteria):
        sub = df[df["criterion"] == crit]
        cube = np.full((len(readers), len(cases), len(methods)), np.nan)
        r_idx = np.searchsorted(readers, sub["reader"].to_numpy())
        c_idx = np.searchsorted(cases, sub["case"].to_numpy())
        m_idx = pd.Index(methods).get_indexer(sub["method"])
        cube[r_idx, c_idx, m_idx] = sub[column].to_numpy(float)
        mean, low, high = bootstrap_means(cube, n_boot=n_boot, seed=seed + ci)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_reader = np.nanmean(cube, axis=1)  # (readers, methods)
        order = np.argsort(-mean if higher_is_better else mean, kind="stable")
        ref = int(order[0])
        best[crit] = methods[ref]
        cells[crit] = {}
        for m, method in enumerate(methods):
            cell: dict[str, Any] = {
                "mean": float(mean[m]),
                "low": float(low[m]),
                "high": float(high[m]),
                "best": m == ref,
            }
            if m != ref:
                first, second = (ref, m) if higher_is_better else (m, ref)
                test = _paired(per_reader[:, first], per_reader[:, second])
                cell.update(test, stars=stars(test["p"]))
            cells[crit][method] = cell
    return ScoreTable(name, higher_is_better, list(methods), list(criteria), best, cells)


# ---------------------------------------------------------------------------------------
# mixed model


def mixed_model(df: pd.DataFrame, criterion: str, reference: str) -> dict[str, Any]:
    """``value ~ method`` with crossed random intercepts for reader and case (REML).

    Returns per method its difference from ``reference`` with a 95% CI and p-value
    (Wald statistic referred to ``t(N_readers - 1)``), and the variance components; or an
    ``error`` entry when the fit fails.
    """
    import statsmodels.formula.api as smf

    sub = df[df["criterion"] == criterion].copy()
    if sub["method"].nunique() < 2 or reference not in set(sub["method"]):
        return {"error": "mixed model not fitted: fewer than two methods have answers"}
    if sub["reader"].nunique() < 2 or sub["case"].nunique() < 2:
        return {"error": "mixed model not fitted: needs answers of two readers on two cases"}
    sub["method"] = pd.Categorical(sub["method"])
    sub["group"] = 1
    n_readers = sub["reader"].nunique()
    formula = f"value ~ C(method, Treatment(reference={reference!r}))"
    vc = {"reader": "0 + C(reader)", "case": "0 + C(case)"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = smf.mixedlm(formula, sub, groups="group", re_formula="0", vc_formula=vc)
            fit = model.fit(reml=True, method=["lbfgs", "powell"])
        except Exception as err:  # patsy, numpy and statsmodels fail in many ways
            return {"error": f"mixed model failed: {type(err).__name__}: {err}"}
    notes = sorted({str(w.message).splitlines()[0] for w in caught})
    df_t = max(n_readers - 1, 1)
    out: dict[str, Any] = {
        "reference": reference,
        "df": df_t,
        "converged": bool(fit.converged),
        "notes": notes,
        "methods": _treatment_effects(fit, n_readers),
    }
    names = list(fit.model.exog_vc.names) if hasattr(fit.model, "exog_vc") else ["reader", "case"]
    out["variance"] = {
        **{n: float(v) for n, v in zip(names, np.atleast_1d(fit.vcomp))},
        "residual": float(fit.scale),
    }
    return out


# ---------------------------------------------------------------------------------------
# reliability


def pairwise_reliability(matrix: np.ndarray) -> dict[str, Any]:
    """Equation 7 of Katzmann et al.: the mean Pearson r over all pairs of readers.

    ``matrix`` is ``(targets, readers)``; a pair is used on the targets both answered; a
    reader whose answers are all equal has no correlation and the pairs with them are
    left out (counted in ``pairs_skipped``).
    """
    k = matrix.shape[1]
    rs = []
    skipped = 0
    for i in range(k - 1):
        for j in range(i + 1, k):
            ok = np.isfinite(matrix[:, i]) & np.isfinite(matrix[:, j])
            a, b = matrix[ok, i], matrix[ok, j]
            if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
                skipped += 1
                continue
            rs.append(float(stats.pearsonr(a, b).statistic))
    return {
        "rho": float(np.mean(rs)) if rs else None,
        "pairs": len(rs),
        "pairs_skipped": skipped,
        "min_r": float(np.min(rs)) if rs else None,
        "max_r": float(np.max(rs)) if rs else None,
    }


@dataclass(frozen=True)
class ICCResult:
    """ICC(2,1) with its CI and the two-way ANOVA mean squares it comes from."""

    icc: float
    low: float | None
    high: float | None
    n_targets: int
    n_raters: int
    ms_targets: float
    ms_raters: float
    ms_error: float


def icc2_1(matrix: np.ndarray, *, level: float = 0.95) -> ICCResult:
    """ICC(2,1) of a complete ``(targets, raters)`` matrix (Shrout and Fleiss 1979):
    ``(MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)``, CI of McGraw and Wong
    1996 (their case 2A, approximate F with Satterthwaite degrees of freedom)."""
    y = np.asarray(matrix, dtype=float)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"ICC needs at least 2 targets x 2 raters, got shape {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("ICC needs a complete matrix (every rater rated every target)")
    n, k = y.shape
    grand = y.mean()
    ss_rows = k * ((y.mean(1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(0) - grand) ** 2).sum()
    ss_err = ((y - grand) ** 2).sum() - ss_rows - ss_cols
    msr, msc = ss_rows / (n - 1), ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    denom = msr + (k - 1) * mse + k * (msc - mse) / n
    if denom <= 0:
        raise ValueError("ICC is undefined: the ratings do not vary")
    icc = (msr - mse) / denom
    low = high = None
    if mse > 0 and icc < 1:
        alpha = 1 - level
        a = k * icc / (n * (1 - icc))
        b = 1 + k * icc * (n - 1) / (n * (1 - icc))
        v = (a * msc + b * mse) ** 2 / (
            (a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / ((n - 1) * (k - 1))
        )
        f_low = stats.f.ppf(1 - alpha / 2, n - 1, v)
        f_high = stats.f.ppf(1 - alpha / 2, v, n - 1)
        c = k * msc + (k * n - k - n) * mse
        low = float(n * (msr - f_low * mse) / (f_low * c + n * msr))
        high = float(n * (f_high * msr - mse) / (c + n * f_high * msr))
    return ICCResult(float(icc), low, high, n, k, float(msr), float(msc), float(mse))


# ---------------------------------------------------------------------------------------
# criteria: correlations, KMO, PCA


@dataclass(frozen=True)
class KMOResult:
    """Kaiser-Meyer-Olkin measure of sampling adequacy, overall and per variable."""

    overall: float
    per_variable: dict[str, float]


def kmo(corr: np.ndarray, names: Sequence[str]) -> KMOResult:
    """KMO from a correlation matrix (Kaiser 1970): ``sum r^2 / (sum r^2 + sum q^2)`` over
    the off-diagonal entries, ``q`` the partial correlations from the inverse matrix."""
    r = np.asarray(corr, dtype=float)
    try:
        inv = np.linalg.inv(r)
    except np.linalg.LinAlgError:
        raise ValueError(
            "KMO is undefined: the criteria's correlation matrix is singular"
        ) from None
    d = np.sqrt(np.diag(inv))
    partial = -inv / np.outer(d, d)
    off = ~np.eye(len(r), dtype=bool)
    r2 = np.where(off, r**2, 0.0)
    q2 = np.where(off, partial**2, 0.0)
    overall = r2.sum() / (r2.sum() + q2.sum())
    per = r2.sum(0) / (r2.sum(0) + q2.sum(0))
    return KMOResult(float(overall), {n: float(v) for n, v in zip(names, per)})


@dataclass(frozen=True)
class PCAResult:
    """The general factor Phi: explained variance, eigenvector (loadings) and per-row
    scores, from a PCA of the standardized criteria."""

    explained: float
    explained_all: list[float]
    eigenvector: dict[str, float]
    l1_eigenvector: dict[str, float]
    scores: np.ndarray = field(repr=False)


def pca_general_factor(values: np.ndarray, names: Sequence[str]) -> PCAResult:
    """First principal component of the standardized ``(answers, criteria)`` matrix,
    signed so that its loadings sum to a positive number (higher Phi: preferred)."""
    from sklearn.decomposition import PCA

    x = np.asarray(values, dtype=float)
    sd = x.std(0, ddof=1)
    if np.any(sd == 0):
        raise ValueError("PCA is undefined: a criterion's ratings do not vary")
    z = (x - x.mean(0)) / sd
    pca = PCA(n_components=x.shape[1]).fit(z)
    vec = pca.components_[0]
    sign = 1.0 if vec.sum() >= 0 else -1.0
    vec = vec * sign
    return PCAResult(
        float(pca.explained_variance_ratio_[0]),
        [float(v) for v in pca.explained_variance_ratio_],
        {n: float(v) for n, v in zip(names, vec)},
        {n: float(v) for n, v in zip(names, vec / np.abs(vec).sum())},
        z @ vec,
    )


# ---------------------------------------------------------------------------------------
# order effects


def variant_check(df: pd.DataFrame, methods: Sequence[str], criteria: Sequence[str]) -> dict:
    """Katzmann et al.'s A-vs-B check: per method and criterion, the per-reader means of
    variant A against those of variant B (two-sample t-test, ``t(N - 2)``)."""
    means = df.groupby(["variant", "reader", "method", "criterion"])["value"].mean()
    variants = sorted(v for v in df["variant"].unique() if v)
    tests = []
    if variants != ["A", "B"]:
        return {"tests": [], "note": "needs readers of both variants A and B"}
    for crit in criteria:
        for method in methods:
            a = means.xs(("A", method, crit), level=("variant", "method", "criterion"))
            b = means.xs(("B", method, crit), level=("variant", "method", "criterion"))
            if len(a) < 2 or len(b) < 2:
                continue
            if np.all(a.to_numpy() == a.iloc[0]) and np.all(b.to_numpy() == b.iloc[0]):
                t, p = 0.0 if a.iloc[0] == b.iloc[0] else math.inf, None
            else:
                res = stats.ttest_ind(a, b)
                t, p = float(res.statistic), float(res.pvalue)
            tests.append(
                {
                    "method": method,
                    "criterion": crit,
                    "mean_a": float(a.mean()),
                    "mean_b": float(b.mean()),
                    "t": _json_safe(t),
                    "df": len(a) + len(b) - 2,
                    "p": p,
                }
            )
    ps = [t["p"] for t in tests if t["p"] is not None]
    ts = [abs(t["t"]) for t in tests if t["t"] is not None]
    summary = {
        "p_min": min(ps) if ps else None,
        "p_max": max(ps) if ps else None,
        "p_mean": float(np.mean(ps)) if ps else None,
        "abs_t_min": min(ts) if ts else None,
        "abs_t_max": max(ts) if ts else None,
    }
    return {"tests": tests, **summary}


def order_effects(df: pd.DataFrame, *, alpha: float = 0.05) -> dict[str, Any]:
    """Panel-position and sequence-drift effects, and the overall order-effect verdict.

    One OLS of the z-adjusted score: ``z ~ method x criterion + reader + C(slot) +
    position`` (``position`` 0 at a reader's first question, 1 at the last). The slot
    effect is the F-test of ``C(slot)``, the drift the t-test of ``position`` (its
    coefficient is the change from the first to the last question, in z units). With the
    A-vs-B tests (:func:`variant_check`), all p-values are Holm-corrected; the verdict is
    ``"no order effect"`` when none is significant at ``alpha``.
    """
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm
    from statsmodels.stats.multitest import multipletests

    data = df.assign(z=z_adjust(df))
    terms = ["C(method):C(criterion)", "C(reader)"]
    tests: list[dict[str, Any]] = []
    if data["slot"].nunique() > 1:
        terms.append("C(slot)")
    if data["position"].nunique() > 1:
        terms.append("position")
    try:
        with _quiet():
            fit = smf.ols("z ~ " + " + ".join(terms), data).fit()
            table = anova_lm(fit, typ=2)
        if not fit.df_resid > 0:
            raise ValueError("no residual degrees of freedom")
    except Exception as err:  # too few answers for the model: say so, decide nothing
        return {
            "verdict": f"order effects not tested: {err}",
            "found": False,
            "alpha": alpha,
            "tests": [],
            "variants": {"tests": []},
        }
    if "C(slot)" in terms:
        df_slot, df_res = int(table.loc["C(slot)", "df"]), int(table.loc["Residual", "df"])
        slot_means = data.groupby("slot")["z"].mean()
        tests.append(
            {
                "test": "panel position (slot)",
                "statistic": f"F({df_slot}, {df_res})",
                "value": float(table.loc["C(slot)", "F"]),
                "p": float(table.loc["C(slot)", "PR(>F)"]),
                "effect": {int(k): float(v) for k, v in slot_means.items()},
            }
        )
    if "position" in terms:
        tests.append(
            {
                "test": "drift along the sequence",
                "statistic": f"t({int(fit.df_resid)})",
                "value": float(fit.tvalues["position"]),
                "p": float(fit.pvalues["position"]),
                "effect": float(fit.params["position"]),
            }
        )
    methods = sorted(data["method"].unique())
    criteria = list(dict.fromkeys(data["criterion"]))
    with _quiet():  # equal per-reader means make scipy warn; the t is still right
        variants = variant_check(data, methods, criteria)
    for t in variants["tests"]:
        if t["p"] is not None:
            tests.append(
                {
                    "test": f"variant A vs B: {t['method']}, {t['criterion']}",
                    "statistic": f"t({t['df']})",
                    "value": t["t"],
                    "p": t["p"],
                    "effect": t["mean_a"] - t["mean_b"],
                }
            )
    if tests:
        reject, adjusted, _, _ = multipletests([t["p"] for t in tests], alpha=alpha, method="holm")
        for t, r, a in zip(tests, reject, adjusted):
            t["p_holm"] = float(a)
            t["significant"] = bool(r)
    found = [t["test"] for t in tests if t.get("significant")]
    verdict = "no order effect" if not found else "order effect found: " + "; ".join(found)
    return {
        "verdict": verdict,
        "found": bool(found),
        "alpha": alpha,
        "tests": tests,
        "variants": variants,
    }


# ---------------------------------------------------------------------------------------
# the whole rating analysis


@dataclass(frozen=True)
class RatingAnalysis:
    """Everything :func:`analyze_ratings` computes; the report only reads it."""

    n_readers: int
    n_cases: int
    methods: list[str]
    criteria: list[str]
    n_answers: int
    n_expected: int
    raw: ScoreTable
    z: ScoreTable
    rank: ScoreTable
    by_class: dict[str, dict[str, dict[str, dict[str, float]]]]
    mixed: dict[str, dict[str, Any]]
    reliability: dict[str, dict[str, Any]]
    icc: dict[str, ICCResult | str]
    criteria_corr: dict[str, dict[str, float]] | None
    linkage: list[list[float]] | None
    kmo: KMOResult | str | None
    pca: PCAResult | str | None
    phi: dict[str, dict[str, float]] | None
    order: dict[str, Any]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and infinities become None)."""
        out = asdict(self)
        if isinstance(self.pca, PCAResult):
            out["pca"].pop("scores", None)
        return _clean(out)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    return _json_safe(value)


def analyze_ratings(
    df: pd.DataFrame,
    *,
    methods: Sequence[str] | None = None,
    criteria: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    mixed: bool = True,
    n_expected: int | None = None,
) -> RatingAnalysis:
    """The rating design's analysis (module docstring) of :func:`ratings_frame` output;
    ``n_expected`` is the number of answers the study asks for (default: every reader and
    case seen, times methods and criteria)."""
    with _quiet():  # degenerate corners (all-NaN slices, equal values) are handled below
        return _analyze_ratings(
            df,
            methods=methods,
            criteria=criteria,
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
            mixed=mixed,
            n_expected=n_expected,
        )


def _analyze_ratings(
    df: pd.DataFrame,
    *,
    methods: Sequence[str] | None,
    criteria: Sequence[str] | None,
    n_boot: int,
    seed: int,
    alpha: float,
    mixed: bool,
    n_expected: int | None,
) -> RatingAnalysis:
    methods = list(methods) if methods is not None else sorted(df["method"].unique())
    criteria = list(criteria) if criteria is not None else list(dict.fromkeys(df["criterion"]))
    unknown = sorted(set(df["method"]) - set(methods))
    if unknown:
        raise ValueError(f"answers name method(s) {unknown} that the study does not list")
    notes: list[str] = []
    data = df.assign(z=z_adjust(df), rank=rank_scores(df))
    n_readers, n_cases = data["reader"].nunique(), data["case"].nunique()
    if n_expected is None:
        n_expected = n_readers * n_cases * len(methods) * len(criteria)
    if len(data) < n_expected:
        notes.append(
            f"{n_expected - len(data)} of {n_expected} answers are missing; means use the "
            "answers given"
        )
    if n_readers < 3:
        notes.append(f"{n_readers} reader(s): the t-tests need at least 3 (t(N - 2))")
    common = {"methods": methods, "criteria": criteria, "n_boot": n_boot, "seed": seed}
    raw = score_table(data, "value", name="raw", higher_is_better=True, **common)
    zt = score_table(data, "z", name="z", higher_is_better=True, **common)
    rk = score_table(data, "rank", name="rank", higher_is_better=False, **common)

    by_class: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for label, sub in data.groupby("label_name"):
        t = score_table(sub, "z", name="z", higher_is_better=True, **common)
        by_class[str(label)] = {
            c: {m: {k: t.cells[c][m][k] for k in ("mean", "low", "high")} for m in methods}
            for c in criteria
        }

    mixed_fits = {c: mixed_model(data, c, zt.best[c]) for c in criteria} if mixed else {}

    reliability, icc = {}, {}
    for crit in criteria:
        sub = data[data["criterion"] == crit]
        matrix = sub.pivot_table(index=["case", "method"], columns="reader", values="value")
        reliability[crit] = pairwise_reliability(matrix.to_numpy())
        complete = matrix.dropna()
        try:
            icc[crit] = icc2_1(complete.to_numpy())
        except ValueError as err:
            icc[crit] = str(err)

    corr = linkage = kmo_res = pca_res = phi = None
    if len(criteria) >= 2:
        wide = data.pivot_table(
            index=["reader", "case", "method"], columns="criterion", values="value"
        )[criteria].dropna()
        with np.errstate(invalid="ignore", divide="ignore"):
            cm = np.corrcoef(wide.to_numpy().T)
        if np.isfinite(cm).all():
            corr = {
                a: {b: float(cm[i, j]) for j, b in enumerate(criteria)}
                for i, a in enumerate(criteria)
            }
            from scipy.cluster.hierarchy import linkage as hlinkage
            from scipy.spatial.distance import squareform

            dist = squareform(np.clip(1 - cm, 0, None), checks=False)
            linkage = hlinkage(dist, method="average").tolist()
            try:
                kmo_res = kmo(cm, criteria)
            except ValueError as err:
                kmo_res = str(err)
            try:
                pca_res = pca_general_factor(wide.to_numpy(), criteria)
                scores = wide.assign(phi=pca_res.scores).reset_index()
                cube_t = score_table(
                    scores.assign(criterion="phi"),
                    "phi",
                    name="phi",
                    higher_is_better=True,
                    methods=methods,
                    criteria=["phi"],
                    n_boot=n_boot,
                    seed=seed,
                )
                phi = cube_t.cells["phi"]
            except ValueError as err:
                pca_res = str(err)
        else:
            notes.append("a criterion's ratings do not vary: no inter-criteria correlations")
    order = order_effects(df, alpha=alpha)
    return RatingAnalysis(
        n_readers=n_readers,
        n_cases=n_cases,
        methods=methods,
        criteria=criteria,
        n_answers=len(data),
        n_expected=n_expected,
        raw=raw,
        z=zt,
        rank=rk,
        by_class=by_class,
        mixed=mixed_fits,
        reliability=reliability,
        icc=icc,
        criteria_corr=corr,
        linkage=linkage,
        kmo=kmo_res,
        pca=pca_res,
        phi=phi,
        order=order,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------
# reader performance


@dataclass(frozen=True)
class ReaderPerformanceAnalysis:
    """Per arm: accuracy, confidence, reading time; tests against the image-alone arm."""

    n_readers: int
    n_cases: int
    arms: list[str]
    readings: int
    table: dict[str, dict[str, Any]]
    tests: dict[str, dict[str, dict[str, Any]]]
    models: dict[str, Any]
    by_model_correct: dict[str, dict[str, float | None]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def readings_frame(rows: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> pd.DataFrame:
    """One row per reading (reader x case): arm, diagnosis, confidence, time, correct."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        raise ValueError("the study has no answers yet")
    df["arm"] = np.where(
        df["method"].notna(),
        "map:" + df["method"].fillna("").astype(str),
        np.where(df["show_prediction"], "prediction", "image"),
    )
    wide = df.pivot_table(
        index=["reader", "case", "arm", "label", "model_prediction"],
        columns="field",
        values="value",
        aggfunc="first",
    ).reset_index()
    times = df.groupby(["reader", "case"])["time_ms"].max().rename("time_ms")
    wide = wide.merge(times, on=["reader", "case"], how="left")
    wide = wide.dropna(subset=[c for c in ("diagnosis", "confidence") if c in wide.columns])
    if "diagnosis" not in wide.columns or "confidence" not in wide.columns:
        raise ValueError("no reading has both a diagnosis and a confidence yet")
    wide["correct"] = (wide["diagnosis"] == wide["label"]).astype(float)
    wide["model_correct"] = wide["model_prediction"] == wide["label"]
    wide["arm"] = pd.Categorical(wide["arm"], categories=list(arms))
    return wide


def analyze_reader_performance(
    df: pd.DataFrame, arms: Sequence[str], *, n_boot: int = 2000, seed: int = 0
) -> ReaderPerformanceAnalysis:
    """The reader-performance analysis of :func:`readings_frame` output."""
    with _quiet():
        return _analyze_reader_performance(df, arms, n_boot=n_boot, seed=seed)


def _analyze_reader_performance(
    df: pd.DataFrame, arms: Sequence[str], *, n_boot: int, seed: int
) -> ReaderPerformanceAnalysis:
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    arms = [a for a in arms if a in set(df["arm"].astype(str))]
    readers = sorted(df["reader"].unique())
    cases = sorted(df["case"].unique())
    notes: list[str] = []
    data = df.assign(arm=df["arm"].astype(str), log_time=np.log(df["time_ms"].clip(lower=1) / 1000))
    table: dict[str, dict[str, Any]] = {}
    per_reader: dict[str, pd.DataFrame] = {}
    for col in ("correct", "confidence", "time_ms"):
        cube = np.full((len(readers), len(cases), len(arms)), np.nan)
        ok = data[col].notna()
        sub = data[ok]
        cube[
            np.searchsorted(readers, sub["reader"]),
            np.searchsorted(cases, sub["case"]),
            pd.Index(arms).get_indexer(sub["arm"]),
        ] = sub[col].to_numpy(float)
        mean, low, high = bootstrap_means(cube, n_boot=n_boot, seed=seed)
        for a, arm in enumerate(arms):
            table.setdefault(arm, {})[col] = {
                "mean": float(mean[a]),
                "low": float(low[a]),
                "high": float(high[a]),
            }
        per_reader[col] = sub.groupby(["reader", "arm"])[col].mean().unstack("arm")
    for arm in arms:
        sel = data["arm"] == arm
        table[arm]["n"] = int(sel.sum())
        table[arm]["median_time_ms"] = _json_safe(float(data.loc[sel, "time_ms"].median()))
    tests: dict[str, dict[str, dict[str, Any]]] = {}
    base = arms[0] if arms else None
    for col in ("correct", "confidence", "time_ms"):
        tests[col] = {}
        pr = per_reader[col]
        for arm in arms[1:]:
            both = pr[[base, arm]].dropna()
            if len(both) < 2:
                continue
            d = both[arm] - both[base]
            if np.all(d == d.iloc[0]):
                tests[col][arm] = {"difference": float(d.mean()), "t": None, "p": None, "n": len(d)}
                continue
            res = stats.ttest_rel(both[arm], both[base])
            tests[col][arm] = {
                "difference": float(d.mean()),
                "t": float(res.statistic),
                "df": len(d) - 1,
                "p": float(res.pvalue),
                "n": len(d),
            }
    models: dict[str, Any] = {}
    formula_arm = f"C(arm, Treatment(reference={base!r}))"
    data["group"] = 1
    vc = {"reader": "0 + C(reader)", "case": "0 + C(case)"}
    for col in ("confidence", "log_time"):
        sub = data.dropna(subset=[col])
        with _quiet():
            try:
                fit = smf.mixedlm(
                    f"{col} ~ {formula_arm}", sub, groups="group", re_formula="0", vc_formula=vc
                ).fit(reml=True, method=["lbfgs", "powell"])
                models[col] = _treatment_effects(fit, len(readers))
            except (np.linalg.LinAlgError, ValueError) as err:
                models[col] = {"error": f"{type(err).__name__}: {err}"}
    with _quiet():
        try:
            gee = smf.gee(
                f"correct ~ {formula_arm}",
                "reader",
                data,
                family=sm.families.Binomial(),
                cov_struct=sm.cov_struct.Exchangeable(),
            ).fit()
            models["accuracy_gee"] = {
                k.split("[T.", 1)[1].rstrip("]"): {
                    "odds_ratio": _json_safe(float(np.exp(v))),
                    "p": _json_safe(float(gee.pvalues[k])),
                }
                for k, v in gee.params.items()
                if "[T." in k
            }
        except (np.linalg.LinAlgError, ValueError, ZeroDivisionError) as err:
            models["accuracy_gee"] = {"error": f"{type(err).__name__}: {err}"}
    by_model: dict[str, dict[str, float | None]] = {}
    for arm in arms:
        sel = data[data["arm"] == arm]
        by_model[arm] = {
            "model_right": _json_safe(float(sel.loc[sel["model_correct"], "correct"].mean()))
            if sel["model_correct"].any()
            else None,
            "model_wrong": _json_safe(float(sel.loc[~sel["model_correct"], "correct"].mean()))
            if (~sel["model_correct"]).any()
            else None,
        }
    if len(readers) < 3:
        notes.append("fewer than 3 readers: the tests say little")
    return ReaderPerformanceAnalysis(
        n_readers=len(readers),
        n_cases=len(cases),
        arms=list(arms),
        readings=len(data),
        table=table,
        tests=tests,
        models=models,
        by_model_correct=by_model,
        notes=notes,
    )


def _treatment_effects(fit: Any, n_readers: int) -> dict[str, dict[str, Any]]:
    """Each treatment-coded level's difference from the reference in a statsmodels fit,
    with its 95% CI and p-value, the Wald statistic referred to ``t(N_readers - 1)``."""
    df_t = max(n_readers - 1, 1)
    q = stats.t.ppf(0.975, df_t)
    out = {}
    for key, coef in fit.fe_params.items():
        if "[T." not in key:
            continue
        se = float(fit.bse[key])
        t = float(coef) / se if se > 0 else math.nan
        out[key.split("[T.", 1)[1].rstrip("]")] = {
            "difference": float(coef),
            "low": float(coef - q * se),
            "high": float(coef + q * se),
            "t": _json_safe(t),
            "p": _json_safe(float(2 * stats.t.sf(abs(t), df_t)) if math.isfinite(t) else None),
        }
    return out
