"""Shared fixtures of the reader-study tests: a tiny trained classifier, a study built on
it, a server in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models._toy import write_toy_dir

METHODS = ["grad_cam", "saliency", "integrated_gradients"]


def make_trained_model(root: Path) -> tuple[Path, Path]:
    """A toy dataset folder (24 test images) and a small_cnn that separates it (~5 s)."""
    from trustmap.models.training import TrainConfig, train_classifier

    data = write_toy_dir(root / "toy", n=120, size=24)
    config = TrainConfig(
        epochs=3,
        batch_size=8,
        lr=1e-2,
        model_kwargs={"width": 4},
        n_boot=50,
        eval_batch_size=64,
        patience=None,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_classifier(data, "small_cnn", out=root / "run", seed=0, config=config)
    finally:
        torch.set_num_threads(threads)
    return data, root / "run"


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    return make_trained_model(tmp_path_factory.mktemp("study_model"))


@pytest.fixture(scope="session")
def study(trained_model, tmp_path_factory):
    """A rating study: 6 cases, 3 methods, 4 readers (read-only: copy it to write)."""
    from trustmap.study import create_study

    data, run = trained_model
    out = tmp_path_factory.mktemp("study") / "study"
    return create_study(
        out, methods=METHODS, dataset=data, model=run, n_cases=6, n_readers=4, seed=3
    )


@pytest.fixture
def study_copy(study, tmp_path):
    """A writable copy of :func:`study` (file and admin key)."""
    from trustmap.study.create import copy_study

    (tmp_path / "s").mkdir()
    copy_study(study.path, tmp_path / "s" / "study.sqlite")
    return tmp_path / "s"


def start_server(study_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``trustmap study serve`` in a subprocess on a free loopback port; returns the
    process and its base URL once it listens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trustmap.cli.main", "study", "serve", str(study_dir)]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    match = re.search(r"on (http://\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line}{proc.stdout.read()}")
    return proc, match.group(1)


@pytest.fixture
def live_server(study_copy):
    """A real server (uvicorn in a subprocess) on a copy of the study."""
    proc, base = start_server(study_copy)
    try:
        yield study_copy, base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if proc.stdout:
            proc.stdout.close()
