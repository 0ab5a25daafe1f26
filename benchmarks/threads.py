"""Does ``OMP_WAIT_POLICY=PASSIVE`` (trustmap's command-line default) help on a busy machine?

PyTorch's CPU kernels run on OpenMP threads. By default an OpenMP thread that finishes
its share of a parallel region spins for a while before it sleeps, so that the next
region starts without a wake-up. On a machine whose cores are busy with other processes
the spinning threads steal the time the working ones need, and a run with 2 threads can be
several times slower than with 1. ``PASSIVE`` makes them sleep at once.

Each configuration runs in a fresh interpreter (the policy is read when OpenMP starts):
integrated gradients (25 steps) on MONAI's DenseNet121, one 1 x 128 x 128 image, timed
after one warm-up call, the median of ``--repeats`` runs. ``--hogs N`` starts N busy-loop
processes for the "busy" rows (in addition to whatever else runs on the machine, whose
load average is recorded). Writes ``benchmarks/results/threads.json``.

Usage::

    python benchmarks/threads.py                 # idle and with 2 hogs, threads 2 and 1
    python benchmarks/threads.py --hogs 0 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name, load_average, version

RESULTS = Path(__file__).resolve().parent / "results" / "threads.json"

CHILD = """
import time, torch, trustmap
from monai.networks.nets import DenseNet121
torch.set_num_threads({threads})
model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()
x = torch.rand(1, 1, {size}, {size}, generator=torch.Generator().manual_seed(0))
trustmap.explain(model, x, "integrated_gradients", target=1, n_steps={steps})
tick = time.perf_counter()
trustmap.explain(model, x, "integrated_gradients", target=1, n_steps={steps})
print(time.perf_counter() - tick)
"""

HOG = "while True: pass"


def run_once(threads: int, policy: str | None, size: int = 128, steps: int = 25) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(threads=threads, size=size, steps=steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hogs", type=int, default=2, help="busy-loop processes for 'busy'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="image size")
    parser.add_argument("--steps", type=int, default=25, help="integrated-gradients steps")
    args = parser.parse_args()

    rows = []
    conditions = ["idle"] + (["busy"] if args.hogs else [])
    for condition in conditions:
        hogs = []
        if condition == "busy":
            hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
            time.sleep(2)
        try:
            for threads in (2, 1):
                for policy in (None, "PASSIVE"):
                    load = load_average()
                    times = sorted(
                        run_once(threads, policy, args.size, args.steps)
                        for _ in range(args.repeats)
                    )
                    row = {
                        "condition": condition,
                        "hogs": len(hogs),
                        "threads": threads,
                        "OMP_WAIT_POLICY": policy or "(unset)",
                        "image_size": args.size,
                        "n_steps": args.steps,
                        "median_s": round(times[len(times) // 2], 3),
                        "runs_s": [round(t, 3) for t in times],
                        "load_average_before": load,
                    }
                    rows.append(row)
                    print(
                        f"{condition:<5} threads {threads}  {row['OMP_WAIT_POLICY']:<8} "
                        f"{row['median_s']:7.2f} s  (load {load:.1f})",
                        flush=True,
                    )
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    result = {
        "benchmark": "OMP_WAIT_POLICY and threads: integrated gradients on DenseNet121",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": version("torch"),
        "rows": rows,
        "note": (
            "load_average_before is the 1-minute load when each configuration started; on "
            "a shared machine other processes add to the hogs"
        ),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
