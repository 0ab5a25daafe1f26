"""Statistics and verdicts of the trust protocol against scipy, statsmodels and analytic answers."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multicomp import pairwise_tukeyhsd

from trustmap.trust.stats import (
    Comparison,
    compare_to_constant,
    compare_to_level,
    compare_to_sample,
    summarize,
    tukey_hsd,
    verdict,
)


def simulate(
    means: dict[str, float],
    *,
    n: int = 30,
    image_sd: float = 0.1,
    noise: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Tidy scores: ``mean[method] + u_image + e``, u ~ N(0, image_sd), e ~ N(0, noise)."""
    rng = np.random.default_rng(seed)
    shift = rng.normal(0.0, image_sd, n)
    rows = [
        (f"img{i:02d}", method, mean + shift[i] + e)
        for method, mean in means.items()
        for i, e in enumerate(rng.normal(0.0, noise, n))
    ]
    return pd.DataFrame(rows, columns=["image", "method", "value"])


def wide(df: pd.DataFrame) -> pd.DataFrame:
    return df.pivot(index="image", columns="method", values="value")


def assert_json_safe(comparisons: dict[str, Comparison]) -> None:
    for comparison in comparisons.values():
        record = comparison.as_dict()
        json.dumps(record, allow_nan=False)  # raises on NaN or inf
        for value in record.values():
            assert value is None or type(value) in (str, int, float), record


# ---------------------------------------------------------------------------------- verdict


@pytest.mark.parametrize(
    ("diff", "p_value", "higher_is_better", "expected"),
    [
        (0.3, 0.001, True, "pass"),
        (-0.3, 0.001, True, "fail"),
        (0.3, 0.001, False, "fail"),
        (-0.3, 0.001, False, "pass"),
        (0.3, 0.2, True, "uncertain"),
        (-0.3, 0.2, False, "uncertain"),
        (0.3, 0.05, True, "uncertain"),  # p must be below alpha, not equal to it
        (0.3, 0.0499, True, "pass"),
        (0.0, 0.0, True, "uncertain"),
        (0.3, None, True, "uncertain"),
        (None, 0.001, True, "uncertain"),
        (0.3, float("nan"), True, "uncertain"),
        (float("nan"), 0.001, True, "uncertain"),
        (np.float64(0.3), np.float64(0.001), True, "pass"),
    ],
)
def test_verdict_table(diff, p_value, higher_is_better, expected):
    assert verdict(diff, p_value, higher_is_better=higher_is_better) == expected


def test_verdict_alpha_and_bad_input():
    assert verdict(0.3, 0.03, alpha=0.01) == "uncertain"
    assert verdict(0.3, 0.03, alpha=0.1) == "pass"
    with pytest.raises(ValueError, match="alpha"):
        verdict(0.3, 0.01, alpha=0.0)
    with pytest.raises(ValueError, match="p_value"):
        verdict(0.3, 1.5)


# --------------------------------------------------------------------------------- summarize


def test_summarize():
    assert summarize([1.0, 2.0, 4.0]) == {"mean": 7 / 3, "sd": np.std([1, 2, 4], ddof=1), "n": 3}
    assert summarize(np.array([5.0])) == {"mean": 5.0, "sd": None, "n": 1}
    assert summarize([]) == {"mean": None, "sd": None, "n": 0}
    torch = pytest.importorskip("torch")
    assert summarize(torch.tensor([1.0, 3.0]))["sd"] == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, float("nan")])


# ------------------------------------------------------------------------- compare_to_level


