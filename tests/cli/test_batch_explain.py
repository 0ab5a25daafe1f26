"""``trustmap explain`` on a folder of 20 DICOMs: 20 cases and a gallery; killed and
resumed it recomputes nothing already written; a changed input recomputes that case."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from trustmap import batch
from trustmap.cli.main import app
from trustmap.samples import sample

runner = CliRunner()
METHODS = "gradient,grad_cam"


def _dicoms(folder, n=20, series=False):
    folder.mkdir()
    template = pydicom.dcmread(sample("ct_nodule.dcm"))
    rng = np.random.default_rng(0)
    base = template.pixel_array.astype(np.int16)
    for i in range(n):
        ds = template.copy()
        noise = rng.integers(-40, 40, base.shape).astype(np.int16)
        ds.PixelData = (base + noise).tobytes()
        ds.SOPInstanceUID = f"{template.SOPInstanceUID}.{i + 1}"
        if series:  # slices of one volume
            ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        else:  # 20 separate exams
            ds.SeriesInstanceUID = f"{template.SeriesInstanceUID}.{i + 1}"
        ds.save_as(folder / f"case{i:02d}.dcm", enforce_file_format=True)
    return folder


def _explain(folder, out, *extra):
    args = ["explain", "--model", "tests.cli.factory:build", "--input", str(folder)]
    args += ["--method", METHODS, "--window", "lung", "--size", "16", "--out", str(out), *extra]
    return runner.invoke(app, args, terminal_width=200)


def test_folder_of_20_dicoms_gallery_and_resume(tmp_path, monkeypatch):
    folder = _dicoms(tmp_path / "cases")
    out = tmp_path / "out"

    # Killed after 7 cases: the 8th call raises as Ctrl-C would.
    real = batch.explain_batch
    seen: list[str] = []

    def interrupted(*args, **kwargs):
        def on_case(i, case, status):
            if i == 7:
                raise KeyboardInterrupt
            seen.append(status)

        kwargs["on_case"] = on_case
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "explain_batch", interrupted)
    result = _explain(folder, out)
    assert result.exit_code != 0
    monkeypatch.setattr(batch, "explain_batch", real)
    done = sorted(p.name for p in (out / "cases").iterdir())
    assert done == [f"case{i:02d}" for i in range(7)]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*.npy")}

    result = _explain(folder, out)
    assert result.exit_code == 0, result.output
    assert "13 case(s) explained, 7 reused" in result.output
    cases = sorted(p.name for p in (out / "cases").iterdir())
    assert cases == [f"case{i:02d}" for i in range(20)]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "resume recomputed a map"
    gallery = (out / "gallery.html").read_text()
    assert gallery.count("<tr data-id=") == 20
    assert 'data-key="agree"' in gallery and 'data-key="pred"' in gallery
    rows = json.loads((out / "gallery.json").read_text())["cases"]
    assert all(0 <= r["agreement"] <= 1 for r in rows)
    for r in rows:
        for m in ("gradient", "grad_cam"):
            assert (out / r["methods"][m]["overlay"]).is_file()

    # A third run recomputes nothing; a changed input recomputes exactly that case.
    assert "0 case(s) explained, 20 reused" in _explain(folder, out).output
    ds = pydicom.dcmread(folder / "case05.dcm")
    ds.PixelData = (ds.pixel_array.astype(np.int16) + 200).tobytes()
    ds.save_as(folder / "case05.dcm", enforce_file_format=True)
    result = _explain(folder, out)
    assert "1 case(s) explained, 19 reused" in result.output, result.output
    # other settings recompute everything
    assert "20 case(s) explained" in _explain(folder, out, "--param", "grad_cam.relu=False").output


def test_csv_and_dicom_series_cases(tmp_path):
    series = _dicoms(tmp_path / "series", n=3, series=True)
    assert not batch.is_batch(series), "one series folder is one (3D) case"
    parent = tmp_path / "many"
    parent.mkdir()
    series.rename(parent / "patient1")
    (parent / "extra.npy").write_bytes(b"")  # a file case next to a series case
    cases = batch.find_cases(parent)
    assert [c.id for c in cases] == ["extra", "patient1"]
    table = tmp_path / "list.csv"
    table.write_text("image,id\nmany/extra.npy,first\n")
    assert [(c.id, c.path.name) for c in batch.find_cases(table)] == [("first", "extra.npy")]
    table.write_text("path\nx.png\n")
    with pytest.raises(ValueError, match="column 'image'"):
        batch.find_cases(table)
