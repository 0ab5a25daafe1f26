"""Load test of the reader-study server: N simultaneous readers answering for T seconds.

Builds a rating study (24 cases, 4 methods, 3 criteria, N readers) on a small trained
classifier, serves it with ``trustmap study serve`` on loopback (one uvicorn process), and
runs a bounded asyncio client: each simulated reader opens its page, loads its state, and
then for each question fetches the images and answers every panel, waiting a think time
between answers; a reader who reaches the end starts over (answers are overwritten). When
the time is up, every reader's last acknowledged value per item is compared with the admin
export: an answer the server acknowledged but does not hold is *lost*.

Phases: ``paced`` (think time uniform in [0.2, 0.8] s, still several times faster than a
person) is the target case (p95 < 100 ms); ``stress`` (no think time) shows the ceiling;
``paced_sync_full`` repeats ``paced`` with ``serve --sync full`` (a disk flush per answer).
Each phase starts a fresh server on the same study file.
Client and server share the machine's cores; the client runs at nice 10 so that it yields
the CPU to the server (in real use the readers' browsers run elsewhere). Each answer's
latency is reported as the client saw it and as the server's own time (its
``Server-Timing`` header: the application's time, thread-pool queueing included); the load
average before and during the run is recorded.

    python benchmarks/study_load.py      # 50 readers: 60 s paced, 20 s stress, 30 s sync full
    python benchmarks/study_load.py --readers 8 --seconds 10 --stress-seconds 0 --full-seconds 0

Writes ``benchmarks/results/study_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name, load_average, version
from trustmap.data.datasets import ImageDataset, Sample

RESULTS = Path(__file__).resolve().parent / "results" / "study_load.json"


class Discs(ImageDataset):
    """Noisy discs; positives carry a bright square (a CNN learns it in seconds)."""

    def __init__(self, n: int = 400, size: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % 2
        yy, xx = np.mgrid[:size, :size]
        body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (0.45 * size) ** 2
        self._images = np.where(body, 0.35 + 0.15 * rng.random((n, size, size)), 0.0)
        for i in np.flatnonzero(labels):
            r, c = rng.integers(size // 4, size - size // 4 - 6, 2)
            self._images[i, r : r + 6, c : c + 6] += 0.5
        splits = np.array(["train"] * n, dtype=object)
        splits[int(0.6 * n) : int(0.8 * n)] = "val"
        splits[int(0.8 * n) :] = "test"
        super().__init__(
            name="discs",
            classes=("negative", "positive"),
            spatial_dims=2,
            in_channels=1,
            ground_truth="none",
            labels=labels,
            ids=[f"d{i:04d}" for i in range(n)],
            splits=splits,
        )

    def _load(self, index: int) -> Sample:
        image = torch.from_numpy(self._images[index].astype(np.float32))[None]
        meta = {"id": self.ids[index], "path": "", "split": self.splits[index]}
        return Sample(image=image, label=int(self.labels[index]), meta={**meta, "row": index})


def build_study(root: Path, n_readers: int) -> object:
    from trustmap.models.training import TrainConfig, train_classifier
    from trustmap.study import create_study

    data = Discs()
    config = TrainConfig(epochs=4, batch_size=16, lr=1e-2, model_kwargs={"width": 4}, n_boot=50)
    train_classifier(data, "small_cnn", out=root / "run", seed=0, config=config)
    return create_study(
        root / "study",
        methods=["grad_cam", "saliency", "integrated_gradients", "gradient"],
        dataset=data,
        model=root / "run",
        n_cases=24,
        n_readers=n_readers,
        seed=0,
    )


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(values) * 1000
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
    }


async def reader(
    client, token: str, stop_at: float, think: tuple[float, float], rng, log, acked
) -> None:
    async def timed(kind: str, method: str, url: str, **kw) -> object:
        t0 = time.perf_counter()
        resp = await client.request(method, url, **kw)
        log.setdefault(kind, []).append(time.perf_counter() - t0)
        timing = resp.headers.get("server-timing", "")
        if "dur=" in timing:
            log.setdefault(f"{kind}_server", []).append(float(timing.split("dur=")[1]) / 1000)
        if resp.status_code != 200:
            log.setdefault("errors", []).append(f"{resp.status_code} {method} {url}")
        return resp

    for path in (f"/r/{token}", "/static/reader.js", "/static/style.css"):
        await timed("page", "GET", path)
    state = (await timed("state", "GET", f"/api/r/{token}/state")).json()
    round_ = 0
    while time.monotonic() < stop_at:
        for q in state["questions"]:
            if round_ == 0:  # a browser caches the images after the first round
                for url in [q["image"], *(it["image"] for it in q["items"])]:
                    await timed("image", "GET", url)
            for k, item in enumerate(q["items"]):
                if time.monotonic() >= stop_at:
                    return
                if think[1] > 0:
                    await asyncio.sleep(rng.uniform(*think))
                value = (k + round_ + len(acked)) % 9 - 4
                resp = await timed(
                    "answer",
                    "PUT",
                    f"/api/r/{token}/answer/{item['id']}",
                    json={"value": value, "time_ms": 1000.0},
                )
                if resp.status_code == 200:
                    acked[item["id"]] = value
        round_ += 1


async def run_phase(base: str, tokens: list[str], seconds: float, think: tuple[float, float]):
    import httpx

    log: dict[str, list] = {}
    acked: dict[str, dict[str, int]] = {t: {} for t in tokens}
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=base, timeout=30, limits=limits) for _ in tokens]
    load_before = load_average()
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    reader(c, t, stop_at, think, random.Random(k), log, acked[t])
                    for k, (c, t) in enumerate(zip(clients, tokens))
                )
            ),
            timeout=seconds + 120,  # bounded: a stuck server cannot hold the run forever
        )
    finally:
        for c in clients:
            await c.aclose()
    wall = time.perf_counter() - t0
    return log, acked, wall, load_before, load_average()


def phase_in_child(base: str, tokens: list[str], seconds: float, think: tuple[float, float]):
    return asyncio.run(run_phase(base, tokens, seconds, think))


def check_lost(base: str, admin_key: str, acked: dict[str, dict[str, int]]) -> dict:
    import httpx

    rows = httpx.get(
        f"{base}/api/admin/export.json", headers={"X-Admin-Key": admin_key}, timeout=60
    ).json()["answers"]
    stored = {r["item"]: r["value"] for r in rows}
    want = {item: v for per in acked.values() for item, v in per.items()}
    lost = [i for i, v in want.items() if stored.get(i) != v]
    return {"acknowledged_items": len(want), "stored_items": len(stored), "lost": len(lost)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--stress-seconds", type=float, default=20.0)
    parser.add_argument("--full-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        made = build_study(root, args.readers)
        build_s = time.perf_counter() - t0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "trustmap.cli.main", "study", "serve", str(root / "study")]
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        plan = [
            ("paced", "normal", args.seconds, (0.2, 0.8)),
            ("stress", "normal", args.stress_seconds, (0.0, 0.0)),
            ("paced_sync_full", "full", args.full_seconds, (0.2, 0.8)),
        ]
        phases = {}
        for name, sync, seconds, think in plan:
            if seconds <= 0:
                continue
            server = subprocess.Popen([*cmd, "--port", "0", "--sync", sync], env=env, **pipe)
            try:
                match = re.search(r"on (http://\S+)", server.stdout.readline())
                if not match:
                    raise SystemExit(f"the server did not start: {server.stdout.read()}")
                base = match.group(1)
                # The readers' machines are elsewhere in real use: here the load generator
                # shares the cores with the server, so it runs in a child at nice 10.
                with ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("fork"),
                    initializer=os.nice,
                    initargs=(10,),
                ) as pool:
                    job = pool.submit(phase_in_child, base, made.tokens, seconds, think)
                    log, acked, wall, before, during = job.result()
                answers = log.get("answer", [])
                phases[name] = {
                    "readers": args.readers,
                    "sync": sync,
                    "seconds": round(wall, 1),
                    "think_time_s": list(think),
                    "answers": percentiles(answers),
                    "answers_server_time": percentiles(log.get("answer_server", [])),
                    "answers_per_s": round(len(answers) / wall, 1),
                    "images": percentiles(log.get("image", [])),
                    "state": percentiles(log.get("state", [])),
                    "pages": percentiles(log.get("page", [])),
                    "errors": len(log.get("errors", [])),
                    "error_examples": log.get("errors", [])[:5],
                    **check_lost(base, made.admin_key, acked),
                    "load_average_before": before,
                    "load_average_after": during,
                }
            finally:
                server.terminate()
                server.wait(30)
                server.stdout.close()
            p = phases[name]
            print(
                f"{name} (sync {sync}): {args.readers} readers, {p['seconds']} s, "
                f"{p['answers']['n']} answers ({p['answers_per_s']}/s): "
                f"p50 {p['answers']['p50_ms']} ms (server "
                f"{p['answers_server_time']['p50_ms']} ms), p95 "
                f"{p['answers']['p95_ms']} ms, p99 {p['answers']['p99_ms']} ms; images p95 "
                f"{p['images']['p95_ms']} ms; errors {p['errors']}; lost {p['lost']} of "
                f"{p['acknowledged_items']}; load {before} -> {during}"
            )
    doc = {
        "benchmark": "study_load",
        "what": "N simultaneous readers answering a rating study on loopback (one uvicorn "
        "process; client and server on the same cores, the client at nice 10)",
        "phases": phases,
        "study": {"cases": 24, "methods": 4, "criteria": 3, "items_per_reader": 288},
        "build_seconds": round(build_s, 1),
        "target": "p95 answer latency < 100 ms in the paced phase, zero lost answers",
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
            "fastapi": version("fastapi"),
            "uvicorn": version("uvicorn"),
            "sqlite": __import__("sqlite3").sqlite_version,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=2))
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
