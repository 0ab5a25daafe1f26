"""``make fuzz``: every fuzz target with atheris for FUZZ_SECONDS each (default 600), one
after another, then a table of inputs executed and findings per target.

    python -m tests.fuzz.campaign [--seconds 600] [--jobs 1] [TARGET ...]

Each target runs in its own process (``tests.fuzz.atheris_main``) with libFuzzer's
``-max_total_time``, ``-timeout`` (a hang is an input over 5 s) and ``-print_final_stats``;
the findings are in ``fuzz_out/<target>/findings``. The exit status is 1 when any target
found a crash, an unnamed error, a silently invalid result or a hang.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 600)))
    parser.add_argument("--out", default=os.environ.get("FUZZ_OUT", "fuzz_out"))
    args = parser.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {list(TARGETS)}")
    env = {**os.environ, "FUZZ_OUT": args.out, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    rows = []
    for name in args.targets:
        started = time.time()
        load = os.getloadavg()[0]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.fuzz.atheris_main",
                name,
                f"-max_total_time={args.seconds}",
                "-timeout=5",
                "-rss_limit_mb=4096",
                "-print_final_stats=1",
                "-seed=1",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        log = Path(args.out) / name / "libfuzzer.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(done.stdout + done.stderr)
        executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", done.stderr)
        summary_path = Path(args.out) / name / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        findings = summary.get("findings", {})
        if done.returncode != 0:
            # libFuzzer stopped the run: a timeout (hang), an out-of-memory or a crash
            # outside the oracle; its artifact is in the working directory.
            findings = {**findings, "libfuzzer_stop": done.returncode}
        rows.append(
            {
                "target": name,
                "seconds": round(time.time() - started),
                "executed": int(executed.group(1)) if executed else summary.get("executed"),
                "findings": findings,
                "load_before": round(load, 1),
                "load_after": round(os.getloadavg()[0], 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (Path(args.out) / "campaign.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'target':<15} {'seconds':>8} {'inputs':>10}  findings  (load avg before/after)")
    for row in rows:
        print(
            f"{row['target']:<15} {row['seconds']:>8} {row['executed'] or 0:>10}  "
            f"{row['findings'] or 0}  ({row['load_before']}/{row['load_after']})"
        )
    return 1 if any(row["findings"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
