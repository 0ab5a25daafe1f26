"""The trust protocol end to end on a tiny dataset, its config checks and average_mask."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tests.models._toy import write_toy_dir
from trustmap.models import load_checkpoint
from trustmap.trust import TrustConfig, average_mask, load_config, run
from trustmap.trust.cache import weights_hash

METHODS = ["gradient", "grad_cam", "integrated_gradients"]


def tiny_config(data_dir, out, **extra) -> dict:
    cfg = {
        "preset": "quick",
        "dataset": str(data_dir),
        "out": str(out),
        "size": 32,
        "n_images": 6,
        "methods": METHODS,
        "method_params": {"integrated_gradients": {"n_steps": 8}},
        "models": {
            "A": {"arch": "small_cnn", "seeds": [0, 1], "kwargs": {"width": 4}},
            "B": {"arch": "resnet18", "seed": 0, "kwargs": {"widen_factor": 0.125}},
            "localizer": {"arch": "unet", "seeds": [0, 1]},
        },
        "training": {"epochs": 2, "min_epochs": 1, "n_boot": 20, "batch_size": 16},
        "localizer_training": {"epochs": 2, "min_epochs": 1, "batch_size": 16},
        "randomization": {"n_pairs": 10},
        "faithfulness": {"n_images": 2, "steps": 4, "n_values": [4, 16], "n_subsets": 5},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    data = write_toy_dir(root / "toy", n=80, size=32)
    out = root / "out"
    first = run(tiny_config(data, out))
    return data, out, first


def test_outputs_and_schema(finished) -> None:
    _, out, _ = finished
    for name in ("results.json", "per_image.csv", "report.html"):
        assert (out / name).is_file()
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert set(results["methods"]) == set(METHODS)
    for method in METHODS:
        entry = results["methods"][method]
        for criterion in ("utility", "randomization", "repeatability", "reproducibility"):
            block = entry[criterion]
            assert {"mean", "sd", "n", "baseline", "p_value", "verdict"} <= set(block)
            assert block["verdict"] in ("pass", "fail", "uncertain")
            assert results["summary"]["verdicts"][method][criterion] == block["verdict"]
        stages = [s["name"] for s in entry["randomization"]["stages"]]
        assert stages[0] == "logits" and len(stages) >= 2
        assert [s["name"] for s in entry["randomization"]["independent"]] == stages
        assert entry["randomization"]["baseline"]["n_pairs"] == 10
        assert entry["repeatability"]["baseline"]["mean"] == 0.5
        assert "faithfulness" in entry
    ig = results["methods"]["integrated_gradients"]["faithfulness"]["completeness_gap"]
    assert ig is not None and ig["n"] == 2
    assert results["methods"]["gradient"]["faithfulness"]["completeness_gap"] is None
    passes = results["summary"]["passes_all"]
    assert passes == [
        m for m in METHODS if all(v == "pass" for v in results["summary"]["verdicts"][m].values())
    ]
    assert results["timings"]["total"] > 0
    assert set(results["models"]) == {"A1", "A2", "B", "L1", "L2"}


def test_per_image_table(finished) -> None:
    _, out, result = finished
    table = pd.read_csv(out / "per_image.csv", keep_default_na=False)
    assert list(table.columns) == ["image", "method", "criterion", "stage", "metric", "value"]
    assert np.isfinite(table.value.astype(float)).all()
    util = table[(table.criterion == "utility") & (table.metric == "auprc")]
    # six images for each method and both baselines
    assert util.groupby("method").size().to_dict() == {m: 6 for m in [*METHODS, "AVG", "localizer"]}
    # the mean in results.json is the mean of the per-image rows
    grad = util[util.method == "gradient"].value.astype(float)
    assert math.isclose(result.results["methods"]["gradient"]["utility"]["mean"], grad.mean())
    rep = table[(table.criterion == "repeatability") & (table.method == "grad_cam")]
    assert len(rep) == 6 and ((rep.value >= -1) & (rep.value <= 1)).all()


def test_rerun_resumes_from_the_cache(finished) -> None:
    data, out, first = finished
    ckpt = first.results["models"]["A1"]["checkpoint"]
    before = weights_hash(load_checkpoint(ckpt)[0])
    second = run(tiny_config(data, out))
    assert second.results["cache"]["misses"] == 0
    assert second.results["cache"]["hits"] > 0
    assert second.results["summary"] == first.results["summary"]
    pd.testing.assert_frame_equal(second.per_image, first.per_image)
    assert weights_hash(load_checkpoint(ckpt)[0]) == before


def test_changed_parameter_recomputes_only_that_method(finished, tmp_path) -> None:
    data, out, first = finished
    cfg = tiny_config(data, out, method_params={"integrated_gradients": {"n_steps": 9}})
    again = run(cfg)
    # Integrated gradients is recomputed for every distinct model state (trained A1, each
    # cascading and independent stage, A2, B; the first independent stage has the same
    # weights as the first cascading one) plus its faithfulness record; the rest is read.
    stages = len(first.results["methods"]["gradient"]["randomization"]["stages"])
    n_states = 3 + 2 * stages - 1
    assert again.results["cache"]["misses"] == n_states + 1
    lookups = again.results["cache"]["hits"] + again.results["cache"]["misses"]
    assert lookups == first.results["cache"]["hits"] + first.results["cache"]["misses"]
    others = again.per_image.method.isin(["gradient", "grad_cam", "AVG", "localizer"])
    before = first.per_image.method.isin(["gradient", "grad_cam", "AVG", "localizer"])
    pd.testing.assert_frame_equal(
        again.per_image[others].reset_index(drop=True),
        first.per_image[before].reset_index(drop=True),
    )
    ig = again.per_image.method == "integrated_gradients"
    assert not np.allclose(
        again.per_image[ig].value.to_numpy(), first.per_image[ig].value.to_numpy()
    )


def test_unknown_method_fails_before_any_work(tmp_path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"unknown method 'grad_cma'.*grad_cam"):
        run({"methods": ["grad_cma"], "out": str(out)})
    assert not out.exists()


def test_missing_checkpoint_fails_before_any_work(tmp_path) -> None:
    cfg = {"out": str(tmp_path / "o"), "models": {"B": {"checkpoints": [str(tmp_path / "no.pt")]}}}
    with pytest.raises(FileNotFoundError, match=r"no\.pt"):
        TrustConfig.from_mapping(cfg)


def test_config_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown key 'n_image'.*n_images"):
        TrustConfig.from_mapping({"n_image": 3})
    with pytest.raises(ValueError, match=r"models\.A\.seeds: 2 needed"):
        TrustConfig.from_mapping({"models": {"A": {"seeds": [0]}}})
    with pytest.raises(ValueError, match="must be a localizer"):
        TrustConfig.from_mapping({"models": {"localizer": {"arch": "small_cnn"}}})
    with pytest.raises(ValueError, match="has no parameter 'n_stepz'"):
        TrustConfig.from_mapping({"method_params": {"integrated_gradients": {"n_stepz": 3}}})
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a phantom"):
        TrustConfig.from_mapping({"dataset": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="unknown preset"):
        TrustConfig.from_preset("fast")


def test_toml_and_yaml_configs_agree(tmp_path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text(
        'preset = "quick"\nmethods = ["gradient", "xrai"]\nn_images = 7\n'
        "[models.A]\nseeds = [3, 4]\n[method_params.xrai]\nn_steps = 5\n"
    )
    yaml = tmp_path / "a.yaml"
    yaml.write_text(
        "preset: quick\nmethods: [gradient, xrai]\nn_images: 7\n"
        "models:\n  A:\n    seeds: [3, 4]\nmethod_params:\n  xrai:\n    n_steps: 5\n"
    )
    a, b = load_config(toml), load_config(yaml)
    assert a.to_dict() == b.to_dict()
    assert a.models["A"].seeds == [3, 4] and a.models["A"].arch == "small_cnn"
    assert a.method_params["xrai"] == {"n_steps": 5}
    assert a.preset == "quick" and a.n_images == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("methods = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)


def test_config_round_trips() -> None:
    cfg = TrustConfig.from_preset("default")
    assert TrustConfig.from_mapping(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_average_mask_known_answer() -> None:
    masks = np.zeros((4, 3, 3), bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[2, 1, 1] = True
    avg = average_mask(masks)
    expected = np.zeros((3, 3))
    expected[0, 0], expected[1, 1] = 0.5, 0.25
    np.testing.assert_allclose(avg, expected)
    t = average_mask(torch.from_numpy(masks[:, None].repeat(2, 1)))  # 3D stack
    assert isinstance(t, torch.Tensor) and t.shape == (2, 3, 3)
    assert masks.sum() == 3  # not mutated


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        (np.zeros((0, 4, 4)), "empty"),
        (np.zeros((4, 4)), r"\(N, \*spatial\)"),
        (np.full((2, 4, 4), 0.5), "binary"),
        (np.full((2, 4, 4), np.nan), "NaN"),
    ],
)
def test_average_mask_errors(masks, message) -> None:
    with pytest.raises(ValueError, match=message):
        average_mask(masks)


def test_cli_reports_bad_config_in_one_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from trustmap.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["trust", "--out", str(tmp_path / "o"), "-m", "gradeint"])
    assert result.exit_code == 2
    assert "unknown method 'gradeint'" in result.output and "Traceback" not in result.output
    cfg = tmp_path / "c.toml"
    cfg.write_text("n_images = 1\n")
    result = runner.invoke(app, ["trust", "--config", str(cfg)])
    assert result.exit_code == 2 and "n_images must be >= 2" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_runs_a_config(finished) -> None:
    from typer.testing import CliRunner

    from trustmap.cli.main import app

    data, out, first = finished
    cfg = out.parent / "cli.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_config(data, out)))
    result = CliRunner().invoke(app, ["trust", "--config", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Arun et al.'s (2021) four criteria" in result.output
    for method in METHODS:
        assert method[:10] in result.output
    again = json.loads((out / "results.json").read_text())
    assert again["summary"] == first.results["summary"]


def test_weak_models_are_named_in_a_warning() -> None:
    from trustmap.trust.protocol import weak_models

    models = {
        "A1": {"arch": "small_cnn", "seed": 0, "test_auc": 0.95},
        "A2": {"arch": "small_cnn", "seed": 1, "test_auc": 0.58},
        "L1": {"arch": "unet", "seed": 0, "test_auc": None},
    }
    (warning,) = weak_models(models)
    assert "A2" in warning and "0.58" in warning and "seed 1" in warning


def test_cli_keeps_the_config_files_out_unless_given(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import trustmap.trust as trust_pkg
    from trustmap.cli.main import app

    seen = []

    def fake_run(cfg, progress=None):
        seen.append(cfg.out)
        raise ValueError("stop here")

    monkeypatch.setattr(trust_pkg, "run", fake_run)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'out = "{tmp_path / "from_file"}"\n')
    CliRunner().invoke(app, ["trust", "--config", str(cfg)])
    CliRunner().invoke(app, ["trust", "--config", str(cfg), "--out", str(tmp_path / "cli")])
    assert seen == [str(tmp_path / "from_file"), str(tmp_path / "cli")]
