"""``trustmap train`` end to end on a tiny dataset folder, through typer's runner."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from tests.models._toy import write_toy_dir
from trustmap.cli.train import train
from trustmap.models import load_checkpoint

runner = CliRunner()
app = typer.Typer()
app.command()(train)

FAST = ["--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_toy_dir(tmp_path_factory.mktemp("data") / "toyset", n=60, size=24)


def test_train_classifier_writes_checkpoint_card_and_resumes(dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", str(dataset), "--out", str(out), "--seed", "3", *FAST, "-m", "width=4"]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "test roc_auc" in result.output and "confusion" in result.output
    card = json.loads((out / "model_card.json").read_text())
    assert card["arch"] == "small_cnn" and card["seed"] == 3 and card["epochs_run"] == 2
    assert card["dataset"]["path"] == str(dataset)
    for f in card["findings"]:
        assert f["id"] in result.output
    _, info = load_checkpoint(out / "model.pt")
    assert info["create_kwargs"] == {"width": 4}
    assert (out / "learning_curves.png").exists() and (out / "model_card.md").exists()
    again = runner.invoke(app, args, terminal_width=200)
    assert again.exit_code == 0, again.output
    assert "already trained" in again.output


def test_train_localizer_flag_trains_a_unet(dataset, tmp_path):
    out = tmp_path / "loc"
    args = ["--dataset", str(dataset), "--out", str(out), "--localizer", "--amp", *FAST]
    args += ["-m", "channels=(4, 8)", "-m", "strides=(2,)", "-m", "num_res_units=0"]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model_card.json").read_text())
    assert card["arch"] == "unet" and card["kind"] == "localizer" and card["config"]["amp"]
    assert "test dice" in result.output and "test auprc" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "resnet"], "unknown architecture 'resnet'"),
        (["--arch", "small_cnn", "--dataset", "no-such-data"], "unknown dataset 'no-such-data'"),
        (["--localizer", "--arch", "resnet18"], "--localizer trains unet, attention_unet"),
        (["-m", "width"], "must look like name=value"),
        (["--device", "tpu"], "device"),
    ],
)
def test_errors_exit_2_with_a_message(dataset, tmp_path, extra, message):
    args = ["--dataset", str(dataset), "--out", str(tmp_path / "x"), *FAST, *extra]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")
