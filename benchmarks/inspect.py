"""Time model inspection: network dissection against its bare forward passes, and the
embedding of 2,500 images (forward passes, PCA, t-SNE).

Targets (issue 14):

* dissection of all units of one layer over 500 images costs at most 1.2x the forward
  passes it needs (the same images, batches and model, run up to that layer without
  storing anything), with the IoUs accumulated in one pass over the data;
* the embedding of 2,500 images (penultimate features, PCA to 50 dimensions, t-SNE)
  takes under 60 s on 2 cores.

The model is a ``small_cnn`` trained on ``cxr-pneumothorax`` at 64 x 64 with the dataset
cards' calibration settings (trained once into trustmap's cache when ``--model`` is not
given, untimed); the data are prepared as training prepared them and the concept masks
are the phantom's, resized alike (untimed). Forward passes and dissections alternate,
``--repeats`` times, so that a change in the machine's load hits both; the ratio is that
of the medians, and every repeat's own ratio is recorded too. On a shared, loaded machine
wall-clock times mostly measure the other processes: the CPU time the process itself
used (``time.process_time``, fastest repeat of each) is recorded beside them.

Usage::

    python benchmarks/inspect.py                  # writes results/inspect.json
    python benchmarks/inspect.py --model runs/a0/model.pt --layers features.block4
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's inspect module, and Python puts the
# script's folder first on sys.path: move the folder to the end before anything imports
# inspect, so that the standard library's wins and _machine is still found.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _machine import cpu_name, load_average, version  # noqa: E402
from trustmap.core.atomic import write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DISSECTION_LIMIT = 1.2
EMBEDDING_LIMIT_S = 60.0


def _model(path: Path | None) -> Path:
    if path is not None:
        return path
    from trustmap.data.datasets import dataset_cache_dir
    from trustmap.models.calibrate import calibration_config
    from trustmap.models.training import train_classifier

    out = dataset_cache_dir("cxr-pneumothorax").parent.parent / "bench" / "inspect_small_cnn"
    if not (out / "model.pt").is_file():
        print(f"training the benchmark model into {out} (once, untimed)", flush=True)
        train_classifier(
            "cxr-pneumothorax", "small_cnn", out=out, seed=0,
            config=calibration_config(2, (128, 128)),
        )  # fmt: skip
    return out / "model.pt"


class _Done(Exception):
    pass


def _bare_forward(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int, layer: str
) -> tuple[float, float]:
    """The forward passes dissection needs: every batch through the model up to ``layer``
    (the rest of the model is not run), in eval mode, without storing anything."""

    def stop(*_: object) -> None:
        raise _Done

    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(stop)
    model.eval()
    try:
        started, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                with contextlib.suppress(_Done):
                    model(images[start : start + batch_size])
        return time.perf_counter() - started, time.process_time() - cpu
    finally:
        handle.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--layers", default="features.block4,features.block3")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--embed", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from trustmap.inspect import ConceptMasks, dissect, embed, load_concepts, project
    from trustmap.models import load_checkpoint
    from trustmap.models.training import TrainConfig, open_training_dataset, prepare_data

    load_start = load_average()
    model_path = _model(args.model)
    model, info = load_checkpoint(model_path)
    size = tuple(info["extra"]["input_size"])
    ds = open_training_dataset(info["extra"]["dataset"])
    data = prepare_data(ds, TrainConfig(size=size))
    concepts = load_concepts(ds, size=size)
    order = np.concatenate([data.split["val"], data.split["test"], data.split["train"]])
    subset = np.sort(order[: args.images])
    images = data.images[torch.as_tensor(subset)].contiguous()
    cm = ConceptMasks(concepts.names, concepts.masks[torch.as_tensor(subset)], concepts.source)

    dissection: dict[str, dict] = {}
    for layer in [name for name in args.layers.split(",") if name]:
        # One untimed round warms the allocator and the caches.
        _bare_forward(model, images, args.batch_size, layer)
        dissect(model, images, cm, layer=layer, batch_size=args.batch_size)
        bare, total, iou_part, ratios = [], [], [], []
        bare_cpu, total_cpu = [], []
        result = None
        for _ in range(args.repeats):
            f, f_cpu = _bare_forward(model, images, args.batch_size, layer)
            started, cpu = time.perf_counter(), time.process_time()
            result = dissect(model, images, cm, layer=layer, batch_size=args.batch_size)
            d, d_cpu = time.perf_counter() - started, time.process_time() - cpu
            bare.append(f)
            total.append(d)
            bare_cpu.append(f_cpu)
            total_cpu.append(d_cpu)
            iou_part.append(result.seconds["iou"])
            ratios.append(d / f)
        assert result is not None
        ratio = statistics.median(total) / statistics.median(bare)
        cpu_ratio = min(total_cpu) / min(bare_cpu)
        dissection[layer] = {
            "units": result.units,
            "images": result.n_images,
            "resolution": list(result.resolution),
            "bare_forward_s": statistics.median(bare),
            "dissection_s": statistics.median(total),
            "iou_accumulation_s": statistics.median(iou_part),
            "ratio": ratio,
            "ratios_per_repeat": ratios,
            "bare_forward_cpu_s": min(bare_cpu),
            "dissection_cpu_s": min(total_cpu),
            "cpu_ratio": cpu_ratio,
            "limit": DISSECTION_LIMIT,
            "within_limit": ratio <= DISSECTION_LIMIT,
            "cpu_within_limit": cpu_ratio <= DISSECTION_LIMIT,
            "labelled_units": result.counts(),
            "best_iou": {c: float(result.iou[:, j].max()) for j, c in enumerate(result.concepts)},
        }
        print(
            f"dissection {layer}: {result.units} units x {result.n_images} images: "
            f"{statistics.median(total):.2f} s against {statistics.median(bare):.2f} s of bare "
            f"forward passes = {ratio:.2f}x; CPU time {min(total_cpu):.2f} s against "
            f"{min(bare_cpu):.2f} s = {cpu_ratio:.2f}x (limit {DISSECTION_LIMIT}x)",
            flush=True,
        )

    embedding = None
    if not args.skip_embedding:
        n = min(args.embed, data.images.shape[0])
        started = time.perf_counter()
        emb = embed(model, data.images[:n], batch_size=args.batch_size)
        forward_s = time.perf_counter() - started
        pca = project(emb, "pca")
        tsne = project(emb, "tsne")
        total_s = time.perf_counter() - started
        embedding = {
            "images": n,
            "dimensions": int(emb.features.shape[1]),
            "forward_s": forward_s,
            "pca_s": pca.seconds,
            "tsne_s": tsne.seconds,
            "total_s": total_s,
            "trustworthiness": {"pca": pca.trustworthiness, "tsne": tsne.trustworthiness},
            "limit_s": EMBEDDING_LIMIT_S,
            "within_limit": total_s <= EMBEDDING_LIMIT_S,
        }
        print(
            f"embedding of {n} images: {total_s:.1f} s (forward {forward_s:.1f} s, PCA "
            f"{pca.seconds:.1f} s, t-SNE {tsne.seconds:.1f} s; limit {EMBEDDING_LIMIT_S:.0f} s)",
            flush=True,
        )

    load_end = load_average()
    payload = {
        "benchmark": "inspect",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "model": {
            "path": str(model_path),
            "arch": info["arch"],
            "input_size": list(size),
            "create_kwargs": info.get("create_kwargs"),
        },
        "dissection": dissection,
        "embedding": embedding,
        "machine": {
            "cpu": cpu_name(),
            "threads": args.threads,
            "load_average_1min": {"start": load_start, "end": load_end},
            "note": (
                "timings on a shared machine: the load average says how many other processes "
                "competed for the cores"
            ),
        },
        "versions": {
            "torch": torch.__version__,
            "scikit-learn": version("scikit-learn"),
            "numpy": np.__version__,
        },
    }
    out = args.out or RESULTS / "inspect.json"
    write_text_atomic(out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
