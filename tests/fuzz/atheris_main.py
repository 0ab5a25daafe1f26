"""Coverage-guided fuzzing of one target with atheris (``make fuzz`` runs every target).

    python -m tests.fuzz.atheris_main TARGET [libFuzzer flags, e.g. -max_total_time=600]

The seed corpus (:mod:`tests.fuzz.corpus`) is written to ``fuzz_out/<target>/corpus``
(libFuzzer adds the inputs that reach new coverage there). An input that breaks the
oracle (:mod:`tests.fuzz.targets`) does not stop the run: it is saved to
``fuzz_out/<target>/findings/<kind>-<sha1>`` and counted, so that one run reports every
kind of finding. At exit ``fuzz_out/<target>/summary.json`` holds the inputs executed and
the findings per kind (crash, unnamed, invalid, hang).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    import atheris

    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    name = sys.argv.pop(1)
    with atheris.instrument_imports(include=["trustmap", "pydicom", "nibabel"]):
        import nibabel  # noqa: F401
        import pydicom  # noqa: F401

        import trustmap.data.io
        import trustmap.data.labels
        import trustmap.data.loaders
        import trustmap.trust.config  # noqa: F401
    from tests.fuzz.corpus import seeds
    from tests.fuzz.targets import TARGETS, Finding, warm_up

    target = TARGETS[name]
    root = Path(os.environ.get("FUZZ_OUT", "fuzz_out")) / name
    corpus, findings = root / "corpus", root / "findings"
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    for data in seeds(name):
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
    warm_up(name, seeds(name))
    started = time.time()
    stats: dict = {"target": name, "executed": 0, "findings": {}, "seconds": 0.0}
    written = [0.0]

    def report() -> None:
        # libFuzzer ends the process with _exit, past atexit: the summary is rewritten
        # every second while the run goes on.
        stats["seconds"] = round(time.time() - started, 1)
        (root / "summary.json").write_text(json.dumps(stats, indent=2))
        written[0] = time.time()

    atexit.register(report)

    def one(data: bytes) -> None:
        stats["executed"] += 1
        if time.time() - written[0] > 1.0:
            report()
        try:
            target(data)
        except Finding as found:
            stats["findings"][found.kind] = stats["findings"].get(found.kind, 0) + 1
            digest = hashlib.sha1(data).hexdigest()
            (findings / f"{found.kind}-{digest}").write_bytes(data)
            (findings / f"{found.kind}-{digest}.txt").write_text(str(found))

    atheris.Setup([sys.argv[0], *sys.argv[1:], str(corpus)], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
