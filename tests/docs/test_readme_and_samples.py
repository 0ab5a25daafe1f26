"""The README's first Python snippet runs as written; the shipped samples are what
``write_samples`` generates; no user-facing text cites a paper by its file number."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from trustmap.io import load
from trustmap.samples import SAMPLES, sample, write_samples

ROOT = Path(__file__).resolve().parents[2]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.mark.slow
def test_readme_30_second_snippet_runs_as_written(tmp_path, monkeypatch):
    snippet = python_blocks((ROOT / "README.md").read_text())[0]
    assert 'sample("ct_nodule.dcm")' in snippet and "overlay(" in snippet
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert tuple(namespace["cam"].shape) == (1, 1, 128, 128)
    assert (tmp_path / "grad_cam.png").stat().st_size > 1000
    assert 0.0 <= float(namespace["ct"].array.min()) <= float(namespace["ct"].array.max()) <= 1.0


def test_shipped_samples_are_the_generated_ones(tmp_path):
    write_samples(tmp_path)
    for name in SAMPLES:
        shipped, fresh = load(sample(name)), load(tmp_path / name)
        np.testing.assert_array_equal(shipped.array, fresh.array, err_msg=name)
    ct = load(sample("ct_nodule.dcm"))
    assert ct.array.min() < -500 and ct.array.max() > 0, "the CT sample is in Hounsfield units"
    assert load(sample("brain.nii.gz")).array.shape == (32, 32, 32)
    with pytest.raises(ValueError, match=r"did you mean 'brain\.nii\.gz'"):
        sample("brain.nii")


def test_py_typed_ships():
    import trustmap

    assert (Path(trustmap.__file__).parent / "py.typed").is_file()


USER_FACING = ["README.md", "docs", "src/trustmap"]


def test_papers_are_cited_by_authors_not_file_numbers():
    offenders = []
    for root in USER_FACING:
        path = ROOT / root
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if f.suffix not in (".py", ".md", ".html", ".js") or not f.is_file():
                continue
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if re.search(r"\bpapers? 00\d", line):
                    offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:80]}")
    assert not offenders, "cite by authors and year:\n" + "\n".join(offenders[:20])
