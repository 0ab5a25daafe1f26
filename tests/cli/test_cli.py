"""The command line, driven through typer's runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import trustmap
from trustmap.cli.main import app

runner = CliRunner()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.npy"
    np.save(path, np.random.default_rng(0).random((16, 16)).astype(np.float32))
    return path


def test_methods_lists_every_method():
    result = runner.invoke(app, ["methods"], terminal_width=250)
    assert result.exit_code == 0
    for name in trustmap.list_methods():
        assert name in result.output


def test_explain_writes_maps_overlays_and_summary(tmp_path, image):
    out = tmp_path / "out"
    args = [
        "explain",
        "--model",
        "tests.cli.factory:build",
        "--input",
        str(image),
        "--method",
        "gradient,integrated_gradients,grad_cam",
        "--target",
        "1",
        "--out",
        str(out),
        "-p",
        "integrated_gradients.n_steps=5",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"gradient", "integrated_gradients", "grad_cam"}
    assert summary["methods"]["integrated_gradients"]["params"]["n_steps"] == 5
    assert summary["target"] == 1
    assert abs(sum(summary["probabilities"]) - 1) < 1e-5
    for m in summary["methods"].values():
        assert m["error"] is None and m["seconds"] >= 0
        assert (out / m["map_path"]).exists() and (out / m["overlay_path"]).exists()
    grad = np.load(out / "gradient.npy")
    x = torch.from_numpy(np.load(image))[None, None]
    from tests.cli.factory import build

    ref = trustmap.explain(build(), x, "gradient", target=1)[0].numpy()
    assert np.allclose(grad, ref, atol=1e-6)
    assert not list(out.glob("*.tmp*")), "temporary files left behind"


def test_explain_3d_writes_nifti_with_source_affine(tmp_path):
    import nibabel as nib

    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    src = tmp_path / "vol.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), affine), src
    )
    out = tmp_path / "out3d"
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            "tests.cli.factory:build3d",
            "--input",
            str(src),
            "--method",
            "gradient",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = nib.load(out / "gradient.nii.gz")
    assert np.allclose(saved.affine, affine)


def test_resume_skips_finished_methods(tmp_path, image):
    out = tmp_path / "out"
    base = [
        "explain",
        "--model",
        "tests.cli.factory:build",
        "--input",
        str(image),
        "--out",
        str(out),
    ]
    assert runner.invoke(app, [*base, "--method", "gradient"]).exit_code == 0
    first = (out / "gradient.npy").stat().st_mtime_ns
    result = runner.invoke(app, [*base, "--method", "gradient,saliency", "--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "gradient.npy").stat().st_mtime_ns == first
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"gradient", "saliency"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "gradcam"], "did you mean 'grad_cam'"),
        (["--method", "gradient", "--target", "x"], "--target must be an integer"),
        (["--method", "gradient", "-p", "oops"], "name=value"),
    ],
)
def test_explain_errors_are_one_line(tmp_path, image, extra, message):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            "tests.cli.factory:build",
            "--input",
            str(image),
            "--out",
            str(out),
            *extra,
        ],
    )
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (out / "summary.json").exists()


def test_bad_model_specs(tmp_path, image):
    common = ["--input", str(image), "--method", "gradient", "--out", str(tmp_path / "o")]
    for spec, message in [
        ("tests.cli.factory:not_a_model", "not a torch.nn.Module"),
        ("no_such_pkg.mod:f", "cannot import"),
        ("justaname", "package.module:factory"),
    ]:
        result = runner.invoke(app, ["explain", "--model", spec, *common])
        assert result.exit_code == 2, result.output
        assert message in result.output
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    result = runner.invoke(app, ["explain", "--model", str(bad), *common])
    assert result.exit_code == 2 and "TorchScript" in result.output


def test_corrupt_input_file(tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"\x00" * 50)
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            "tests.cli.factory:build",
            "--input",
            str(bad),
            "--method",
            "gradient",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert "scan.dcm" in result.output


def test_torchscript_model(tmp_path, image):
    from tests.cli.factory import build

    scripted = torch.jit.trace(build(), torch.zeros(1, 1, 16, 16))
    path = tmp_path / "m.pt"
    torch.jit.save(scripted, str(path))
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            str(path),
            "--input",
            str(image),
            "--method",
            "gradient,guided_backprop",
            "--out",
            str(out),
        ],
    )
    # gradient works on TorchScript; guided backprop refuses it: recorded, one line on
    # stderr, the exit status of user errors
    assert result.exit_code == 2, result.output
    assert "error: guided_backprop:" in result.stderr and "TorchScript" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["gradient"]["error"] is None
    assert "TorchScript" in summary["methods"]["guided_backprop"]["error"]


def test_demo_runs_on_the_embedded_samples(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--method", "gradient,grad_cam"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert set(index) == {"ct_small", "mr_small", "volume3d"}
    for sample in index:
        assert (out / sample / "grad_cam.png").exists()
        assert index[sample]["errors"] == {}
    assert (out / "volume3d" / "gradient.nii.gz").exists()
    assert (out / "ct_small" / "gradient.npy").exists()
