"""``trustmap counterfactual``: train, evaluate and demo cycle-consistent activation
maximization (paper 002).

The lead wires :data:`app` into the main command line as ``trustmap counterfactual``::

    trustmap counterfactual train --classifier clf/model.pt --dataset ct-nodule --out cf
    trustmap counterfactual evaluate --classifier clf/model.pt --generators cf \\
        --dataset ct-nodule --out cf/evaluation
    trustmap counterfactual demo --out cf_demo
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from trustmap.cli._common import cli_errors, progress_bars, set_threads

app = typer.Typer(
    help="Counterfactual explanations by cycle-consistent activation maximization (paper 002).",
    no_args_is_help=True,
    add_completion=False,
)
# Soft wrap: paths and numbers stay on one line (greppable, copyable) at any width.
console = Console(soft_wrap=True)


@app.callback()
def counterfactual() -> None:
    """Counterfactual explanations by cycle-consistent activation maximization (paper 002):
    train the generators G+ and G-, evaluate them, or run the default end to end."""


def _fail(err: Exception) -> typer.Exit:
    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
    )
    return typer.Exit(2)


def _train_with_bars(run: Any, steps: int, out: Path) -> Any:
    """Run ``run(progress)`` with a step bar fed by :class:`CycleEvent` callbacks."""
    with progress_bars(console, info=True) as bars:
        task = bars.add_task("generators", total=steps, info="")

        def on_event(event: Any) -> None:
            if event.kind == "start":
                bars.update(task, total=event.steps, completed=event.step)
                if event.stats.get("resumed"):
                    console.print(f"resuming after step {event.step} from {out / 'last.pt'}")
            elif event.kind == "step":
                s = event.stats
                bars.update(
                    task,
                    completed=event.step,
                    info=(
                        f"P(+) {s['p_minus']:.2f} < {s['p_original']:.2f} < {s['p_plus']:.2f}  "
                        f"D {s['d_plus']:.2f}/{s['d_minus']:.2f}"
                    ),
                )
            elif event.kind == "done":
                bars.update(task, total=event.step, completed=event.step)

        return run(on_event)


def _print_training(result: Any) -> None:
    if result.reused:
        console.print(f"already trained ({result.steps} steps): reusing {result.out}")
    else:
        console.print(
            f"{result.steps} steps in {result.seconds:.1f} s ({result.stop_reason})",
            highlight=False,
        )
    console.print(f"wrote {result.out / 'generators.pt'}, {result.loss_curves}", markup=False)
    if result.previews:
        console.print(f"previews: {result.previews[-1]} (and {len(result.previews) - 1} more)")


def _print_evaluation(ev: Any) -> None:
    pos = ev.classes[1]
    console.print(f"mean P({pos}) on the {ev.split} split (n={ev.n}), 95 % CI:", markup=False)
    for key, name in (("original", "x    "), ("minus", "G-(x)"), ("plus", "G+(x)")):
        s = ev.probability[key]
        console.print(
            f"  {name} {s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]", markup=False
        )
    for key, name in (("plus_vs_original", "G+ vs x"), ("minus_vs_original", "G- vs x")):
        t = ev.t_tests[key]
        if t["t"] is None:
            console.print(f"  {name}: no spread, t undefined", markup=False)
            continue
        console.print(
            f"  {name}: t({t['df']}) = {t['t']:.2f}, p = {t['p']:.2g}, "
            f"Cohen's d_z = {t['effect_size']:.2f}",
            markup=False,
        )
    for key, name in (("minus", "G-(x)"), ("plus", "G+(x)")):
        console.print(
            f"  SSIM(x, {name}) {ev.similarity['ssim'][key]['mean']:.3f}  "
            f"L1 {ev.similarity['l1'][key]['mean']:.4f}",
            markup=False,
        )
    if ev.files:
        console.print(f"wrote {ev.files['json']} and {ev.files['html']}", markup=False)


@app.command()
@cli_errors
def train(
    classifier: Annotated[Path, typer.Option(help="classifier checkpoint (model.pt or its dir)")],
    out: Annotated[Path, typer.Option(help="output directory (resumes a run found there)")],
    dataset: Annotated[str, typer.Option(help="dataset directory or phantom name")] = "ct-nodule",
    steps: Annotated[int | None, typer.Option(help="training steps")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per batch")] = None,
    width: Annotated[
        int | None, typer.Option(help="generator width (stage-0 kernels; paper: 48)")
    ] = None,
    disc_width: Annotated[int | None, typer.Option(help="discriminator width")] = None,
    size: Annotated[int | None, typer.Option(help="resize images to this size first")] = None,
    lr_g: Annotated[float | None, typer.Option(help="generator learning rate (Adam)")] = None,
    lr_d: Annotated[float | None, typer.Option(help="discriminator learning rate")] = None,
    w_cycle: Annotated[float | None, typer.Option(help="weight of the cycle loss")] = None,
    w_sim: Annotated[float | None, typer.Option(help="weight of the similarity loss")] = None,
    w_adv: Annotated[float | None, typer.Option(help="weight of the adversarial loss")] = None,
    w_am: Annotated[float | None, typer.Option(help="weight of the AM loss")] = None,
    ms_ssim: Annotated[
        bool, typer.Option("--ms-ssim", help="MS-DSSIM in the cycle and similarity losses")
    ] = False,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    preview_every: Annotated[int | None, typer.Option(help="steps between previews")] = None,
    seed: Annotated[int, typer.Option(help="seeds weights, batches and patch shuffling")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(help="time budget: stop (and save) after the step that passes it; 0: none"),
    ] = None,
) -> None:
    """Train the generators G+ and G- for a binary classifier on a dataset's images (never
    its labels). Writes last.pt (every --checkpoint-every steps), loss_curves.png,
    previews/step_*.png and generators.pt; re-running the same command resumes."""
    from trustmap.counterfactual.training import CycleConfig, train_counterfactual

    try:
        set_threads(threads)
        overrides: dict[str, Any] = {"device": device, "multiscale_ssim": ms_ssim}
        for name, value in (
            ("steps", steps),
            ("batch_size", batch_size),
            ("width", width),
            ("disc_width", disc_width),
            ("size", size),
            ("lr_g", lr_g),
            ("lr_d", lr_d),
            ("w_cycle", w_cycle),
            ("w_sim", w_sim),
            ("w_adv", w_adv),
            ("w_am", w_am),
            ("checkpoint_every", checkpoint_every),
            ("preview_every", preview_every),
        ):
            if value is not None:
                overrides[name] = value
        if max_minutes is not None:
            overrides["max_seconds"] = max_minutes * 60 if max_minutes > 0 else None
        config = dataclasses.replace(CycleConfig(), **overrides)
        console.print(
            f"training G+/G- for {escape(str(classifier))} on {escape(dataset)} "
            f"(width {config.width}, {config.steps} steps, seed {seed}) -> {escape(str(out))}",
            highlight=False,
        )
        result = _train_with_bars(
            lambda progress: train_counterfactual(
                classifier, dataset, out=out, config=config, seed=seed, progress=progress
            ),
            config.steps,
            out,
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _fail(err) from None
    _print_training(result)


@app.command()
@cli_errors
def evaluate(
    classifier: Annotated[Path, typer.Option(help="classifier checkpoint (model.pt or its dir)")],
    generators: Annotated[Path, typer.Option(help="training directory or its generators.pt")],
    out: Annotated[Path, typer.Option(help="where counterfactual.json and report.html go")],
    dataset: Annotated[str, typer.Option(help="dataset directory or phantom name")] = "ct-nodule",
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    examples: Annotated[int, typer.Option(help="example triplets in the report")] = 6,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    """Paper 002's section 4.1: the classifier's mean probability on x, G-(x) and G+(x)
    with 95 % CIs, paired two-tailed t-tests with Cohen's d_z, SSIM and L1 to x; writes
    counterfactual.json and a self-contained report.html."""
    from trustmap.counterfactual.evaluate import evaluate_counterfactual

    try:
        set_threads(threads)
        with console.status("evaluating"):
            ev = evaluate_counterfactual(
                classifier,
                generators,
                dataset,
                out=out,
                split=split,
                n_examples=examples,
                device=device,
            )
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _fail(err) from None
    _print_evaluation(ev)


@app.command()
@cli_errors
def demo(
    out: Annotated[Path, typer.Option(help="output directory (reuses what is already there)")],
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = 2,
    seed: Annotated[int, typer.Option(help="seeds the classifier and the generators")] = 0,
) -> None:
    """The default run end to end on the ct-nodule phantom: train small_cnn (calibration
    settings), train G+/G- (CPU default), evaluate and write the report. Whatever is
    already in OUT (classifier, generators, evaluation) is reused or resumed."""
    from trustmap.counterfactual.demo import run_demo

    try:
        set_threads(threads)
        console.print(f"counterfactual demo -> {escape(str(out))}", highlight=False)

        def stage(name: str) -> None:
            console.print(f"[bold]{escape(name)}[/]", highlight=False)

        def classifier_epoch(event: Any) -> None:
            if event.kind == "epoch":
                s = event.stats
                auc = f"  val AUC {s['val_auc']:.3f}" if s.get("val_auc") is not None else ""
                console.print(
                    f"  classifier epoch {event.epoch}/{event.epochs}: train loss "
                    f"{s['train_loss']:.4f}  val loss {s['val_loss']:.4f}{auc}",
                    markup=False,
                    highlight=False,
                )

        result = _train_with_bars(
            lambda progress: run_demo(
                out,
                seed=seed,
                progress=progress,
                classifier_progress=classifier_epoch,
                on_stage=stage,
            ),
            0,
            out / "generators",
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _fail(err) from None
    _print_training(result.training)
    _print_evaluation(result.evaluation)
