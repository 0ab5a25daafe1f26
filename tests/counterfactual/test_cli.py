"""``trustmap counterfactual`` through typer's runner, on a tiny dataset folder."""

from __future__ import annotations

import functools
import json

import pytest
from typer.testing import CliRunner

from tests.counterfactual.helpers import tiny_classifier, tiny_config
from tests.models._toy import write_toy_dir
from trustmap.cli.counterfactual import app
from trustmap.counterfactual import demo as demo_module
from trustmap.models import TrainConfig, save_checkpoint

runner = CliRunner()
TINY = ["--steps", "2", "--batch-size", "4", "--width", "2", "--disc-width", "2"]
TINY += ["--checkpoint-every", "1", "--preview-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_toy_dir(root / "toy", n=40, size=32)
    ckpt = save_checkpoint(
        root / "clf.pt",
        tiny_classifier(),
        arch="small_cnn",
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        width=2,
    )
    return data, ckpt


def _invoke(args):
    return runner.invoke(app, args, terminal_width=200)


def test_train_then_evaluate(files, tmp_path):
    data, ckpt = files
    out = tmp_path / "cf"
    args = ["train", "--classifier", str(ckpt), "--dataset", str(data), "--out", str(out), *TINY]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert "2 steps in" in result.output and "generators.pt" in result.output
    assert (out / "generators.pt").is_file() and (out / "previews" / "step_000002.png").is_file()
    again = _invoke(args)
    assert again.exit_code == 0 and "already trained" in again.output

    ev_args = ["evaluate", "--classifier", str(ckpt), "--generators", str(out)]
    ev_args += ["--dataset", str(data), "--out", str(tmp_path / "ev"), "--threads", "1"]
    evaluated = _invoke(ev_args)
    assert evaluated.exit_code == 0, evaluated.output
    doc = json.loads((tmp_path / "ev" / "counterfactual.json").read_text())
    assert f"x     {doc['probability']['original']['mean']:.3f}" in evaluated.output
    assert "Cohen's d_z" in evaluated.output and (tmp_path / "ev" / "report.html").is_file()


def test_errors_are_one_line_with_exit_code_2(files, tmp_path):
    data, ckpt = files
    missing = _invoke(
        [
            "train",
            "--classifier",
            str(tmp_path / "no.pt"),
            "--dataset",
            str(data),
            "--out",
            str(tmp_path / "o"),
            *TINY,
        ]
    )
    assert missing.exit_code == 2 and "error:" in missing.output
    assert "does not exist" in missing.output and "Traceback" not in missing.output
    no_gens = _invoke(
        [
            "evaluate",
            "--classifier",
            str(ckpt),
            "--generators",
            str(tmp_path),
            "--dataset",
            str(data),
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert no_gens.exit_code == 2 and "has no generators.pt" in no_gens.output
    bad_weight = _invoke(
        [
            "train",
            "--classifier",
            str(ckpt),
            "--dataset",
            str(data),
            "--out",
            str(tmp_path / "w"),
            "--w-am",
            "-1",
            *TINY,
        ]
    )
    assert bad_weight.exit_code == 2 and "w_am" in bad_weight.output


def test_demo_runs_end_to_end_and_reuses_what_is_there(files, tmp_path, monkeypatch):
    data, _ = files
    tiny_demo = functools.partial(
        demo_module.run_demo,
        dataset=str(data),
        classifier_config=TrainConfig(
            epochs=1, batch_size=8, model_kwargs={"width": 2}, n_boot=10, checks=False
        ),
        cycle_config=tiny_config(steps=2),
    )
    monkeypatch.setattr(demo_module, "run_demo", tiny_demo)
    out = tmp_path / "demo"
    first = _invoke(["demo", "--out", str(out), "--threads", "1"])
    assert first.exit_code == 0, first.output
    for path in (
        "classifier/model.pt",
        "generators/generators.pt",
        "evaluation/counterfactual.json",
        "evaluation/report.html",
    ):
        assert (out / path).is_file(), path
    assert "1/3 classifier" in first.output and "3/3 evaluation" in first.output
    second = _invoke(["demo", "--out", str(out), "--threads", "1"])
    assert second.exit_code == 0, second.output
    assert "classifier reused" in second.output and "already trained" in second.output
