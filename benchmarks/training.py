"""Time ``small_cnn`` training on the default ``cxr-pneumothorax`` phantom.

Target (issue 3): training reaches a test ROC AUC in 0.85-0.98 in under 3 minutes on
2 CPU cores. The dataset (2,500 images of 128 x 128, 2,000 for training) is generated
once into trustmap's cache (not timed: ``benchmarks/datasets.py`` times it); the timed
part is :func:`trustmap.models.training.train_classifier` with the settings the dataset
cards' ``measured_auc`` uses (:func:`trustmap.models.calibrate.calibration_config`:
small_cnn of width 16 on images resized to 64 x 64, AdamW 2e-3, default augmentation,
early stopping after at least 5 epochs) unless options override them. Reported:
epochs, training seconds (epochs only), the whole call's seconds (loading the images,
training, test metrics with bootstrap, checks, checkpoint and card), seconds per epoch and
the test ROC AUC with its 95 % interval.

Usage::

    python benchmarks/training.py                      # writes results/training.json
    python benchmarks/training.py --size 96 --width 16 # another setting (partial results)
    python benchmarks/training.py --dataset DIR --arch resnet18 --epochs 5

Any option other than ``--threads``/``--seed`` writes ``results/training_partial.json``,
so a trial never replaces the reference result.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from trustmap.core.atomic import write_text_atomic
from trustmap.data.datasets import open_dataset
from trustmap.models.calibrate import calibration_config
from trustmap.models.training import TrainEvent, train_classifier

RESULTS = Path(__file__).resolve().parent / "results"
LIMIT_S = 180.0
AUC_RANGE = (0.85, 0.98)
BUSY_LOAD = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cxr-pneumothorax")
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--size", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--scheduler", choices=("none", "cosine", "onecycle"))
    parser.add_argument("--out", type=Path, help="results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    dataset = open_dataset(args.dataset)  # generated into the cache on the first run
    spatial = tuple(dataset.tensors().images.shape[2:])  # decode the files, untimed
    prepare_s = time.perf_counter() - t0
    config = calibration_config(dataset.spatial_dims, spatial)
    changes: dict = {}
    for name in ("epochs", "batch_size", "lr", "size", "scheduler"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.width is not None:
        changes["model_kwargs"] = {**config.model_kwargs, "width": args.width}
    if args.no_augment:
        changes["augment"] = None
    if args.amp:
        changes["amp"] = True
    config = dataclasses.replace(config, **changes)
    partial = bool(changes) or args.dataset != "cxr-pneumothorax" or args.arch != "small_cnn"

    load_start = os.getloadavg()[0]
    if load_start > BUSY_LOAD:
        print(
            f"warning: 1-min load average is {load_start:.1f}: other processes are running, "
            "the timings will be too slow",
            file=sys.stderr,
        )

    epochs: list[dict] = []

    def progress(event: TrainEvent) -> None:
        if event.kind == "epoch":
            row = event.stats
            epochs.append(row)
            metric = row.get("val_auc")
            print(
                f"epoch {row['epoch']:>2}  train loss {row['train_loss']:.4f}  val loss "
                f"{row['val_loss']:.4f}  val AUC {metric if metric is None else round(metric, 4)}"
                f"  {row['seconds']:.1f} s elapsed",
                flush=True,
            )

    with tempfile.TemporaryDirectory(prefix="trustmap-train-bench-") as tmp:
        t1 = time.perf_counter()
        result = train_classifier(
            dataset, args.arch, out=tmp, seed=args.seed, config=config, progress=progress
        )
        call_s = time.perf_counter() - t1
    auc = result.card["test"]["roc_auc"]
    ok_time = result.seconds <= LIMIT_S
    ok_auc = auc["value"] is not None and AUC_RANGE[0] <= auc["value"] <= AUC_RANGE[1]
    summary = {
        "dataset": result.card["dataset"]["name"],
        "arch": args.arch,
        "create_kwargs": result.card["create_kwargs"],
        "input_size": result.card["dataset"]["input_size"],
        "train_images": sum(result.card["dataset"]["counts"]["train"].values()),
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stop_reason": result.card["stop_reason"],
        "train_seconds": round(result.seconds, 1),
        "call_seconds": round(call_s, 1),
        "seconds_per_epoch": round(result.seconds / max(result.epochs_run, 1), 2),
        "test_auc": auc["value"],
        "test_auc_ci95": [auc["low"], auc["high"]],
        "findings": [f.id for f in result.findings],
        "targets": {"seconds": LIMIT_S, "auc": list(AUC_RANGE)},
        "meets_time": ok_time,
        "meets_auc": ok_auc,
    }
    print(
        f"\n{summary['arch']} on {summary['dataset']} ({summary['train_images']} training images "
        f"of {'x'.join(map(str, summary['input_size']))}): {summary['epochs']} epochs in "
        f"{summary['train_seconds']} s ({summary['seconds_per_epoch']} s/epoch; whole call "
        f"{summary['call_seconds']} s; data generation/loading {prepare_s:.1f} s, untimed)"
    )
    print(
        f"test ROC AUC {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]  "
        f"time {'ok' if ok_time else 'OVER'} (< {LIMIT_S:.0f} s), AUC "
        f"{'in' if ok_auc else 'OUTSIDE'} {AUC_RANGE[0]}-{AUC_RANGE[1]}"
    )
    payload = {
        "benchmark": "training",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "setup": {
            "threads": args.threads,
            "seed": args.seed,
            "config": config.to_dict(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
            "data_loading_seconds": round(prepare_s, 1),
        },
        "result": summary,
        "history": epochs,
    }
    out = args.out or RESULTS / ("training_partial.json" if partial else "training.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if ok_time and ok_auc else 1


if __name__ == "__main__":
    sys.exit(main())
