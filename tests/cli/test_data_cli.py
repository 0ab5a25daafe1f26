"""``trustmap data make`` through typer's CliRunner (the command's own app)."""

from __future__ import annotations

import csv
import json

import numpy as np
from typer.testing import CliRunner

from trustmap.cli.data import app
from trustmap.data.io import load

runner = CliRunner()


def test_make_writes_a_dataset_and_reports_it(tmp_path):
    out = tmp_path / "ct"
    result = runner.invoke(
        app,
        ["make", "ct-nodule", "--out", str(out), "--n", "20", "--size", "32", "--seed", "4",
         "--shortcut", "0.75", "--difficulty", "hard"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "preview" in result.output and str(out) in result.output
    card = json.loads((out / "dataset.json").read_text())
    assert card["generator"]["seed"] == 4 and card["generator"]["n"] == 20
    assert card["generator"]["difficulty"] == 1.5 and card["shortcut"]["p"] == 0.75
    assert card["image_size"] == [32, 32]
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20
    image = load(out / rows[0]["image"]).array
    assert image.shape == (32, 32) and np.median(image) < -500  # lung parenchyma in HU
    assert (out / "preview.png").is_file()


def test_make_accepts_per_axis_sizes(tmp_path):
    out = tmp_path / "ptx"
    result = runner.invoke(
        app, ["make", "cxr-pneumothorax", "--out", str(out), "--n", "20", "--size", "48x64"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "dataset.json").read_text())["image_size"] == [48, 64]


def test_make_reports_bad_input_on_one_line(tmp_path):
    result = runner.invoke(app, ["make", "ct-nodul", "--out", str(tmp_path / "x"), "--n", "20"])
    assert result.exit_code == 2
    assert "did you mean 'ct-nodule'" in result.output
    assert not (tmp_path / "x").exists()

    full = tmp_path / "full"
    full.mkdir()
    (full / "a.txt").write_text("keep")
    result = runner.invoke(app, ["make", "ct-nodule", "--out", str(full), "--n", "20"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (full / "a.txt").read_text() == "keep"

    result = runner.invoke(
        app, ["make", "ct-nodule", "--out", str(tmp_path / "y"), "--shortcut", "2"]
    )
    assert result.exit_code == 2 and "shortcut" in result.output

    result = runner.invoke(app, ["make", "ct-nodule", "--out", str(tmp_path / "z"), "--size", "a"])
    assert result.exit_code == 2 and "--size" in result.output


def test_measure_auc_writes_the_measured_difficulty_into_the_card(tmp_path):
    out = tmp_path / "ct"
    result = runner.invoke(
        app,
        ["make", "ct-nodule", "--out", str(out), "--n", "60", "--size", "32", "--seed", "1",
         "--measure-auc"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    measured = json.loads((out / "dataset.json").read_text())["measured_auc"]
    assert measured["arch"] == "small_cnn" and measured["seed"] == 1
    assert 0.0 <= measured["ci95"][0] <= measured["test_auc"] <= measured["ci95"][1] <= 1.0
    assert f"{measured['test_auc']:.3f}" in result.output
    assert f"{measured['test_auc']:.3f}" in (out / "DATASET_CARD.md").read_text()
