"""``trustmap trust``: paper 004's trust protocol for a set of explainers, with verdicts.

The command is a plain function; the main app registers it with ``app.command()(trust)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import TaskID
from rich.table import Table

from trustmap.cli._common import check_out, cli_errors, progress_bars, set_threads

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
        typer.Option("--full", help="the full preset, closer to paper 004 (meant for a GPU)"),
    ] = False,
    method: Annotated[
        list[str] | None,
        typer.Option("--method", "-m", help="a registered method (repeat; default: paper 004's 8)"),
    ] = None,
    n_images: Annotated[int | None, typer.Option(help="positive test images to evaluate")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    """Run paper 004's trust protocol: localization utility, sensitivity to weight
    randomization, repeatability and reproducibility, each tested against its baselines,
    with a pass / did not pass / uncertain verdict per method. Writes results.json,
    per_image.csv, figures and a self-contained report.html into OUT."""
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

    started = time.perf_counter()
    with progress_bars(console, transient=True) as bar:
        task: TaskID = bar.add_task("trust", total=None)

        def progress(text: str, done: int, total: int) -> None:
            bar.update(task, description=escape(text), completed=done, total=total or None)

        result = run(cfg, progress=progress)
    for note in result.results.get("notes", []):
        if note.startswith("WARNING"):
            console.print(f"[yellow]{escape(note)}[/]")
    _print_summary(result.results)
    console.print(
        f"\nwrote {escape(str(result.files['report']))} and results.json, per_image.csv, "
        f"figures/ in {escape(str(result.out))} ({time.perf_counter() - started:.0f} s)"
    )


def _print_summary(results: dict[str, Any]) -> None:
    table = Table(title="paper 004's four criteria")
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
