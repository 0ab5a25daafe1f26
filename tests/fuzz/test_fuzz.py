"""The short, seeded fuzz run of ``make test`` (issue 19): every target on its seed corpus
and on seeded mutations of it (hypothesis, derandomized: the same inputs on every run),
plus a few hundred coverage-guided inputs through the atheris harness that ``make fuzz``
runs for minutes. A finding fails the test with the input's kind and message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.corpus import seeds
from tests.fuzz.targets import TARGETS, warm_up

ROOT = Path(__file__).resolve().parents[2]
#: Mutated inputs per target in the suite (``make fuzz`` runs minutes per target).
EXAMPLES = {"load_dicom": 40, "trust_config": 12}

_OPS = st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"])


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    """Apply byte edits at positions taken modulo the length: the mutations libFuzzer
    would start with."""
    out = bytearray(data)
    for op, where, value in edits:
        n = len(out)
        i = where % (n + 1)
        if op == "flip" and n:
            out[i % n] ^= 1 << (value % 8)
        elif op == "set" and n:
            out[i % n] = value
        elif op == "insert":
            out[i:i] = bytes([value]) * (1 + value % 8)
        elif op == "delete" and n:
            del out[i % n : i % n + 1 + value % 16]
        elif op == "truncate":
            del out[i:]
        elif op == "duplicate" and n:
            start = i % n
            out[start:start] = out[start : start + 1 + value % 64]
    return bytes(out)


@pytest.mark.parametrize("name", list(TARGETS))
def test_seed_corpus_passes_the_oracle(name):
    corpus = seeds(name)
    assert corpus, f"no seeds for {name}"
    warm_up(name, corpus)
    for data in corpus:
        TARGETS[name](data)


@pytest.mark.parametrize("name", list(TARGETS))
def test_seeded_mutations_pass_the_oracle(name):
    corpus = seeds(name)
    warm_up(name, corpus)

    @settings(
        max_examples=EXAMPLES.get(name, 60),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        index=st.integers(0, len(corpus) - 1),
        edits=st.lists(st.tuples(_OPS, st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
    )
    def check(index: int, edits: list[tuple[str, int, int]]) -> None:
        TARGETS[name](mutate(corpus[index], edits))

    check()


@pytest.mark.parametrize("name", ["rle"])
def test_atheris_harness_runs_a_seeded_burst(tmp_path, name):
    """The coverage-guided harness of ``make fuzz``: a few hundred inputs, seed 1."""
    env = {**os.environ, "FUZZ_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    done = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.atheris_main", name, "-runs=400", "-seed=1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Done 400 runs" in done.stderr, done.stderr[-2000:]
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["findings"] == {}, summary
    assert not list((tmp_path / name / "findings").iterdir())
