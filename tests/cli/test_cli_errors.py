"""Every bad input to a command ends in one line on stderr and exit status 2; anything
else is a bug, reported in one line with the traceback saved to a file (issue 19)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from trustmap.cli.main import app

runner = CliRunner()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.npy"
    np.save(path, np.random.default_rng(0).random((16, 16)).astype(np.float32))
    return path


def explain(image, out, *extra, model="tests.cli.factory:build", method="gradient"):
    args = ["explain", "--model", model, "--input", str(image), "--out", str(out)]
    return runner.invoke(app, [*args, "--method", method, *extra])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output


# -- defect 6: model/input mismatches ------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "extra", "fragments"),
    [
        ("tests.cli.factory:pair", [], ["must return a tensor", "tuple"]),
        ("tests.cli.factory:build", ["--channels", "3"], ["conv1", "expects 1 input channel"]),
        ("tests.cli.factory:three_channels", [], ["conv1", "expects 3 input channel"]),
        ("tests.cli.factory:build", ["--size", "0"], ["size must be a positive integer"]),
        ("tests.cli.factory:broken", [], ["factory", "weights server is unreachable"]),
        ("tests.cli.factory:crashing", [], ["model fails on the input", "feature_cache"]),
    ],
)
def test_model_input_mismatch_is_one_line(tmp_path, image, model, extra, fragments):
    out = tmp_path / "out"
    result = explain(image, out, *extra, model=model)
    assert_one_line_error(result, *fragments)
    assert not (out / "summary.json").exists()


def test_3d_input_to_a_2d_model(tmp_path):
    import nibabel as nib

    src = tmp_path / "vol.nii.gz"
    volume = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), src)
    result = explain(src, tmp_path / "out")
    assert_one_line_error(result, "the model is 2D", "3D")


# -- defect 15: errors that exited 1 with nothing on stderr --------------------------------


def test_target_out_of_range_for_the_model(tmp_path, image):
    result = explain(
        image, tmp_path / "out", "--target", "5", model="tests.cli.factory:two_classes"
    )
    assert_one_line_error(result, "target 5", "out of range")
    assert not (tmp_path / "out" / "gradient.npy").exists()


def test_bad_parameter_value(tmp_path, image):
    result = explain(image, tmp_path / "out", "-p", "n_steps=-1", method="integrated_gradients")
    assert_one_line_error(result, "integrated_gradients", "n_steps must be a positive integer")


# -- defect 5 and 17: --out ------------------------------------------------------------------


def test_out_that_is_a_file(tmp_path, image):
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    assert_one_line_error(explain(image, taken), "is an existing file")
    assert taken.read_text() == "x"


def test_out_below_a_file(tmp_path, image):
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    assert_one_line_error(explain(image, taken / "sub"), "cannot be written")


def test_out_in_a_folder_that_cannot_be_written(tmp_path, image):
    # /proc refuses new files, for root too; a read-only folder for other users.
    target = Path("/proc/trustmap-out") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
    assert_one_line_error(explain(image, target), "cannot be written")


def test_out_root(image, monkeypatch):
    import trustmap.run

    def refuse(*args, **kwargs):  # never write into / should the check be missing
        raise AssertionError("explain would have written into /")

    monkeypatch.setattr(trustmap.run, "explain_image", refuse)
    assert_one_line_error(explain(image, Path("/")), "root of the file system")


@pytest.mark.parametrize("command", ["trust", "train", "data"])
def test_every_command_checks_out_before_any_work(tmp_path, command, monkeypatch):
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    args = {
        "trust": ["trust", "--out", str(taken)],
        "train": ["train", "--out", str(taken), "--dataset", "cxr-pneumothorax"],
        "data": ["data", "make", "cxr-pneumothorax", "--out", str(taken)],
    }[command]
    # Any work would need the phantom cache or training; make it fail loudly instead.
    monkeypatch.setenv("TRUSTMAP_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, args)
    assert_one_line_error(result, "is an existing file")
    assert not (tmp_path / "cache").exists()


# -- the mapping of everything else ----------------------------------------------------------


def test_internal_error_asks_for_a_report_and_saves_the_traceback(tmp_path, image, monkeypatch):
    import trustmap.run

    def bug(*args, **kwargs):
        raise ZeroDivisionError("an internal slip")

    monkeypatch.setattr(trustmap.run, "explain_image", bug)
    monkeypatch.setenv("TRUSTMAP_CACHE", str(tmp_path / "cache"))
    result = explain(image, tmp_path / "out")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "please report" in lines[0] and "ZeroDivisionError" in lines[0]
    assert "Traceback" not in result.output
    saved = re.search(r"traceback is in (\S+)", lines[0]).group(1)
    text = Path(saved).read_text()
    assert "Traceback" in text and "an internal slip" in text and "def bug" not in lines[0]
    assert Path(saved).parent == tmp_path / "cache" / "crash-reports"


def test_every_documented_error_type_maps_to_exit_2(tmp_path, image, monkeypatch):
    import trustmap.run
    from trustmap import errors

    for cls in (
        errors.InputError,
        errors.DataError,
        errors.ConfigError,
        errors.ModelError,
        errors.OutputBusyError,
        errors.InputTypeError,
        errors.ModelTypeError,
        errors.MissingFileError,
    ):

        def raise_it(*args, cls=cls, **kwargs):
            raise cls(f"a {cls.__name__} message\nover two lines")

        monkeypatch.setattr(trustmap.run, "explain_image", raise_it)
        result = explain(image, tmp_path / "out")
        assert_one_line_error(result, f"a {cls.__name__} message over two lines")


def test_summary_errors_are_json(tmp_path, image):
    out = tmp_path / "out"
    result = explain(
        image, out, "-p", "integrated_gradients.n_steps=0", method="gradient,integrated_gradients"
    )
    assert result.exit_code == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["gradient"]["error"] is None
    assert "n_steps" in summary["methods"]["integrated_gradients"]["error"]
