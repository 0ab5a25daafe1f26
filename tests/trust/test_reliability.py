"""The trust protocol's config checks, resumable cache and run lock (issue 19)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.models._toy import ToyDataset, write_toy_dir
from tests.trust.test_protocol import tiny_config
from trustmap.trust import run
from trustmap.trust.cache import Store, weights_hash

ROOT = Path(__file__).resolve().parents[2]


def params(method: str, **values: object) -> dict:
    return {"method_params": {method: values}}


# -- defect 7: values checked before any work -------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"method_params": {"integrated_gradients": {"n_steps": -1}}},
            "integrated_gradients: n_steps",
        ),
        ({"method_params": {"smoothgrad": {"variant": "median"}}}, "smoothgrad: variant"),
        (
            {"method_params": {"smoothgrad": {"noise_level": float("nan")}}},
            "noise_level must be a finite",
        ),
        (
            {"method_params": {"grad_cam": {"layer": "nope"}}},
            r"grad_cam.layer: models.A .* no layer",
        ),
        ({"randomization": {"stages": [["nope"]]}}, r"randomization.stages \(models.A\)"),
        (
            {"randomization": {"independent": "no"}},
            "randomization.independent must be true or false",
        ),
        ({"faithfulness": {"enabled": "no"}}, "faithfulness.enabled must be true or false"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"randomization": {"seed": -5}}, "randomization.seed must be a non-negative"),
        ({"models": {"A": {"seeds": [0, -1]}}}, r"models.A.seeds must be a non-negative"),
        (
            {"models": {"A": {"kwargs": {"widht": 3}}}},
            r"models.A.kwargs: small_cnn cannot be built",
        ),
        ({"models": {"B": {"kwargs": {"widen_factor": "wide"}}}}, r"models.B.kwargs"),
        ({"postprocess": {"absolute": "no"}}, "absolute must be True or False, got 'no'"),
        ({"training": {"amp": "no"}}, "training.amp must be true or false"),
        # Found by `make fuzz`: pathlib raised RuntimeError for a ~user that does not exist.
        ({"dataset": "~nosuchuser19/data"}, "dataset: '~nosuchuser19/data' names a home"),
        ({"out": "~nosuchuser19/out"}, "out: '~nosuchuser19/out' names a home"),
    ],
)
def test_values_are_checked_before_any_work(tmp_path, monkeypatch, overrides, message):
    import trustmap.trust.protocol as protocol
    from trustmap.errors import ConfigError

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr(protocol, "prepare", no_work)
    data = write_toy_dir(tmp_path / "toy", n=20, size=32)
    cfg = tiny_config(data, tmp_path / "out")
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
    for method in overrides.get("method_params", {}):
        if method not in cfg["methods"]:
            cfg["methods"] = [*cfg["methods"], method]
    if "models" in overrides:
        cfg["models"] = {
            role: {**cfg["models"][role], **overrides["models"].get(role, {})}
            for role in cfg["models"]
        }
    with pytest.raises(ConfigError, match=message):
        run(cfg)


def test_cli_reports_a_bad_value_in_one_line_before_training(tmp_path):
    from typer.testing import CliRunner

    from trustmap.cli.main import app

    config = tmp_path / "bad.toml"
    config.write_text(
        f'dataset = "{write_toy_dir(tmp_path / "toy", n=20, size=32)}"\n'
        f'out = "{tmp_path / "out"}"\n[method_params.integrated_gradients]\nn_steps = -1\n'
    )
    result = CliRunner().invoke(app, ["trust", "--config", str(config)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "n_steps must be a positive integer" in lines[0]
    assert not (tmp_path / "out" / "models").exists()


# -- defect 12: a damaged cache file is recomputed ----------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_an_npz_member"])
def test_truncated_cache_file_is_recomputed(tmp_path, damage):
    store = Store(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"maps": np.arange(1000, dtype=np.float32).reshape(10, 100)}

    first = store.arrays("maps", "k", compute)
    path = tmp_path / "maps" / "k.npz"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("maps.npy", b"not an array")
    again = store.arrays("maps", "k", compute)
    assert len(calls) == 2
    np.testing.assert_array_equal(again["maps"], first["maps"])
    assert store.arrays("maps", "k", compute)["maps"].shape == (10, 100) and len(calls) == 2


# -- defect 11: trained and reloaded models compute the same maps --------------------------------


def test_trained_model_is_returned_in_the_format_its_checkpoint_reloads(tmp_path):
    from trustmap.models import TrainConfig, load_checkpoint, train_classifier

    config = TrainConfig(epochs=1, batch_size=16, n_boot=10, size=32, model_kwargs={"width": 4})
    result = train_classifier(
        ToyDataset(n=40, size=32), "small_cnn", out=tmp_path, seed=0, config=config
    )
    reloaded, _ = load_checkpoint(result.checkpoint)
    assert all(p.is_contiguous() for p in result.model.parameters())
    assert weights_hash(result.model) == weights_hash(reloaded)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    import trustmap

    a = trustmap.explain(result.model.eval(), x, "integrated_gradients", target=1, n_steps=8)
    b = trustmap.explain(reloaded.eval(), x, "integrated_gradients", target=1, n_steps=8)
    assert torch.equal(a, b)


def test_memory_format_is_part_of_the_weights_hash():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    before = weights_hash(conv)
    conv = conv.to(memory_format=torch.channels_last)
    assert weights_hash(conv) != before
    assert weights_hash(conv.to(memory_format=torch.contiguous_format)) == before


# -- defect 18: one run per output folder ---------------------------------------------------------


def test_second_run_into_the_same_out_stops_at_once(tmp_path, monkeypatch):
    import trustmap.trust.protocol as protocol
    from trustmap.core.lock import output_lock
    from trustmap.errors import OutputBusyError

    monkeypatch.setattr(protocol, "prepare", lambda *a, **k: pytest.fail("work started"))
    data = write_toy_dir(tmp_path / "toy", n=20, size=32)
    out = tmp_path / "out"
    with (
        output_lock(out, "trustmap trust (first)"),
        pytest.raises(OutputBusyError, match=r"another trustmap run .*trustmap trust \(first\)"),
    ):
        run(tiny_config(data, out))


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    from trustmap.core.lock import output_lock

    out = tmp_path / "out"
    code = (
        "import sys, time; from trustmap.core.lock import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        from trustmap.errors import OutputBusyError

        with pytest.raises(OutputBusyError, match=f"process {child.pid}"), output_lock(out):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with output_lock(out):  # a killed holder leaves no stale lock
        pass


def test_training_into_a_locked_folder_stops_at_once(tmp_path):
    from trustmap.core.lock import output_lock
    from trustmap.errors import OutputBusyError
    from trustmap.models import TrainConfig, train_classifier

    with output_lock(tmp_path), pytest.raises(OutputBusyError):
        train_classifier(
            ToyDataset(n=20, size=16),
            "small_cnn",
            out=tmp_path,
            config=TrainConfig(epochs=1, batch_size=8, n_boot=5),
        )
    assert not (tmp_path / "last.pt").exists()


# -- the interrupt/resume identity ------------------------------------------------------------

#: Where the interrupted run is killed, one moment per attempt, spread over the run: during
#: the training of the first model, before model B, before the second localizer, during the
#: randomization maps and during the faithfulness metrics.
KILL_AT = [
    ("train A1", 1),
    ("model B", None),
    ("model L2", None),
    ("cascading randomization:", None),
    ("faithfulness:", None),
]
#: results.json entries that measure the run itself rather than its results.
VOLATILE = ("timings", "cache", "run_time")


def _stable(results_json: Path) -> dict:
    results = json.loads(results_json.read_text())
    for key in VOLATILE:
        results.pop(key, None)
    for info in results.get("models", {}).values():
        info.pop("seconds", None)
        info.pop("reused", None)
    return results


def _attempt(config: Path, kill_at: tuple[str, int | None] | None) -> bool:
    """Run the child; kill it (SIGKILL) at ``kill_at``. True if it was killed there."""
    path = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_interrupted_child.py")), str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    killed = False
    try:
        for line in child.stdout:
            if kill_at is None or not line.startswith("PROGRESS"):
                continue
            _, text, done, _ = line.rstrip("\n").split("\t")
            prefix, at = kill_at
            if text.startswith(prefix) and (at is None or int(done) >= at):
                child.send_signal(signal.SIGKILL)
                killed = True
                break
    finally:
        child.wait(timeout=900)
    if not killed:
        assert child.returncode == 0, child.stderr.read()
    return killed


@pytest.mark.slow
def test_interrupted_runs_resume_to_byte_identical_results(tmp_path):
    data = write_toy_dir(tmp_path / "toy", n=60, size=32)
    out = tmp_path / "out"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(data, out)))
    assert not _attempt(config, None)
    reference = tmp_path / "reference"
    out.rename(reference)

    kills = [_attempt(config, moment) for moment in KILL_AT]
    assert all(kills), f"the run ended before these moments: {kills}"
    assert not (out / "results.json").exists()
    assert not _attempt(config, None)

    assert (out / "per_image.csv").read_bytes() == (reference / "per_image.csv").read_bytes()
    assert _stable(out / "results.json") == _stable(reference / "results.json")
    stable = json.dumps(_stable(out / "results.json"), sort_keys=True)
    assert stable == json.dumps(_stable(reference / "results.json"), sort_keys=True)
