"""``trustmap explain --resume`` reuses a map only for the same input, weights, method and
parameters, and recomputes damaged files (issue 19, defects 1 and 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import trustmap
from tests.cli.factory import build
from trustmap.cli.main import app

runner = CliRunner()


def write_image(path, seed):
    np.save(path, np.random.default_rng(seed).random((16, 16)).astype(np.float32))
    return path


def explain(image, out, *extra, method="gradient"):
    args = ["explain", "--model", "tests.cli.factory:build", "--input", str(image)]
    result = runner.invoke(app, [*args, "--out", str(out), "--method", method, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def expected(image, method="gradient", **params):
    x = torch.from_numpy(np.load(image))[None, None]
    return trustmap.explain(build(), x, method, **params)[0].numpy()


def test_resume_with_another_input_recomputes(tmp_path):
    out = tmp_path / "out"
    first, second = write_image(tmp_path / "a.npy", 0), write_image(tmp_path / "b.npy", 1)
    explain(first, out)
    summary = explain(second, out, "--resume")
    assert summary["input"] == str(second)
    np.testing.assert_allclose(np.load(out / "gradient.npy"), expected(second), atol=1e-6)


def test_resume_with_other_parameters_recomputes(tmp_path):
    out = tmp_path / "out"
    image = write_image(tmp_path / "a.npy", 0)
    explain(image, out, "-p", "n_steps=4", method="integrated_gradients")
    summary = explain(image, out, "-p", "n_steps=9", "--resume", method="integrated_gradients")
    assert summary["methods"]["integrated_gradients"]["params"]["n_steps"] == 9
    np.testing.assert_allclose(
        np.load(out / "integrated_gradients.npy"),
        expected(image, "integrated_gradients", n_steps=9),
        atol=1e-5,
    )


def test_resume_with_other_weights_recomputes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    image = write_image(tmp_path / "a.npy", 0)
    explain(image, out)
    import tests.cli.factory as factory

    def other():
        model = build()
        with torch.no_grad():
            model.fc.weight.mul_(-1)
        return model

    monkeypatch.setattr(factory, "build", other)
    explain(image, out, "--resume")
    x = torch.from_numpy(np.load(image))[None, None]
    ref = trustmap.explain(other(), x, "gradient")[0].numpy()
    np.testing.assert_allclose(np.load(out / "gradient.npy"), ref, atol=1e-6)


def test_resume_with_the_same_everything_reuses(tmp_path):
    out = tmp_path / "out"
    image = write_image(tmp_path / "a.npy", 0)
    explain(image, out)
    stamp = (out / "gradient.npy").stat().st_mtime_ns
    summary = explain(image, out, "--resume")
    assert (out / "gradient.npy").stat().st_mtime_ns == stamp
    assert summary["methods"]["gradient"]["key"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:40]),  # truncated
        lambda p: p.write_bytes(b"garbage"),
        lambda p: np.save(p, np.full((1, 16, 16), np.nan, np.float32)),
        lambda p: np.save(p, np.zeros((1, 8, 8), np.float32)),  # another shape
        lambda p: p.unlink(),
    ],
)
def test_resume_recomputes_a_damaged_map(tmp_path, damage):
    out = tmp_path / "out"
    image = write_image(tmp_path / "a.npy", 0)
    explain(image, out)
    damage(out / "gradient.npy")
    explain(image, out, "--resume")
    np.testing.assert_allclose(np.load(out / "gradient.npy"), expected(image), atol=1e-6)


@pytest.mark.parametrize(
    "text", ["", "{", "[]", '{"methods": 3}', '{"methods": {"gradient": 5}}', "\udcff"]
)
def test_resume_recomputes_after_a_damaged_summary(tmp_path, text):
    out = tmp_path / "out"
    image = write_image(tmp_path / "a.npy", 0)
    explain(image, out)
    (out / "summary.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    summary = explain(image, out, "--resume")
    assert summary["methods"]["gradient"]["error"] is None
    np.testing.assert_allclose(np.load(out / "gradient.npy"), expected(image), atol=1e-6)


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    from trustmap.core.lock import output_lock

    out = tmp_path / "out"
    image = write_image(tmp_path / "a.npy", 0)
    with output_lock(out, "trustmap explain (the first run)"):
        args = ["explain", "--model", "tests.cli.factory:build", "--input", str(image)]
        result = runner.invoke(app, [*args, "--out", str(out), "--method", "gradient"])
    assert result.exit_code == 2
    assert "another trustmap run" in result.stderr and "the first run" in result.stderr
    assert not (out / "summary.json").exists()
    explain(image, out)  # released: the next run goes ahead
