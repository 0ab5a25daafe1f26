"""``create_study`` and ``trustmap study``: the drawn cases, the blinded layout, the study
file, and one clear line for every bad input."""

from __future__ import annotations

import json
import socket
import sqlite3

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.study.conftest import METHODS
from trustmap.cli.main import app
from trustmap.study import Study
from trustmap.study.design import parse_criteria, parse_scale, rating_layout

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, ["study", *map(str, args)], terminal_width=200)


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output


def test_cases_are_correct_and_balanced_and_the_file_is_complete(study, trained_model):
    st = Study.open(study.path)
    assert st.meta["design"] == "rating" and st.meta["methods"] == METHODS
    labels = [c["label"] for c in study.cases]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    assert all(c["label"] == c["predicted"] for c in study.cases)
    con = st.con
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 6 * (len(METHODS) + 1)
    # 4 readers x 6 cases x 3 criteria questions, each with one panel per method.
    assert con.execute("SELECT COUNT(*) FROM questions").fetchone()[0] == 4 * 6 * 3
    assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 4 * 6 * 3 * 3
    key = st.blinding_key(study.admin_key)
    assert sorted(v for v in key.values() if v) == sorted(METHODS * 6)
    with pytest.raises(ValueError, match="wrong admin key"):
        st.blinding_key("not-the-key")
    # Which panel shows which method is nowhere in the file in the clear: the method
    # names appear only in the study's settings (its list of methods), not in any table
    # that links them to images, questions or answers.
    for table in ("cases", "images", "readers", "questions", "items"):
        dump = repr(con.execute(f"SELECT * FROM {table}").fetchall())
        assert not any(m in dump for m in METHODS), table
    blob = json.loads(con.execute("SELECT value FROM meta WHERE key='blinding_key'").fetchone()[0])
    assert not any(m in blob for m in METHODS)
    assert (study.path.parent / "ADMIN_KEY").stat().st_mode & 0o077 == 0


def test_the_layout_randomizes_per_reader_and_question_and_reverses_variant_b():
    plan = rating_layout(5, 4, 4, ["a", "b"], seed=1)
    by_reader = {r: [q for q in plan if q.reader == r] for r in range(4)}
    for qs in by_reader.values():
        assert sorted((q.case, q.criterion) for q in qs) == sorted(
            (c, k) for c in range(5) for k in "ab"
        )
        assert all(sorted(q.slots) == [0, 1, 2, 3] for q in qs)
    seq = {r: [(q.case, q.criterion) for q in qs] for r, qs in by_reader.items()}
    assert seq[0] == seq[2] and seq[1] == seq[0][::-1] == seq[3]  # variants A, B, A, B
    slots = [tuple(q.slots for q in by_reader[r]) for r in range(4)]
    assert len(set(slots)) == 4  # each reader has their own panel orders
    firsts = [q.slots[0] for q in plan]
    assert len(set(firsts)) == 4  # every method is shown first somewhere
    assert rating_layout(5, 4, 4, ["a", "b"], seed=1) == plan  # seeded


def test_reader_performance_arms_rotate_over_cases_and_readers(trained_model, tmp_path):
    from trustmap.study import create_study

    data, run = trained_model
    made = create_study(
        tmp_path / "rp",
        methods=["grad_cam"],
        dataset=data,
        model=run,
        n_cases=6,
        n_readers=3,
        design="reader-performance",
    )
    st = Study.open(made.path)
    assert st.meta["arms"] == ["image", "prediction", "map:grad_cam"]
    rows = st.con.execute(
        "SELECT reader_id, case_id, show_prediction, ref_image FROM questions"
    ).fetchall()
    key = st.blinding_key(made.admin_key)
    arm = {}
    for reader, case, pred, ref in rows:
        arm[reader, case] = "map" if key[ref] else ("prediction" if pred else "image")
    for case in range(6):  # 3 readers, 3 arms: every case read once in every arm
        assert sorted(arm[r, case] for r in range(3)) == ["image", "map", "prediction"]
    for r in range(3):
        counts = [list(arm[r, c] for c in range(6)).count(a) for a in ("image", "map")]
        assert counts == [2, 2]

    # Readers answer: right whenever a map or the prediction is shown, wrong on every
    # second image-alone reading; the analysis must give exactly these accuracies.
    from trustmap.study.report import analyze_study

    labels = dict(st.con.execute("SELECT case_id, label FROM cases"))
    items = st.con.execute(
        "SELECT i.item_id, i.field, q.reader_id, q.case_id FROM items i "
        "JOIN questions q ON q.question_id = i.question_id"
    ).fetchall()
    truth = {}
    for item, field, reader, case in items:
        a = arm[reader, case]
        right = a != "image" or (reader + case) % 2 == 0
        truth[reader, case] = (a, right)
        value = labels[case] if right else 1 - labels[case]
        if field == "confidence":
            value = 5 if a == "map" else 3
        st.save_answer(reader, item, value, 1000.0 + 500 * (a == "map"))
    result = analyze_study(made.path.parent, tmp_path / "rp_an", n_boot=200)
    table = result.analysis.table
    for name, key in (("image", "image"), ("prediction", "prediction"), ("map:grad_cam", "map")):
        rights = [ok for (a, ok) in truth.values() if a == key]
        assert table[name]["correct"]["mean"] == pytest.approx(sum(rights) / len(rights))
        assert table[name]["n"] == len(rights)
    assert table["map:grad_cam"]["confidence"]["mean"] == 5
    assert table["map:grad_cam"]["time_ms"]["mean"] == 1500
    assert "accuracy" in (tmp_path / "rp_an" / "report.html").read_text()


