"""``trustmap train``: train a reference classifier or localizer and write its model card.

The command is a plain function; the main app registers it with ``app.command()(train)``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from trustmap.cli._common import check_out, cli_errors, progress_bars, set_threads

console = Console()

_STYLE = {"info": "cyan", "warning": "yellow", "error": "bold red"}


def _model_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg {item!r} must look like name=value (e.g. width=16)")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


@cli_errors
def train(
    out: Annotated[Path, typer.Option(help="output directory (resumes a run found there)")],
    dataset: Annotated[
        str, typer.Option(help="dataset directory or phantom name")
    ] = "cxr-pneumothorax",
    arch: Annotated[
        str,
        typer.Option(
            help="small_cnn, attention_cnn, resnet18, densenet121; unet, attention_unet, "
            "box_localizer; or autoencoder, vae (trained on the normal images)"
        ),
    ] = "small_cnn",
    seed: Annotated[int, typer.Option(help="seeds weights, shuffling and augmentation")] = 0,
    epochs: Annotated[int | None, typer.Option(help="maximum epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="training batch size")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (AdamW)")] = None,
    size: Annotated[int | None, typer.Option(help="resize images to this size first")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    patience: Annotated[int | None, typer.Option(help="early-stopping patience in epochs")] = None,
    localizer: Annotated[
        bool, typer.Option("--localizer", help="train a localizer (unet, or --arch box_localizer)")
    ] = False,
    augment: Annotated[bool, typer.Option(help="random affine + intensity augmentation")] = True,
    model_arg: Annotated[
        list[str] | None,
        typer.Option("--model-arg", "-m", help="name=value for the architecture, e.g. width=16"),
    ] = None,
    amp: Annotated[
        bool, typer.Option("--amp", help="bfloat16 autocast (faster on AMX CPUs and GPUs)")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="stop after the epoch that passes this budget")
    ] = None,
) -> None:
    """Train a model on a dataset (seeded, early stopping, class-weighted loss, augmentation
    that keeps masks aligned) and write model.pt, model_card.json/.md and
    learning_curves.png; run the checks of Huff et al.'s (2021) appendix. Re-running the same
    command resumes an interrupted run."""
    _train(
        out=out,
        dataset=dataset,
        arch=arch,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        size=size,
        device=device,
        patience=patience,
        localizer=localizer,
        augment=augment,
        model_args=_model_args(model_arg or []),
        amp=amp,
        threads=threads,
        max_minutes=max_minutes,
    )


def _train(
    *,
    out: Path,
    dataset: str,
    arch: str,
    seed: int,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    size: int | None,
    device: str,
    patience: int | None,
    localizer: bool,
    augment: bool,
    model_args: dict[str, Any],
    amp: bool,
    threads: int | None,
    max_minutes: float | None,
) -> None:

    from trustmap.models.ae_training import train_autoencoder
    from trustmap.models.autoencoders import AUTOENCODERS
    from trustmap.models.training import (
        LOCALIZERS,
        TrainConfig,
        TrainEvent,
        train_classifier,
        train_localizer,
    )

    check_out(out)
    set_threads(threads)
    if localizer and arch == "small_cnn":
        arch = "unet"  # the classifier default means "not chosen" here
    as_localizer = localizer or arch in LOCALIZERS
    if localizer and arch not in LOCALIZERS:
        raise ValueError(f"--localizer trains unet, attention_unet or box_localizer, not {arch!r}")
    overrides: dict[str, Any] = {"device": device, "model_kwargs": model_args, "amp": amp}
    for name, value in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("lr", lr),
        ("size", size),
        ("patience", patience),
    ):
        if value is not None:
            overrides[name] = value
    if not augment:
        overrides["augment"] = None
    if max_minutes is not None:
        overrides["max_seconds"] = max_minutes * 60
    config = TrainConfig(**overrides)
    what = "localizer" if as_localizer else "classifier"
    if arch in AUTOENCODERS:
        what = "autoencoder (on the normal images)"
    console.print(
        f"training {what} [bold]{escape(arch)}[/] on {escape(str(dataset))} (seed {seed}) -> "
        f"{escape(str(out))}",
        highlight=False,
    )

    with progress_bars(console, info=True) as bars:
        epoch_task = bars.add_task("epochs", total=config.epochs, info="")
        batch_task = bars.add_task("batches", total=1, info="")

        def on_event(event: TrainEvent) -> None:
            if event.kind == "start":
                bars.update(epoch_task, total=config.epochs, completed=event.epoch)
                bars.update(batch_task, total=event.batches, completed=0)
                if event.stats.get("resumed"):
                    console.print(f"resuming after epoch {event.epoch} from {out / 'last.pt'}")
            elif event.kind == "batch":
                bars.update(
                    batch_task,
                    completed=event.batch,
                    description=f"epoch {event.epoch}",
                    info=f"loss {event.stats['loss']:.4f}",
                )
            elif event.kind == "epoch":
                s = event.stats
                metric = next(
                    (f"{k} {s[k]:.3f}" for k in ("val_auc", "val_dice") if s.get(k) is not None), ""
                )
                bars.update(
                    epoch_task,
                    completed=event.epoch,
                    info=f"train {s['train_loss']:.4f}  val {s['val_loss']:.4f}  {metric}",
                )
            elif event.kind == "done":
                bars.update(epoch_task, total=event.epoch, completed=event.epoch)

        trainer = train_localizer if as_localizer else train_classifier
        if arch in AUTOENCODERS:
            trainer = train_autoencoder
        result = trainer(dataset, arch, out=out, seed=seed, config=config, progress=on_event)

    card = result.card
    if result.reused:
        console.print(f"already trained: reusing {result.checkpoint}")
    console.print(
        f"{result.epochs_run} epochs (best {result.best_epoch}, {card.get('stop_reason')}) in "
        f"{result.seconds:.1f} s",
        highlight=False,
    )
    test = card.get("test", {})
    keys = {
        "classifier": ("roc_auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "f1"),
        "autoencoder": ("roc_auc", "auprc", "avg_auprc"),
    }.get(card.get("kind"), ("dice", "iou", "auprc"))
    if card.get("kind") == "classifier":
        keys = (*keys, "mcc")
    for key in keys:
        metric = test.get(key)
        if isinstance(metric, dict) and metric.get("value") is not None:
            ci = (
                f" [{metric['low']:.3f}, {metric['high']:.3f}]"
                if metric.get("low") is not None
                else ""
            )
            console.print(
                f"  test {key:<12} {metric['value']:.3f}{ci}", markup=False, highlight=False
            )
    if card.get("confusion") and len(card["confusion"]) == 2:
        (tn, fp), (fn, tp) = card["confusion"]
        console.print(
            f"  confusion [[tn, fp], [fn, tp]] = [[{tn}, {fp}], [{fn}, {tp}]]", markup=False
        )
    for f in result.findings:
        style = _STYLE.get(f.severity, "")
        console.print(
            f"[{style}]{f.severity}[/] {escape(f.id)}: {escape(f.message)}", highlight=False
        )
    if not result.findings:
        console.print("checks: no findings")
    console.print(
        f"wrote {out / 'model.pt'}, {out / 'model_card.json'}, {out / 'learning_curves.png'}",
        markup=False,
    )
