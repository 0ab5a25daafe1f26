"""``trustmap`` command line (typer). Commands parse, call the public API and print."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from trustmap.cli._common import check_out, cli_errors, progress_bars
from trustmap.errors import InputError

app = typer.Typer(
    help="Explain medical-image classifiers and test whether the explanations can be trusted.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def methods() -> None:
    """List the registered methods with a one-line description and their paper."""
    from trustmap.core.registry import get_method, list_methods

    # Plain lines rather than a table: they stay greppable and never wrap a name.
    for name in list_methods():
        cls = get_method(name)
        out = "x's shape" if cls.output == "input" else "(B, 1, *spatial)"
        typer.echo(f"{name:<22} {cls.family:<9} {cls.summary} -> {out}  [{cls.paper}]")


def _parse_params(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``name=value`` applies to every method; ``method.name=value`` to one."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InputError(f"--param {item!r} must look like name=value or method.name=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        method, dot, name = key.rpartition(".")
        for m in [method] if dot else methods:
            if m not in out:
                raise InputError(f"--param {item!r} names method {m!r}, which is not requested")
            out[m][name] = value
    return out


@app.command()
@cli_errors
def explain(
    model: Annotated[
        str,
        typer.Option(
            help="TorchScript file, torch.export program (.pt2), trustmap checkpoint, state "
            "dict (with --arch), MONAI bundle folder, or package.module:factory (imported "
            "from the current directory)"
        ),
    ],
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help="DICOM, NIfTI, PNG/JPEG or NPY; or many: a folder, a CSV with an 'image' "
            "column, or DICOM series folders (writes gallery.html)",
        ),
    ],
    method: Annotated[str, typer.Option(help="method name(s), comma-separated, or 'all'")],
    out: Annotated[Path, typer.Option(help="output directory")],
    target: Annotated[str, typer.Option(help="class index, or 'predicted'")] = "predicted",
    weights: Annotated[Path | None, typer.Option(help="state dict for a factory model")] = None,
    arch: Annotated[
        str | None,
        typer.Option(help="trustmap architecture of a state-dict --model (e.g. densenet121)"),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="name=value or method.name=value")
    ] = None,
    window: Annotated[
        str | None, typer.Option(help="DICOM window: lung, mediastinum, bone, brain, dicom")
    ] = None,
    size: Annotated[int | None, typer.Option(help="resize the image to this size")] = None,
    normalize: Annotated[str, typer.Option(help="none, minmax or zscore")] = "none",
    channels: Annotated[int, typer.Option(help="channels the model expects")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    resume: Annotated[
        bool | None,
        typer.Option(
            help="skip what is already written in --out (default: on for many cases, where "
            "each case is keyed on a hash of its input, the weights and the settings)"
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    """Explain one image with one or more methods; write maps, overlays and summary.json.

    A method that cannot explain this model (e.g. LRP on a TorchScript model) is skipped
    with one line saying why; the others still run."""
    from trustmap.data.io import load
    from trustmap.models.loading import open_model
    from trustmap.run import explain_image, prepare_tensor

    check_out(out)
    names = _all_methods() if method == "all" else [m.strip() for m in method.split(",") if m]
    if not names:
        raise InputError("--method names no method; give one or more, or 'all'")
    params = _parse_params(param or [], names)
    tgt: int | None = None if target == "predicted" else _int(target, "--target")
    from trustmap.batch import is_batch
    from trustmap.cli._common import busy_machine_advice, set_threads

    set_threads(threads)
    advice = busy_machine_advice(threads)
    if advice:
        console.print(f"[yellow]note:[/] {escape(advice)}", highlight=False)
    loaded = open_model(model, str(weights) if weights else None, device, arch=arch)
    for note in loaded.warnings:
        warn(note)
    net = loaded.model
    if is_batch(input):
        _explain_many(
            net,
            input,
            names,
            out,
            params,
            tgt,
            window,
            size,
            normalize,
            channels,
            device,
            resume is not False,
        )
        return
    image = load(input, window=window) if window else load(input)
    x = prepare_tensor(
        image.array,
        is_color=getattr(image, "is_color", False),
        size=size,
        normalize=normalize,
        channels=channels,
    ).to(device)
    with progress_bars(console) as progress:
        task = progress.add_task("explaining", total=len(names))

        def step(name: str) -> None:
            progress.update(task, description=f"{name:<22}", advance=0)

        summary = explain_image(
            net,
            x,
            names,
            out,
            name=str(input),
            target=tgt,
            params=params,
            like=image,
            resume=bool(resume),
            on_method=lambda m: (step(m), progress.advance(task)),
        )
    for note in summary.warnings:
        warn(note)
    console.print(f"prediction: class {summary.prediction}  probabilities {summary.probabilities}")
    failed = {m: r.error for m, r in summary.methods.items() if r.error}
    for m, r in summary.methods.items():
        if r.error:
            line = f"failed: {r.error}"
        elif r.skipped:
            line = f"skipped: {r.skipped}"
        else:
            line = f"{r.seconds:.3f} s"
        console.print(f"  {m:<22} {escape(line)}", highlight=False)
        for note in r.warnings:
            warn(f"{m}: {note}")
    console.print(f"wrote {out / 'summary.json'}", highlight=False)
    if failed:
        # Each failure is a documented error (the method's parameters, or a model it
        # cannot handle): one line each, and the exit status of user errors.
        err = Console(stderr=True, soft_wrap=True)
        for m, message in failed.items():
            err.print(f"[bold red]error:[/] {escape(m)}: {escape(message)}", highlight=False)
        raise typer.Exit(2)


@app.command()
@cli_errors
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("demo_out"),
    method: Annotated[str, typer.Option(help="method name(s), comma-separated, or 'all'")] = "all",
) -> None:
    """Explain the embedded samples (CT, MR, a 3D volume) with every method on an untrained
    MONAI DenseNet121; write overlays, raw maps and summaries."""
    from trustmap.demo import run_demo

    check_out(out)
    names = _all_methods() if method == "all" else [m.strip() for m in method.split(",") if m]
    with progress_bars(console) as progress:
        task = progress.add_task("demo", total=3 * len(names))

        def step(sample: str, name: str) -> None:
            progress.update(task, description=f"{sample}: {name:<22}")
            progress.advance(task)

        results = run_demo(out, methods=names, on_step=step)
    for sample, summary in results.items():
        errors = {m: r.error for m, r in summary.methods.items() if r.error}
        total = sum(r.seconds for r in summary.methods.values())
        console.print(f"{sample}: {len(summary.methods) - len(errors)} maps in {total:.1f} s")
        for m, e in errors.items():
            console.print(f"  {m} failed: {e}")
    console.print(f"overlays, maps and summaries in {out}/")


def _explain_many(
    net: Any,
    input: Path,
    names: list[str],
    out: Path,
    params: dict[str, dict[str, Any]],
    target: int | None,
    window: str | None,
    size: int | None,
    normalize: str,
    channels: int,
    device: str,
    resume: bool,
) -> None:
    """``explain`` on a folder, a CSV or DICOM series: every case, then the gallery."""
    from trustmap.batch import explain_batch, find_cases
    from trustmap.cli._common import format_seconds, warnings_as_lines
    from trustmap.data.io import load
    from trustmap.run import prepare_tensor

    cases = find_cases(input)

    def read(path: Path) -> Any:
        return load(path, window=window) if window else load(path)

    def prepare(image: Any) -> Any:
        return prepare_tensor(
            image.array,
            is_color=getattr(image, "is_color", False),
            size=size,
            normalize=normalize,
            channels=channels,
        ).to(device)

    with progress_bars(console) as progress, warnings_as_lines(console):
        task = progress.add_task("cases", total=len(cases))

        def step(i: int, case: Any, status: str) -> None:
            progress.update(task, completed=i, description=f"{escape(case.id)}: {status}")

        result = explain_batch(
            net,
            cases,
            names,
            out,
            prepare=prepare,
            load=read,
            params=params,
            target=target,
            resume=resume,
            on_case=step,
        )
        progress.update(task, completed=len(cases), description="cases")
    for case_id, error in result.failed.items():
        console.print(f"  {escape(case_id)}: could not be read: {escape(error)}", highlight=False)
    console.print(
        f"{len(result.computed)} case(s) explained, {len(result.reused)} reused, "
        f"{len(result.failed)} unreadable, in {format_seconds(result.seconds)}",
        highlight=False,
    )
    console.print(f"wrote {out / 'gallery.html'} and {out / 'cases'}/", highlight=False)
    if result.failed and not (result.computed or result.reused):
        raise typer.Exit(1)


def warn(text: str) -> None:
    """One yellow ``warning:`` line on stderr."""
    Console(stderr=True, soft_wrap=True).print(
        f"[yellow]warning:[/] {escape(text)}", highlight=False
    )


def _int(value: str, option: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(
            f"{option} must be an integer class or 'predicted', got {value!r}"
        ) from None


def _all_methods() -> list[str]:
    """What ``--method all`` means: every method that needs nothing trained beyond the
    model (``cyclegan_am`` needs trained generators, ``ae_anomaly`` a trained autoencoder,
    ``attention`` a model with trainable attention)."""
    from trustmap.core.registry import get_method, list_methods

    return [m for m in list_methods() if not get_method(m).needs]


def _register_subcommands() -> None:
    # Imported here rather than at the top so that ``trustmap methods`` stays quick; the
    # modules themselves import torch and the data stack lazily inside their commands.
    from trustmap.cli.counterfactual import app as counterfactual_app
    from trustmap.cli.data import app as data_app
    from trustmap.cli.inspect import inspect
    from trustmap.cli.study import app as study_app
    from trustmap.cli.train import train
    from trustmap.cli.trust import trust

    app.add_typer(data_app, name="data")
    app.add_typer(counterfactual_app, name="counterfactual")
    app.add_typer(study_app, name="study")
    app.command(name="train")(train)
    app.command(name="trust")(trust)
    app.command(name="inspect")(inspect)


_register_subcommands()


def main() -> None:
    from trustmap.cli._common import default_wait_policy

    default_wait_policy()  # before anything imports torch
    app()


if __name__ == "__main__":
    main()
