"""The analysis against independent computations (scipy, pandas, pingouin,
factor_analyzer, numpy), published values and simulated studies with a known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from factor_analyzer.factor_analyzer import calculate_kmo  # a dev extra, the independent KMO
from scipy import stats

from trustmap.study.analysis import (
    analyze_ratings,
    icc2_1,
    kmo,
    order_effects,
    pairwise_reliability,
    pca_general_factor,
    rank_scores,
    ratings_frame,
    stars,
    z_adjust,
)
from trustmap.study.simulate import SimulationSpec, design_frame, power, simulate_ratings

METHODS = ["alpha_map", "beta_map", "gamma_map", "delta_map"]
CRITERIA = ["intuitive_validity", "semantic_meaningfulness", "image_quality"]
EFFECTS = {"alpha_map": 2.0, "beta_map": -0.4, "gamma_map": 0.6, "delta_map": -1.6}


def simulated(seed=0, n_readers=8, n_cases=24, **spec_kw):
    frame = design_frame(METHODS, n_cases, n_readers, CRITERIA, seed=seed)
    spec = SimulationSpec(spec_kw.pop("effects", EFFECTS), **{"reader_noise": 1.5, **spec_kw})
    frame["value"] = simulate_ratings(frame, spec, seed=seed + 100)
    return ratings_frame(frame.to_dict("records"))


@pytest.fixture(scope="module")
def paper_like():
    df = simulated()
    return df, analyze_ratings(df, methods=METHODS, criteria=CRITERIA, n_boot=500)


def test_planted_effect_sign_and_ranking_are_recovered(paper_like):
    _, res = paper_like
    planted = sorted(METHODS, key=lambda m: -EFFECTS[m])
    for table, higher in ((res.raw, True), (res.z, True), (res.rank, False)):
        for crit in CRITERIA:
            means = {m: table.cells[crit][m]["mean"] for m in METHODS}
            got = sorted(METHODS, key=lambda m: -means[m] if higher else means[m])
            assert got == planted, (table.name, crit, means)
            assert table.best[crit] == "alpha_map"
    for crit in CRITERIA:  # z-adjusted: positive effects above 0, negative below
        assert res.z.cells[crit]["alpha_map"]["mean"] > 0 > res.z.cells[crit]["delta_map"]["mean"]
        fit = res.mixed[crit]
        assert fit["converged"] and fit["reference"] == "alpha_map"
        for m in METHODS[1:]:
            truth = EFFECTS[m] - EFFECTS["alpha_map"]
            assert fit["methods"][m]["low"] - 0.4 < truth < fit["methods"][m]["high"] + 0.4


def test_t_statistics_equal_scipys_on_per_reader_means(paper_like):
    df, res = paper_like
    z = df.assign(z=z_adjust(df))
    for crit in CRITERIA:
        per_reader = z[z.criterion == crit].groupby(["reader", "method"])["z"].mean().unstack()
        for m in METHODS[1:]:
            ref = stats.ttest_rel(per_reader["alpha_map"], per_reader[m])
            cell = res.z.cells[crit][m]
            assert cell["t"] == pytest.approx(ref.statistic, rel=1e-12)
            assert cell["p_paired"] == pytest.approx(ref.pvalue, rel=1e-9)
            assert cell["df"] == 6  # t(N - 2) as in the paper, N = 8 readers
            assert cell["p"] == pytest.approx(2 * stats.t.sf(abs(ref.statistic), 6), rel=1e-9)
            assert cell["stars"] == stars(cell["p"])


def test_rank_t_tests_compare_lower_ranks_as_better(paper_like):
    df, res = paper_like
    ranked = df.assign(rank=rank_scores(df))
    sub = ranked[ranked.criterion == "image_quality"]
    per_reader = sub.groupby(["reader", "method"])["rank"].mean().unstack()
    ref = stats.ttest_rel(per_reader["delta_map"], per_reader["alpha_map"])
    assert res.rank.cells["image_quality"]["delta_map"]["t"] == pytest.approx(ref.statistic)
    assert res.rank.cells["image_quality"]["delta_map"]["t"] > 0


def test_z_adjustment_and_ranks_match_independent_computations():
    df = simulated(seed=4, n_readers=4, n_cases=5)
    z = z_adjust(df)
    for (_, _), idx in df.groupby(["case", "criterion"]).groups.items():
        values = df.loc[idx, "value"].to_numpy()
        expected = stats.zscore(values, ddof=1) if values.std() > 0 else np.zeros(len(values))
        np.testing.assert_allclose(z.loc[idx].to_numpy(), expected, atol=1e-12)
    r = rank_scores(df)
    for _, idx in df.groupby(["reader", "case", "criterion"]).groups.items():
        expected = stats.rankdata(-df.loc[idx, "value"].to_numpy(), method="average")
        np.testing.assert_array_equal(r.loc[idx].to_numpy(), expected)


def test_icc_matches_shrout_fleiss_and_pingouin():
    pingouin = pytest.importorskip(
        "pingouin", reason="pingouin is a dev extra: pip install -e .[dev]"
    )
    # Shrout and Fleiss (1979), Table 2: 6 targets rated by 4 judges; ICC(2,1) = .29.
    y = np.array(
        [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
        dtype=float,
    )
    res = icc2_1(y)
    assert round(res.icc, 2) == 0.29
    long = pd.DataFrame(
        [(t, j, y[t, j]) for t in range(6) for j in range(4)], columns=["t", "j", "y"]
    )
    table = pingouin.intraclass_corr(long, targets="t", raters="j", ratings="y")
    row = table.set_index("Type").loc["ICC(A,1)"]  # Shrout and Fleiss's ICC(2,1)
    assert res.icc == pytest.approx(row["ICC"], abs=1e-12)
    low, high = row["CI95"]  # pingouin rounds its CI to two decimals
    assert res.low == pytest.approx(low, abs=0.005) and res.high == pytest.approx(high, abs=0.005)
    # The mean squares equal statsmodels' two-way ANOVA.
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    anova = anova_lm(smf.ols("y ~ C(t) + C(j)", long).fit())
    assert res.ms_targets == pytest.approx(anova.loc["C(t)", "mean_sq"])
    assert res.ms_raters == pytest.approx(anova.loc["C(j)", "mean_sq"])
    assert res.ms_error == pytest.approx(anova.loc["Residual", "mean_sq"])


def test_icc_on_a_study_matches_pingouin(paper_like):
    pingouin = pytest.importorskip(
        "pingouin", reason="pingouin is a dev extra: pip install -e .[dev]"
    )
    df, res = paper_like
    sub = df[df.criterion == "semantic_meaningfulness"].assign(
        target=lambda d: d["case"].astype(str) + "/" + d["method"]
    )
    table = pingouin.intraclass_corr(sub, targets="target", raters="reader", ratings="value")
    row = table.set_index("Type").loc["ICC(A,1)"]  # Shrout and Fleiss's ICC(2,1)
    got = res.icc["semantic_meaningfulness"]
    assert got.icc == pytest.approx(row["ICC"], abs=1e-10)
    assert got.low == pytest.approx(row["CI95"][0], abs=0.005)
    assert got.high == pytest.approx(row["CI95"][1], abs=0.005)


def test_equation_7_is_the_mean_off_diagonal_pearson_r(paper_like):
    df, res = paper_like
    sub = df[df.criterion == "intuitive_validity"]
    wide = sub.pivot_table(index=["case", "method"], columns="reader", values="value")
    corr = wide.corr().to_numpy()
    k = corr.shape[0]
    expected = corr[np.triu_indices(k, 1)].mean()
    assert res.reliability["intuitive_validity"]["rho"] == pytest.approx(expected)
    assert pairwise_reliability(wide.to_numpy())["pairs"] == k * (k - 1) // 2


def _partial_by_regression(x: np.ndarray) -> np.ndarray:
    """Partial correlations from residuals of least-squares fits on the other columns."""
    p = x.shape[1]
    out = np.eye(p)
    for i in range(p):
        for j in range(i + 1, p):
            others = np.column_stack(
                [np.ones(len(x))] + [x[:, k] for k in range(p) if k not in (i, j)]
            )
            ri = x[:, i] - others @ np.linalg.lstsq(others, x[:, i], rcond=None)[0]
            rj = x[:, j] - others @ np.linalg.lstsq(others, x[:, j], rcond=None)[0]
            out[i, j] = out[j, i] = np.corrcoef(ri, rj)[0, 1]
    return out


def test_kmo_equals_factor_analyzer_and_a_regression_computation(paper_like):
    df, res = paper_like
    wide = df.pivot_table(index=["reader", "case", "method"], columns="criterion", values="value")
    wide = wide[CRITERIA]
    per_var, total = calculate_kmo(wide)
    assert res.kmo.overall == pytest.approx(total, rel=1e-10)
    np.testing.assert_allclose(list(res.kmo.per_variable.values()), per_var, rtol=1e-10)
    x = wide.to_numpy()
    r = np.corrcoef(x.T)
    q = _partial_by_regression(x)
    off = ~np.eye(3, dtype=bool)
    expected = (r[off] ** 2).sum() / ((r[off] ** 2).sum() + (q[off] ** 2).sum())
    assert kmo(r, CRITERIA).overall == pytest.approx(expected, rel=1e-10)
    assert 0.5 < res.kmo.overall <= 1


def test_phi_equals_the_first_eigenvector_of_the_correlation_matrix(paper_like):
    df, res = paper_like
    wide = df.pivot_table(index=["reader", "case", "method"], columns="criterion", values="value")
    x = wide[CRITERIA].to_numpy()
    eigval, eigvec = np.linalg.eigh(np.corrcoef(x.T))
    assert res.pca.explained == pytest.approx(eigval[-1] / eigval.sum(), rel=1e-10)
    vec = eigvec[:, -1] * np.sign(eigvec[:, -1].sum())
    np.testing.assert_allclose([res.pca.eigenvector[c] for c in CRITERIA], vec, atol=1e-10)
    l1 = np.array([res.pca.l1_eigenvector[c] for c in CRITERIA])
    assert np.abs(l1).sum() == pytest.approx(1.0)
    # Phi orders the methods as planted.
    phi = {m: res.phi[m]["mean"] for m in METHODS}
    assert sorted(METHODS, key=lambda m: -phi[m]) == sorted(METHODS, key=lambda m: -EFFECTS[m])
    direct = pca_general_factor(x, CRITERIA)
    assert direct.explained == pytest.approx(res.pca.explained)


def test_criteria_correlations_and_dendrogram(paper_like):
    _, res = paper_like
    for a in CRITERIA:
        assert res.criteria_corr[a][a] == pytest.approx(1.0)
        for b in CRITERIA:
            assert res.criteria_corr[a][b] == pytest.approx(res.criteria_corr[b][a])
    assert len(res.linkage) == len(CRITERIA) - 1


def test_cis_contain_the_means_and_json_has_no_nan(paper_like):
    import json
    import math

    _, res = paper_like
    for table in (res.raw, res.z, res.rank):
        for crit in CRITERIA:
            for m in METHODS:
                c = table.cells[crit][m]
                assert c["low"] <= c["mean"] <= c["high"]
    text = json.dumps(res.to_dict(), allow_nan=False)  # raises on NaN or inf
    assert "alpha_map" in text and not math.isnan(res.kmo.overall)


def test_no_order_effect_reported_when_none_is_planted(paper_like):
    _, res = paper_like
    assert res.order["verdict"] == "no order effect" and not res.order["found"]
    assert {t["test"] for t in res.order["tests"]} >= {
        "panel position (slot)",
        "drift along the sequence",
    }
    variants = res.order["variants"]
    assert len(variants["tests"]) == len(METHODS) * len(CRITERIA)
    assert all(t["df"] == 6 for t in variants["tests"])  # 4 + 4 readers: t(N - 2)


@pytest.mark.parametrize(
    "planted, found",
    [({"drift": -2.5}, "drift along the sequence"), ({"first_slot": 1.0}, "panel position")],
)
def test_a_planted_order_effect_is_found(planted, found):
    res = order_effects(simulated(seed=7, **planted))
    assert res["found"] and found in res["verdict"]


def test_order_check_false_alarm_rate_is_near_alpha():
    studies = (simulated(seed=s, n_readers=4, n_cases=6) for s in range(8))
    alarms = sum(order_effects(df)["found"] for df in studies)
    assert alarms <= 2  # Holm-corrected family at alpha .05: about 0.4 expected in 8


def test_variant_check_equals_scipy_two_sample_test(paper_like):
    df, res = paper_like
    means = df.groupby(["variant", "reader", "method", "criterion"])["value"].mean()
    a = means.xs(("A", "beta_map", "image_quality"), level=("variant", "method", "criterion"))
    b = means.xs(("B", "beta_map", "image_quality"), level=("variant", "method", "criterion"))
    ref = stats.ttest_ind(a, b)
    test = next(
        t
        for t in res.order["variants"]["tests"]
        if t["method"] == "beta_map" and t["criterion"] == "image_quality"
    )
    assert test["t"] == pytest.approx(ref.statistic) and test["p"] == pytest.approx(ref.pvalue)


def test_power_grows_with_the_effect():
    frame = design_frame(METHODS[:2], 8, 4, CRITERIA[:1], seed=1)
    weak_spec = SimulationSpec({"alpha_map": 0.1}, reader_noise=2.0)
    strong_spec = SimulationSpec({"alpha_map": 2.5}, reader_noise=1.0)
    weak = power(frame, weak_spec, n_sim=15, seed=0, order=False)
    strong = power(frame, strong_spec, n_sim=15, seed=0, order=False)
    assert strong["order_effect_reported"] is None
    assert strong["power"][CRITERIA[0]]["beta_map"] == 1.0
    assert weak["power"][CRITERIA[0]]["beta_map"] < 0.5
    assert strong["best_first"] == 1.0


def test_incomplete_and_degenerate_studies_give_notes_not_nan():
    import json

    df = simulated(seed=2, n_readers=2, n_cases=3)
    full = len(df)
    df = df.sample(frac=0.5, random_state=0)
    res = analyze_ratings(df, methods=METHODS, criteria=CRITERIA, n_boot=200, n_expected=full)
    assert any("missing" in n for n in res.notes) and any("3" in n for n in res.notes)
    json.dumps(res.to_dict(), allow_nan=False)
    constant = simulated(seed=1, n_readers=3, n_cases=3).assign(value=1.0)
    res = analyze_ratings(constant, methods=METHODS, criteria=CRITERIA, n_boot=200)
    assert res.icc[CRITERIA[0]] == "ICC is undefined: the ratings do not vary"
    json.dumps(res.to_dict(), allow_nan=False)
