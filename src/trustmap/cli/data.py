"""``trustmap data``: make phantom datasets.

The lead wires :data:`app` into the main command line as ``trustmap data``::

    trustmap data make cxr-pneumothorax --out data/ptx --seed 0
    trustmap data make mri-brain-3d --out data/brain --n 120 --size 48 --shortcut 0.9
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trustmap.cli._common import check_out, cli_errors, progress_bars

app = typer.Typer(
    help="Make datasets: procedural phantoms with exact ground truth.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def data() -> None:
    """Make datasets: procedural phantoms with exact ground truth."""
    # A callback keeps ``make`` a subcommand (typer would otherwise collapse a
    # one-command app into that command).


def _parse_size(text: str | None) -> int | tuple[int, ...] | None:
    """``"128"`` -> 128, ``"96x128"`` -> (96, 128)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"--size must be an integer or sizes joined by 'x', got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _parse_difficulty(text: str | None) -> float | str | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


@app.command()
@cli_errors
def make(
    name: Annotated[
        str,
        typer.Argument(help="Phantom: cxr-pneumothorax, cxr-pneumonia, ct-nodule or mri-brain-3d."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write.")],
    n: Annotated[int | None, typer.Option(help="Number of images (default per phantom).")] = None,
    size: Annotated[
        str | None, typer.Option(help="Image size: 128, or per axis as 96x128 (3D: 48x64x64).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical data.")] = 0,
    shortcut: Annotated[
        float | None,
        typer.Option(help="Burn in a laterality-marker token agreeing with the label w.p. P."),
    ] = None,
    difficulty: Annotated[
        str | None, typer.Option(help="Float (1.0 default, larger is harder) or easy/medium/hard.")
    ] = None,
    template: Annotated[
        str, typer.Option(help="mri-brain-3d: auto, mni152 (needs nilearn) or procedural.")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    workers: Annotated[
        int | None, typer.Option(help="Processes to render with (default: up to 2).")
    ] = None,
    measure_auc: Annotated[
        bool,
        typer.Option(
            "--measure-auc",
            help="Then train the calibration model (small_cnn; a small ResNet-18 in 3D) on it and "
            "record its test ROC AUC in the card.",
        ),
    ] = False,
) -> None:
    """Generate a phantom dataset (images, masks, manifest, boxes, card, preview)."""
    from trustmap.data.phantoms import make_dataset

    console = Console()
    check_out(out)
    size_value = _parse_size(size)
    with progress_bars(console) as bar:
        task = bar.add_task(f"making {name}", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        path = make_dataset(
            name,
            out,
            n=n,
            size=size_value,
            seed=seed,
            shortcut=shortcut,
            difficulty=_parse_difficulty(difficulty),
            template=template,
            overwrite=overwrite,
            progress=report,
            workers=workers,
        )
    card = json.loads((path / "dataset.json").read_text())
    typer.echo(f"wrote {path} (dataset.json, DATASET_CARD.md, manifest.csv, boxes.csv)")
    names = card["classes"]
    for split, counts in card["counts"].items():
        parts = ", ".join(f"{counts.get(str(i), 0)} {c}" for i, c in enumerate(names))
        typer.echo(f"  {split}: {parts}")
    typer.echo(f"preview: {path / 'preview.png'}")
    if measure_auc:
        from trustmap.models.calibrate import measure_dataset_auc

        typer.echo("measuring difficulty: training the calibration model (a few minutes on a CPU)")
        measured = measure_dataset_auc(path, seed=seed)
        low, high = measured["ci95"]
        typer.echo(
            f"  test ROC AUC {measured['test_auc']:.3f} [{low:.3f}, {high:.3f}] after "
            f"{measured['epochs']} epochs, {measured['seconds']:.0f} s (in dataset.json)"
        )