@pytest.fixture(scope="module")
def level_results():
    df = simulate({"AVG": 0.2, "better": 0.8, "worse": -0.4, "same": 0.2}, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # statsmodels' boundary warning must not leak
        up = compare_to_level(df, "AVG")
        down = compare_to_level(df, "AVG", higher_is_better=False)
    return df, up, down


def test_level_clear_effects_and_flip(level_results):
    _, up, down = level_results
    assert list(up) == ["better", "worse", "same"]
    assert {m: c.verdict for m, c in up.items()} == {
        "better": "pass",
        "worse": "fail",
        "same": "uncertain",
    }
    assert {m: c.verdict for m, c in down.items()} == {
        "better": "fail",
        "worse": "pass",
        "same": "uncertain",
    }
    for comparison in up.values():
        assert comparison.test == "mixedlm"
    assert up["better"].p_value < 1e-10
    assert up["same"].p_value > 0.05  # seed 0: p = 0.68, no effect is found where none is
    assert up["better"].effect == pytest.approx(0.6, abs=0.05)


def test_level_summaries_are_of_each_level(level_results):
    df, up, _ = level_results
    table = wide(df)
    comparison = up["better"]
    assert (comparison.mean, comparison.sd, comparison.n) == (
        pytest.approx(table["better"].mean(), rel=1e-12),
        pytest.approx(table["better"].std(ddof=1), rel=1e-12),
        30,
    )
    assert comparison.baseline_mean == pytest.approx(table["AVG"].mean(), rel=1e-12)
    assert comparison.baseline_sd == pytest.approx(table["AVG"].std(ddof=1), rel=1e-12)
    # balanced design: the GLS coefficient is the mean difference whatever the variances
    difference = (table["better"] - table["AVG"]).mean()
    assert comparison.effect == pytest.approx(difference, rel=1e-9)
    assert_json_safe(up)


def test_level_two_balanced_levels_match_paired_t():
    """REML on 2 balanced levels: z of the coefficient equals the paired t statistic.

    With tau^2 > 0 the REML residual variance is s_d^2 / 2 (s_d: sd of the differences),
    so SE(beta) = s_d / sqrt(n) and z = t exactly; only the optimizer's tolerance (a
    relative 1e-5 on the variance ratio) separates them, hence rtol 1e-3 on p. The Wald
    statistic is referred to t(images - 1), so the p-value is the paired t-test's.
    """
    df = simulate({"AVG": 0.2, "m": 0.22}, seed=5)
    comparison = compare_to_level(df, "AVG")["m"]
    assert comparison.test == "mixedlm"
    table = wide(df)
    paired = stats.ttest_rel(table["m"], table["AVG"])
    assert 0.01 < paired.pvalue < 0.2  # a p where z and t references visibly disagree
    assert comparison.effect == pytest.approx((table["m"] - table["AVG"]).mean(), rel=1e-9)
    assert comparison.p_value == pytest.approx(paired.pvalue, rel=1e-3)
    # the normal reference would have been visibly smaller
    assert 2 * stats.norm.sf(abs(paired.statistic)) < comparison.p_value - 0.005


def test_level_unbalanced_uses_the_rows_there_are():
    df = simulate({"AVG": 0.2, "better": 0.8, "other": 0.5}, seed=1)
    dropped = df[~((df["method"] == "better") & df["image"].isin(["img00", "img03", "img07"]))]
    dropped = dropped[~((dropped["method"] == "AVG") & (dropped["image"] == "img11"))]
    result = compare_to_level(dropped, "AVG")
    assert result["better"].test == "mixedlm"
    assert result["better"].n == 27
    assert result["better"].verdict == "pass"
    assert result["other"].n == 30
    assert result["other"].baseline_mean == pytest.approx(
        dropped.loc[dropped["method"] == "AVG", "value"].mean(), rel=1e-12
    )


def test_level_falls_back_to_paired_t_for_few_images():
    df = simulate({"AVG": 0.2, "m": 0.4}, n=2, seed=2)
    comparison = compare_to_level(df, "AVG")["m"]
    table = wide(df)
    assert comparison.test == "paired_t"
    assert comparison.p_value == pytest.approx(
        stats.ttest_rel(table["m"], table["AVG"]).pvalue, rel=1e-12
    )
    assert "fewer than 3 images" in comparison.note


def test_level_falls_back_when_the_fit_fails():
    # negative within-image correlation puts the REML optimum at tau^2 = 0: no convergence
    rng = np.random.default_rng(3)
    e = rng.normal(0.0, 0.05, 20)
    a, b = 0.5 + e, 0.6 - e + rng.normal(0.0, 0.01, 20)
    images = [f"i{i}" for i in range(20)]
    df = pd.DataFrame(
        {"image": images * 2, "method": ["AVG"] * 20 + ["m"] * 20, "value": np.r_[a, b]}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks from statsmodels' failed fit
        comparison = compare_to_level(df, "AVG")["m"]
    assert comparison.test == "paired_t"
    assert comparison.p_value == pytest.approx(stats.ttest_rel(b, a).pvalue, rel=1e-12)
    assert comparison.effect == pytest.approx(np.mean(b - a), rel=1e-12)
    assert "mixed model not used" in comparison.note
    assert comparison.verdict == "pass"


def test_level_input_errors_and_no_mutation():
    df = simulate({"AVG": 0.2, "m": 0.4}, n=5, seed=4)
    before = df.copy()
    compare_to_level(df, "AVG")
    pd.testing.assert_frame_equal(df, before)
    with pytest.raises(ValueError, match="'localizer'"):
        compare_to_level(df, "localizer")
    with pytest.raises(ValueError, match="column"):
        compare_to_level(df.drop(columns="image"), "AVG")
    with pytest.raises(ValueError, match="repeated"):
        compare_to_level(pd.concat([df, df.iloc[:1]]), "AVG")
    with pytest.raises(ValueError, match="NaN"):
        compare_to_level(df.assign(value=df["value"].where(df.index != 3)), "AVG")
    with pytest.raises(TypeError, match="DataFrame"):
        compare_to_level(df.to_dict(), "AVG")
    with pytest.raises(ValueError, match="alpha"):
        compare_to_level(df, "AVG", alpha=1.0)
    assert compare_to_level(df[df["method"] == "AVG"], "AVG") == {}


# ---------------------------------------------------------------------- compare_to_constant


def test_constant_single_method_is_the_one_sample_t():
    df = simulate({"gradient": 0.53}, seed=6)
    comparison = compare_to_constant(df, 0.5)["gradient"]
    reference = stats.ttest_1samp(df["value"], 0.5)
    assert comparison.test == "one_sample_t"
    assert comparison.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert comparison.effect == pytest.approx(df["value"].mean() - 0.5, rel=1e-12)
    assert (comparison.baseline_mean, comparison.baseline_sd) == (0.5, None)
    assert "not identifiable" in comparison.note


def test_constant_mixed_model_over_methods():
    df = simulate({"high": 0.8, "low": 0.2, "at": 0.5}, seed=8)
    up = compare_to_constant(df, 0.5)
    down = compare_to_constant(df, 0.5, higher_is_better=False)
    assert {m: c.test for m, c in up.items()} == dict.fromkeys(up, "mixedlm")
    assert {m: c.verdict for m, c in up.items()} == {
        "high": "pass",
        "low": "fail",
        "at": "uncertain",
    }
    assert {m: c.verdict for m, c in down.items()} == {
        "high": "fail",
        "low": "pass",
        "at": "uncertain",
    }
    assert up["at"].p_value > 0.05  # seed 8: p = 0.35
    for method, comparison in up.items():
        # balanced cell means: each coefficient is the method's mean minus the constant
        values = df.loc[df["method"] == method, "value"]
        assert comparison.effect == pytest.approx(values.mean() - 0.5, rel=1e-9)
    assert_json_safe(up)


# ------------------------------------------------------------------------ compare_to_sample


def test_sample_is_welch_and_lower_passes():
    df = simulate({"gradient": 0.2, "xrai": 0.6, "ig": 0.41}, seed=8)
    rng = np.random.default_rng(9)
    baseline = {m: rng.normal(0.4, 0.08, 50) for m in ("gradient", "xrai", "ig", "unused")}
    result = compare_to_sample(df, baseline)
    for method, comparison in result.items():
        values = df.loc[df["method"] == method, "value"].to_numpy()
        reference = stats.ttest_ind(values, baseline[method], equal_var=False)
        assert comparison.test == "welch_t"
        assert comparison.p_value == pytest.approx(reference.pvalue, rel=1e-12)
        assert comparison.effect == pytest.approx(values.mean() - baseline[method].mean())
        assert comparison.baseline_mean == pytest.approx(baseline[method].mean(), rel=1e-12)
        assert comparison.baseline_sd == pytest.approx(baseline[method].std(ddof=1), rel=1e-12)
    assert [result[m].verdict for m in ("gradient", "xrai")] == ["pass", "fail"]
    assert result["ig"].p_value > 0.05 and result["ig"].verdict == "uncertain"
    flipped = compare_to_sample(df, baseline, higher_is_better=True)
    assert [flipped[m].verdict for m in ("gradient", "xrai")] == ["fail", "pass"]
    with pytest.raises(ValueError, match="no baseline sample"):
        compare_to_sample(df, {"gradient": baseline["gradient"]})


# -------------------------------------------------------------------------------- tukey_hsd


def test_tukey_matches_statsmodels_table():
    df = simulate({"AVG": 0.2, "a": 0.25, "b": 0.5, "c": 0.21}, n=20, seed=10)
    rows = tukey_hsd(df)
    reference = pairwise_tukeyhsd(df["value"], df["method"], alpha=0.05).summary().data
    assert reference[0] == ["group1", "group2", "meandiff", "p-adj", "lower", "upper", "reject"]
    assert len(rows) == len(reference) - 1 == 6
    for row, ref in zip(rows, reference[1:], strict=True):
        assert (row["group1"], row["group2"]) == (ref[0], ref[1])
        # statsmodels rounds its table to 4 decimals
        for key, value in zip(("meandiff", "p_adj", "lower", "upper"), ref[2:6], strict=True):
            assert row[key] == pytest.approx(value, abs=5.01e-5)
        assert row["reject"] == bool(ref[6])
        means = df.groupby("method")["value"].mean()
        assert row["meandiff"] == pytest.approx(means[ref[1]] - means[ref[0]], abs=1e-12)
    rejected = {(r["group1"], r["group2"]) for r in rows if r["reject"]}
    assert ("AVG", "b") in rejected and ("AVG", "c") not in rejected
    json.dumps(rows, allow_nan=False)
    assert tukey_hsd(df[df["method"] == "a"]) == []


# ------------------------------------------------------------------------ degenerate inputs


def test_degenerate_data_gives_no_nan_and_no_warning():
    images = [f"i{i}" for i in range(6)]
    df = pd.DataFrame(
        {
            "image": images * 3,
            "method": ["AVG"] * 6 + ["equal"] * 6 + ["above"] * 6,
            "value": [0.2] * 6 + [0.2] * 6 + [0.9] * 6,
        }
    )
    lonely = pd.DataFrame({"image": ["i0"], "method": ["lonely"], "value": [0.7]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        level = compare_to_level(pd.concat([df, lonely]), "AVG")
        constant = compare_to_constant(df, 0.2)
        sample = compare_to_sample(
            pd.concat([df, lonely]),
            {"AVG": [0.2, 0.2], "equal": [0.5, 0.5], "above": [0.9, 0.9], "lonely": [1.0, 0.0]},
        )
        tukey = tukey_hsd(df)

    assert (level["equal"].test, level["equal"].p_value, level["equal"].verdict) == (
        "degenerate",
        1.0,
        "uncertain",
    )
    assert (level["above"].p_value, level["above"].verdict) == (0.0, "pass")
    assert "zero variance" in level["above"].note
    assert (level["lonely"].p_value, level["lonely"].verdict, level["lonely"].sd) == (
        None,
        "uncertain",
        None,
    )
    assert [constant[m].p_value for m in ("AVG", "equal", "above")] == [1.0, 1.0, 0.0]
    assert constant["above"].verdict == "pass"
    assert [sample[m].p_value for m in ("AVG", "equal", "above")] == [1.0, 0.0, 1.0]
    assert sample["equal"].verdict == "pass"  # 0.2 < 0.5 with lower better
    assert sample["lonely"].p_value is None and sample["lonely"].verdict == "uncertain"
    for result in (level, constant, sample):
        assert_json_safe(result)
    assert [(r["group1"], r["group2"], r["reject"]) for r in tukey] == [
        ("AVG", "above", True),
        ("AVG", "equal", False),
        ("above", "equal", True),
    ]
    json.dumps(tukey, allow_nan=False)
    # exactly zero pooled variance, or one value per group: nothing to compute, None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = tukey_hsd(df[df["method"] != "above"])
        single = tukey_hsd(df.groupby("method").head(1))
    assert flat[0]["meandiff"] == 0.0
    assert (flat[0]["p_adj"], flat[0]["reject"]) == (None, False)
    assert all(r["p_adj"] is None and r["lower"] is None and not r["reject"] for r in single)
    json.dumps([flat, single], allow_nan=False)
