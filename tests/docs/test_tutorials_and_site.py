"""The three tutorials run as written, and the documentation site builds without a warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))


def run_markdown(path: Path, workdir: Path) -> dict:
    """Execute the ``python`` blocks of a markdown page in order, in one namespace (as the
    notebook jupytext makes of it would), inside ``workdir``."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path.name} has no python block"
    namespace: dict = {"__name__": "__tutorial__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
    return namespace


def test_three_tutorials_exist():
    assert [p.name for p in TUTORIALS] == ["explain-2d.md", "explain-3d.md", "trust-your-data.md"]


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRUSTMAP_CACHE", str(tmp_path / "cache"))
    ns = run_markdown(path, tmp_path)
    if path.stem == "explain-2d":
        assert {"grad_cam", "integrated_gradients", "smoothgrad"} <= set(ns["maps"])
        assert (tmp_path / "all.png").is_file()
    elif path.stem == "explain-3d":
        assert tuple(ns["cam"].shape) == (1, 1, 32, 32, 32)
        assert (tmp_path / "results3d" / "grad_cam.nii.gz").is_file()
    else:
        assert (tmp_path / "trust_tutorial" / "report.html").is_file()
        assert set(ns["result"].summary["verdicts"]) == {"gradient", "grad_cam"}


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        # Material for MkDocs prints an end-of-life banner that is not about our docs.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, result.stderr
    page = (tmp_path / "site" / "guides" / "choose-a-method" / "index.html").read_text()
    assert "did not pass" in page or "pass" in page  # the verdicts table, from trust.json
    assert "integrated_gradients" in page
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "open_model" in api
