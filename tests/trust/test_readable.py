"""The trust report for people: plain-language box, effect sizes, data in words, run time
over resumed runs, no raw dicts or paths before the appendix."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from trustmap.trust import readable
from trustmap.trust.report import write_report


def _results():
    return {
        "methods": {
            "grad_cam": {
                "utility": {"verdict": "pass", "p_value": 0.001, "mean": 0.4},
                "randomization": {"verdict": "pass", "p_value": 0.01, "baseline": 0.2},
                "repeatability": {"verdict": "fail", "p_value": 0.02},
                "reproducibility": {"verdict": "uncertain", "p_value": 0.3},
            },
            "gradient": {
                "utility": {"verdict": "fail", "p_value": 0.001},
                "randomization": {"verdict": "uncertain", "p_value": 0.4, "baseline": 0.2},
                "repeatability": {"verdict": "fail", "p_value": 0.02},
                "reproducibility": {"verdict": "fail", "p_value": 0.01},
            },
        },
        "summary": {"verdicts": {}, "passes_all": []},
        "config": {"alpha": 0.05},
        "dataset": {
            "name": "cxr-pneumothorax",
            "path": "/home/someone/.cache/trustmap/datasets/cxr-pneumothorax-abc",
            "size": [64, 64],
            "native_size": [128, 128],
            "spatial_dims": 2,
            "counts": {"train": 2000, "val": 250, "test": 250},
            "ground_truth": "mask",
        },
        "timings": {"total": 12.5},
        "run_time": {"runs": 2, "this_run": 12.5, "all_runs": 4212.5},
        "notes": ["Mixed-model p-values: statsmodels' Wald statistic ..."],
    }


def _per_image():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        rows.append((f"i{i}", "AVG", "utility", "", "auprc", 0.2 + 0.01 * i))
        rows.append((f"i{i}", "grad_cam", "utility", "", "auprc", 0.5 + rng.normal(0, 0.05)))
        rows.append((f"i{i}", "gradient", "utility", "", "auprc", 0.1 + rng.normal(0, 0.05)))
        for m in ("grad_cam", "gradient"):
            rows.append((f"i{i}", m, "randomization", "logits", "ssim", 0.8))
            rows.append((f"i{i}", m, "randomization", "block1", "ssim", 0.1 + rng.normal(0, 0.02)))
            rows.append((f"i{i}", m, "repeatability", "", "ssim", 0.4 + rng.normal(0, 0.02)))
            rows.append((f"i{i}", m, "reproducibility", "", "ssim", 0.5 + rng.normal(0, 0.02)))
    return pd.DataFrame(rows, columns=["image", "method", "criterion", "stage", "metric", "value"])


def test_effect_sizes_match_a_paired_t_interval():
    per_image = _per_image()
    rows = {(r["method"], r["criterion"]): r for r in readable.effect_sizes(_results(), per_image)}
    util = per_image[per_image.criterion == "utility"].pivot(
        index="image", columns="method", values="value"
    )
    diff = (util["grad_cam"] - util["AVG"]).to_numpy()
    low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    r = rows[("grad_cam", "utility")]
    assert (
        np.isclose(r["mean"], diff.mean())
        and np.isclose(r["low"], low)
        and np.isclose(r["high"], high)
    )
    assert np.isclose(r["d_z"], diff.mean() / diff.std(ddof=1))
    assert r["p_value"] == 0.001
    last = per_image[(per_image.method == "gradient") & (per_image.stage == "block1")]["value"]
    assert np.isclose(rows[("gradient", "randomization")]["mean"], last.mean() - 0.2)


def test_plain_language_box_names_the_showable_methods():
    box = readable.plain_language(_results())
    shown, not_shown = box.split("Not to be shown")
    assert "grad_cam" in shown and "gradient" not in shown.replace("grad_cam", "")
    assert "gradient" in not_shown and "average lesion position" in not_shown


def test_report_body_has_words_not_dicts_and_sums_resumed_time(tmp_path):
    path = write_report(_results(), {}, tmp_path / "report.html", per_image=_per_image())
    page = path.read_text()
    body, appendix = page.split('<section id="appendix">')
    assert body.index('id="plain"') < body.index('id="summary"'), "the plain box comes first"
    assert "synthetic phantom" in body and "64 x 64" in body and "resized from 128 x 128" in body
    assert "/home/someone" not in body and "{'" not in body and "statsmodels" not in body
    assert "/home/someone" in appendix and "statsmodels" in appendix
    assert "over 2 runs" in body and "1 h 10 min" in body  # 4212.5 s over the two runs
    assert 'id="effects"' in body and "[" in body


def test_run_history_sums_every_run(tmp_path):
    assert readable.record_run_time(tmp_path, 4200.0)["all_runs"] == 4200.0
    total = readable.record_run_time(tmp_path, 12.5)
    assert total == {"runs": 2, "this_run": 12.5, "all_runs": 4212.5}
