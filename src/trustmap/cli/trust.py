"""``trustmap trust``: Arun et al.'s (2021) trust protocol for a set of explainers, with verdicts.

The command is a plain function; the main app registers it with ``app.command()(trust)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import TaskID
from rich.table import Table

from trustmap.cli._common import (
    busy_machine_advice,
    check_out,
    cli_errors,
    format_seconds,
    progress_bars,
    set_threads,
    time_table,
    warnings_as_lines,
)

console = Console()

_MARK = {
    "pass": "[green]pass[/]",
    "fail": "[red]did not pass[/]",
    "uncertain": "[yellow]uncertain[/]",
}


@cli_errors
def trust(
    out: Annotated[
        Path | None,
        typer.Option(help="output directory (a run found there resumes; default: trust_out)"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML or YAML config (dataset, models, methods, ...)")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="the quick preset: a few minutes on 2 CPU cores")
    ] = False,
    full: Annotated[
        bool,
        typer.Option(
            "--full", help="the full preset, closer to Arun et al. 2021 (meant for a GPU)"
        ),
    ] = False,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            "-m",
            help="a registered method (repeat; default: the 8 of Arun et al. 2021)",
        ),
    ] = None,
    n_images: Annotated[int | None, typer.Option(help="positive test images to evaluate")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    """Run Arun et al.'s (2021) trust protocol: localization utility, sensitivity to weight
    randomization, repeatability and reproducibility, each tested against its baselines,
    with a pass / did not pass / uncertain verdict per method. Writes results.json,
    per_image.csv, figures and a self-contained report.html into OUT."""
    with warnings_as_lines(console):
        _trust(out, config, quick, full, method, n_images, device, threads)


def _trust(
    out: Path | None,
    config: Path | None,
    quick: bool,
    full: bool,
    methods: list[str] | None,
    n_images: int | None,
    device: str | None,
    threads: int | None,
) -> None:
    import torch

    from trustmap.trust import TrustConfig, load_config, run

    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    # --out replaces the config file's "out"; without either, the preset's trust_out.
    overrides: dict[str, Any] = {} if out is None else {"out": str(out)}
    if methods:
        overrides["methods"] = list(methods)
    if n_images is not None:
        overrides["n_images"] = n_images
    if device is not None:
        overrides["device"] = device
    if config is not None:
        if quick or full:
            overrides["preset"] = "quick" if quick else "full"
        cfg = load_config(config, **overrides)
    else:
        preset = "quick" if quick else "full" if full else "default"
        cfg = TrustConfig.from_preset(preset, **overrides)
    check_out(cfg.out)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    set_threads(threads)
    advice = busy_machine_advice(threads)
    if advice:
        console.print(f"[yellow]note:[/] {escape(advice)}", highlight=False)

    from trustmap.trust.estimate import RunClock, estimate_run

    console.print("probing this machine to estimate the run time ...", highlight=False)
    estimate = estimate_run(cfg)
    console.print(
        f"estimated total: ~{format_seconds(estimate.total)} (probe took "
        f"{format_seconds(estimate.probe_seconds)}; less where models are already trained "
        "or training stops early)",
        highlight=False,
    )
    clock = RunClock(estimate)
    labels = {s.key: s.label for s in estimate.stages}
    console.print(
        time_table([(s.label, s.seconds, None) for s in estimate.stages], title="estimate")
    )
    with progress_bars(console) as bar:
        overall: TaskID = bar.add_task("total", total=estimate.total, left=estimate.total)
        stage: TaskID = bar.add_task("starting", total=None)

        def progress(text: str, done: int, total: int) -> None:
            key = clock.update(text, done, total)
            bar.update(overall, completed=clock.done_estimate(), left=clock.remaining())
            bar.update(
                stage,
                description=escape(text),
                completed=done,
                total=total or None,
                left=_stage_left(clock, estimate, key),
            )

        result = run(cfg, progress=progress)
        bar.update(overall, completed=estimate.total, left=0.0)
        bar.update(stage, description="done", completed=1, total=1, left=0.0)
    took = clock.stage_times()
    rows = [(labels.get(k, k), estimate.seconds_of(k), took.get(k)) for k in labels]
    rows += [(k, None, v) for k, v in took.items() if k not in labels]
    elapsed = clock.elapsed()
    rows.append(("total", estimate.total, elapsed))
    console.print(time_table(rows, title="time per stage"))
    for note in result.results.get("notes", []):
        if note.startswith("WARNING"):
            console.print(f"[yellow]{escape(note)}[/]")
    _print_summary(result.results)
    console.print(
        f"\nwrote {escape(str(result.files['report']))} and results.json, per_image.csv, "
        f"figures/ in {escape(str(result.out))} ({format_seconds(elapsed)}; estimated "
        f"~{format_seconds(estimate.total)})"
    )


def _stage_left(clock: Any, estimate: Any, key: str) -> float | None:
    """Time left in the current stage: its estimate not yet done, at the run's speed."""
    seconds = estimate.seconds_of(key)
    if not seconds:
        return None
    return max(0.0, (1 - clock.fraction) * seconds * clock.speed())


def _print_summary(results: dict[str, Any]) -> None:
    table = Table(title="Arun et al.'s (2021) four criteria")
    table.add_column("method")
    for criterion in ("utility", "randomization", "repeatability", "reproducibility"):
        table.add_column(criterion)
    verdicts = results["summary"]["verdicts"]
    for method, row in verdicts.items():
        cells = []
        for criterion, verdict in row.items():
            mean = results["methods"][method][criterion]["mean"]
            value = "—" if mean is None else f"{mean:.2f}"
            cells.append(f"{value} {_MARK.get(verdict, verdict)}")
        table.add_row(method, *cells)
    console.print(table)
    passing = results["summary"]["passes_all"]
    if passing:
        console.print(f"passed all four criteria: {', '.join(passing)}")
    else:
        console.print("[bold]No method passed all four criteria.[/]")
