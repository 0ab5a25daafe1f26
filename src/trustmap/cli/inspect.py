"""``trustmap inspect``: what a trained model learned (filters, feature maps, embeddings,
dissection, activation maximization, attention); writes inspect.json, the figures and a
self-contained inspect.html.

The command is a plain function; the main app registers it with ``app.command()``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from trustmap.cli._common import check_out, cli_errors, set_threads
from trustmap.errors import InputError

console = Console()


@cli_errors
def inspect(
    model: Annotated[Path, typer.Argument(help="model.pt (or its run folder) from trustmap train")],
    out: Annotated[
        Path | None, typer.Option(help="output directory (must be new or empty)")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="phantom name or dataset folder (default: the model's own dataset)"),
    ] = None,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", "-l", help="layer(s) for feature maps and dissection"),
    ] = None,
    concepts: Annotated[
        Path | None,
        typer.Option(help="concept folder <concept>/<image id> (default: the dataset's)"),
    ] = None,
    n_images: Annotated[int, typer.Option(help="images for unit rates and dissection")] = 500,
    n_embed: Annotated[int, typer.Option(help="images embedded (0: all)")] = 2500,
    projection: Annotated[
        list[str] | None, typer.Option("--projection", help="pca, tsne, umap (default: all)")
    ] = None,
    steps: Annotated[int, typer.Option(help="activation-maximization steps")] = 128,
    cohort_method: Annotated[
        str | None, typer.Option(help="method of the cohort map (default: grad_cam in 3D)")
    ] = None,
    quantile: Annotated[float, typer.Option(help="dissection: top share of activations")] = 0.005,
    iou_threshold: Annotated[float, typer.Option(help="dissection: IoU to label a unit")] = 0.04,
    seed: Annotated[int, typer.Option(help="seed of projections and maximization")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    list_layers: Annotated[
        bool, typer.Option("--list-layers", help="print the model's layers and exit")
    ] = False,
) -> None:
    """Inspect a trained model (Huff et al. 2021, section 2): first-layer filters against
    their initialisation, dead and saturated units, feature maps, PCA / t-SNE / UMAP of the
    penultimate features with kNN outlier scores, network dissection against the dataset's
    concept masks, the units that drive the positive class, class-model visualization and
    Deep Dream, attention maps of attention models and, for 3D data, a cohort map."""
    _inspect(
        model=model,
        out=out,
        dataset=dataset,
        layers=layer,
        concepts=concepts,
        n_images=n_images,
        n_embed=n_embed,
        projections=projection,
        steps=steps,
        cohort_method=cohort_method,
        quantile=quantile,
        iou_threshold=iou_threshold,
        seed=seed,
        device=device,
        threads=threads,
        overwrite=overwrite,
        list_layers=list_layers,
    )


def _inspect(
    *,
    model: Path,
    out: Path | None,
    dataset: str | None,
    layers: list[str] | None,
    concepts: Path | None,
    n_images: int,
    n_embed: int,
    projections: list[str] | None,
    steps: int,
    cohort_method: str | None,
    quantile: float,
    iou_threshold: float,
    seed: int,
    device: str,
    threads: int | None,
    overwrite: bool,
    list_layers: bool,
) -> None:
    from trustmap.inspect.report import write_inspection
    from trustmap.inspect.run import InspectConfig, _load_model, inspect_model

    set_threads(threads)
    if list_layers:
        _print_layers(model, dataset, device)
        return
    if out is None:
        raise InputError("--out is required (the directory to write inspect.json and the figures)")
    out = out.expanduser()
    check_out(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"output {out} exists and is not an empty directory; pass --overwrite")
    if cohort_method is not None:
        from trustmap.core.registry import get_method

        get_method(cohort_method)
    config = InspectConfig(
        layers=tuple(layers) if layers else None,
        n_images=n_images,
        n_embed=n_embed or None,
        projections=tuple(projections) if projections else ("pca", "tsne", "umap"),
        quantile=quantile,
        iou_threshold=iou_threshold,
        concepts=str(concepts) if concepts is not None else None,
        steps=steps,
        cohort_method=cohort_method,
        seed=seed,
        device=device,
    )
    config.validate()
    net, info = _load_model(model, device)
    console.print(
        f"inspecting [bold]{escape(str(info.get('arch')))}[/] ({escape(str(model))}) -> "
        f"{escape(str(out))}",
        highlight=False,
    )
    started = time.perf_counter()

    def on_stage(name: str, done: int, total: int) -> None:
        console.print(f"  {name:<28} {time.perf_counter() - started:7.1f} s", markup=False)

    with console.status("inspecting"):
        result = inspect_model(net, dataset, config=config, info=info, progress=on_stage)
        write_inspection(result, out, overwrite=overwrite)
    _summary(result)
    console.print(
        f"wrote {out / 'inspect.html'}, {out / 'inspect.json'} and the figures", markup=False
    )


def _summary(r: Any) -> None:
    for layer in r.unit_rates.layers:
        dead, sat = layer.dead_rate, layer.saturated_rate
        console.print(f"  {layer.layer:<28} dead {dead:6.1%}  saturated {sat:6.1%}", markup=False)
    for p in r.projections:
        console.print(
            f"  {p.method:<5} trustworthiness {p.trustworthiness:.3f} ({p.seconds:.1f} s)",
            markup=False,
        )
    out = r.outliers
    console.print(
        f"  kNN outliers flagged: {int(out.flagged.sum())} of {len(out.scores)}", markup=False
    )
    for d in r.dissections:
        labelled = ", ".join(f"{c} {n}" for c, n in d.counts().items() if n)
        best = {c: float(d.iou[:, j].max()) for j, c in enumerate(d.concepts)}
        tops = ", ".join(f"{c} {v:.3f}" for c, v in best.items())
        console.print(
            f"  dissection {d.layer}: labelled {labelled or 'none'}; best IoU {tops}", markup=False
        )
    for note in r.notes:
        console.print(f"  note: {note}", markup=False)


def _print_layers(model: Path, dataset: str | None, device: str) -> None:
    import torch

    from trustmap.inspect.activations import layer_table
    from trustmap.inspect.run import _load_model

    net, info = _load_model(model, device)
    size = (info.get("extra") or {}).get("input_size") or [64] * int(info["spatial_dims"])
    x = torch.zeros((1, int(info["in_channels"]), *size))
    for entry in layer_table(net, x):
        shape = " x ".join(str(s) for s in entry.shape)
        flag = "spatial" if entry.spatial else ""
        typer.echo(f"{entry.name:<36} {entry.kind:<18} {shape:<18} {flag}")
