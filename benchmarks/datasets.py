"""Time the phantom generators at their default sizes, files included.

Each phantom is written with :func:`trustmap.data.phantoms.make_dataset` (default ``n``,
size and difficulty, seed 0) into a fresh temporary directory; the time covers rendering,
PNG/NIfTI files, the CSVs, the card and the preview. Targets (issue 3): each 2D dataset
(about 2,000 training images) under 20 s and ``mri-brain-3d`` (about 400 training
volumes) under 60 s, on 2 cores.

Usage::

    python benchmarks/datasets.py                     # all four, writes results/datasets.json
    python benchmarks/datasets.py --phantoms ct-nodule --workers 1
    python benchmarks/datasets.py --n 200             # a quick partial run

A partial run (``--phantoms``, ``--n`` or ``--workers``) writes
``results/datasets_partial.json`` so it never replaces the full results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from trustmap.core.atomic import write_text_atomic
from trustmap.data.phantoms import GENERATOR_VERSION, PHANTOMS, get_spec, make_dataset
from trustmap.data.phantoms.mri_brain import resolve_template

RESULTS = Path(__file__).resolve().parent / "results"
LIMITS = {"cxr-pneumothorax": 20.0, "cxr-pneumonia": 20.0, "ct-nodule": 20.0, "mri-brain-3d": 60.0}
BUSY_LOAD = 0.5


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(name: str, *, n: int | None, workers: int | None) -> dict:
    spec = get_spec(name)
    with tempfile.TemporaryDirectory(prefix="trustmap-bench-") as tmp:
        out = Path(tmp) / name
        load_before = os.getloadavg()[0]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        cpu = time.process_time()
        make_dataset(name, out, n=n, seed=0, workers=workers)
        seconds = time.perf_counter() - wall
        parent_cpu = time.process_time() - cpu
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        worker_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        card = json.loads((out / "dataset.json").read_text())
        size = _size_on_disk(out)
        shutil.rmtree(out)
    n_done = card["generator"]["n"]
    return {
        "phantom": name,
        "n": n_done,
        "train": sum(card["counts"]["train"].values()),
        "size": card["image_size"],
        "template": card["generator"].get("template"),
        "seconds": round(seconds, 2),
        "per_image_ms": round(1000 * seconds / n_done, 2),
        "cpu_seconds": round(parent_cpu + worker_cpu, 2),
        "limit_seconds": LIMITS[name],
        "within_limit": seconds < LIMITS[name] if n is None else None,
        "megabytes": round(size / 2**20, 1),
        "load_average_before": round(load_before, 2),
        "spatial_dims": spec.spatial_dims,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", default=",".join(PHANTOMS))
    parser.add_argument("--n", type=int, default=None, help="images per phantom (default: each's)")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default 2)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [p.strip() for p in args.phantoms.split(",") if p.strip()]
    partial = args.n is not None or args.workers is not None or names != list(PHANTOMS)
    if os.getloadavg()[0] > BUSY_LOAD:
        print(
            f"warning: load average {os.getloadavg()[0]:.1f}: other processes share the cores, "
            "so these timings are upper bounds",
            file=sys.stderr,
        )
    rows = []
    print(f"{'phantom':<18} {'n':>5} {'train':>5} {'size':>10} {'seconds':>8} {'ms/img':>7} "
          f"{'limit':>6} {'cpu s':>7} {'MB':>6}")  # fmt: skip
    for name in names:
        row = run(name, n=args.n, workers=args.workers)
        rows.append(row)
        ok = "" if row["within_limit"] is None else (" ok" if row["within_limit"] else " SLOW")
        print(
            f"{name:<18} {row['n']:>5} {row['train']:>5} {'x'.join(map(str, row['size'])):>10} "
            f"{row['seconds']:>8.2f} {row['per_image_ms']:>7.2f} {row['limit_seconds']:>6.0f}"
            f"{ok} {row['cpu_seconds']:>7.1f} {row['megabytes']:>6.1f}",
            flush=True,
        )
    result = {
        "benchmark": "datasets",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "generator_version": GENERATOR_VERSION,
        "workers": args.workers,
        "mri_template": resolve_template("auto"),
        "results": rows,
    }
    out = args.out or RESULTS / ("datasets_partial.json" if partial else "datasets.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