def test_criteria_and_scale_parsing():
    assert [c.name for c in parse_criteria(None)] == [
        "intuitive_validity",
        "semantic_meaningfulness",
        "image_quality",
    ]
    custom = parse_criteria("localization,Sharpness=Is the map sharp?")
    assert custom[1].name == "sharpness" and custom[1].prompt == "Is the map sharp?"
    with pytest.raises(ValueError, match="did you mean 'intuitive_validity'"):
        parse_criteria("intuitive_valdity")
    with pytest.raises(ValueError, match="twice"):
        parse_criteria("trust,trust")
    assert parse_scale("1..5").values == [1, 2, 3, 4, 5]
    for bad in ("4,-4", "-10,3", "a,b"):
        with pytest.raises(ValueError):
            parse_scale(bad)


def test_bad_inputs_give_one_clear_line(trained_model, study, tmp_path):
    data, run = trained_model
    base = ["create", "--dataset", data, "--model", run, "--readers", 2]
    _one_line_error(
        _invoke(*base, "--methods", "", "--out", tmp_path / "a"), "method list is empty"
    )
    _one_line_error(
        _invoke(*base, "--methods", "grad_cam,saliency", "--cases", 500, "--out", tmp_path / "b"),
        "correctly classified",
        "--cases 500",
    )
    _one_line_error(
        _invoke(
            *base,
            "--methods",
            "grad_cam,saliency",
            "--criteria",
            "intutive_validity",
            "--out",
            tmp_path / "c",
        ),
        "unknown criterion",
        "did you mean 'intuitive_validity'",
    )
    _one_line_error(
        _invoke(*base, "--methods", "grad_cam,salency", "--out", tmp_path / "d"),
        "did you mean 'saliency'",
    )
    _one_line_error(
        _invoke(*base, "--methods", "grad_cam,saliency", "--out", study.path.parent),
        "already holds a study",
    )
    for name in "abcd":
        assert not (tmp_path / name / "study.sqlite").exists()


def test_a_study_file_from_a_newer_version_is_refused(study_copy):
    con = sqlite3.connect(study_copy / "study.sqlite")
    con.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    con.commit()
    con.close()
    for args in (
        ("status", study_copy),
        ("serve", study_copy, "--port", 0),
        ("analyze", study_copy, "--out", study_copy / "x"),
    ):
        _one_line_error(_invoke(*args), "newer trustmap", "version 99")


def test_a_file_that_is_no_study_is_refused(tmp_path):
    (tmp_path / "study.sqlite").write_bytes(b"not a database at all")
    _one_line_error(_invoke("status", tmp_path), "not a trustmap study")


def test_a_port_in_use_gives_one_line(study):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        _one_line_error(
            _invoke("serve", study.path.parent, "--port", port), f"port {port}", "in use"
        )


def test_create_prints_links_and_analyze_writes_the_report(trained_model, tmp_path):
    data, run = trained_model
    out = tmp_path / "s"
    made = _invoke(
        "create",
        "--methods",
        "grad_cam,saliency",
        "--dataset",
        data,
        "--model",
        run,
        "--cases",
        4,
        "--readers",
        3,
        "--out",
        out,
        "--base-url",
        "http://example.test:9",
    )
    assert made.exit_code == 0, made.output
    assert made.output.count("http://example.test:9/r/") == 3 and "admin key" in made.output
    urls = _invoke("urls", out, "--base-url", "http://h:1")
    assert urls.exit_code == 0 and urls.output.count("http://h:1/r/") == 3
    links = [line.split()[-1] for line in made.output.splitlines() if "/r/" in line]
    assert [u.rsplit("/", 1)[1] for u in links] == [
        line.rsplit("/", 1)[1] for line in urls.output.splitlines()
    ]
    result = _invoke(
        "analyze",
        out,
        "--out",
        tmp_path / "an",
        "--simulate",
        3,
        "--effect",
        "grad_cam=2",
        "--n-boot",
        200,
    )
    assert result.exit_code == 0, result.output
    assert (
        "simulated readers" in result.output and "power over 3 simulated studies" in result.output
    )
    html = (tmp_path / "an" / "report.html").read_text()
    for text in (
        "Table 2",
        "Table 3",
        "Table 4",
        "Figure 7",
        "Figure 8",
        "Figure 9",
        "KMO",
        "ICC(2,1)",
        "SIMULATED",
    ):
        assert text in html, text
    doc = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert doc["simulated"] and doc["analysis"]["z"]["best"]["intuitive_validity"] == "grad_cam"
    assert Study.open(out).progress()[0]["answered"] == 0  # the real study is untouched
    _one_line_error(
        _invoke("analyze", out, "--out", tmp_path / "x", "--admin-key", "nope"), "wrong admin key"
    )
    np.testing.assert_equal((tmp_path / "an" / "table2_raw.csv").exists(), True)
