"""``trustmap study``: build, serve and analyse a blinded reader study of explanations
(Katzmann et al. 2021, section 3.4; the reader-performance design of Huff et al. 2021,
section 6).

::

    trustmap study create --methods grad_cam,integrated_gradients --dataset ct-nodule \\
        --model runs/clf --cases 24 --readers 8 --out study/
    trustmap study serve study/                  # http://127.0.0.1:8000, Ctrl-C stops
    trustmap study status study/                 # progress per reader
    trustmap study urls study/                   # the readers' links again (admin key)
    trustmap study analyze study/ --out analysis/
    trustmap study analyze study/ --out sim/ --simulate 200 --effect grad_cam=1.5
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from trustmap.cli._common import cli_errors, progress_bars, set_threads
from trustmap.cli.counterfactual import _fail  # one line on stderr, exit code 2

app = typer.Typer(
    help="Blinded reader studies of explanations: create, serve, analyze.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(soft_wrap=True)


@app.callback()
def study() -> None:
    """Blinded reader studies of explanations (Katzmann et al. 2021; Sayres et al. 2019):
    build the study file, serve it to readers, analyse the answers."""


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)


@app.command()
@cli_errors
def create(
    methods: Annotated[str, typer.Option(help="methods to compare, comma-separated")],
    dataset: Annotated[str, typer.Option(help="phantom name or dataset directory")],
    model: Annotated[Path, typer.Option(help="trustmap checkpoint (model.pt) or its directory")],
    out: Annotated[Path, typer.Option(help="study directory to create")],
    cases: Annotated[int, typer.Option(help="cases, balanced by class")] = 24,
    readers: Annotated[int, typer.Option(help="number of readers")] = 8,
    design: Annotated[str, typer.Option(help="rating or reader-performance")] = "rating",
    criteria: Annotated[
        str | None,
        typer.Option(help="criteria, comma-separated: built-in names or name=question"),
    ] = None,
    scale: Annotated[str, typer.Option(help="rating scale low,high")] = "-4,4",
    seed: Annotated[int, typer.Option(help="seeds the cases and every order")] = 0,
    split: Annotated[str, typer.Option(help="split the cases come from")] = "test",
    title: Annotated[str | None, typer.Option(help="title shown to readers")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="method.name=value")
    ] = None,
    base_url: Annotated[
        str, typer.Option(help="where the server will be reached, for the printed links")
    ] = "http://127.0.0.1:8000",
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """Draw the cases, explain and render them, write the blinded study file."""
    from trustmap.cli.main import _parse_params
    from trustmap.study import create_study, reader_url

    try:
        set_threads(threads)
        names = _split(methods)
        params = _parse_params(param or [], names) if names else {}
        with progress_bars(console, transient=True) as bars:
            tasks: dict[str, Any] = {}

            def on_progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bars.add_task(stage, total=total)
                bars.update(tasks[stage], completed=done, total=total)

            made = create_study(
                out,
                methods=names,
                dataset=dataset,
                model=model,
                n_cases=cases,
                n_readers=readers,
                criteria=criteria,
                scale=scale,
                design=design,
                seed=seed,
                split=split,
                method_params=params,
                title=title,
                progress=on_progress,
            )
    except USER_ERRORS as err:
        raise _fail(err) from None
    for warning in made.warnings:
        console.print(f"[yellow]note:[/] {escape(warning)}")
    labels = [c["label"] for c in made.cases]
    console.print(
        f"wrote {made.path} ({design}: {len(made.cases)} cases, "
        + ", ".join(f"{labels.count(k)} of class {k}" for k in sorted(set(labels)))
        + f"; {readers} readers)"
    )
    console.print(f"admin key (also in {made.path.parent / 'ADMIN_KEY'}): {made.admin_key}")
    console.print("reader links (each reader gets only their own):")
    for k, token in enumerate(made.tokens):
        console.print(f"  reader {k + 1}: {reader_url(base_url, token)}")
    console.print(f"start the server with: trustmap study serve {out}")


@app.command()
@cli_errors
def serve(
    study_dir: Annotated[Path, typer.Argument(help="study directory or study.sqlite")],
    host: Annotated[str, typer.Option(help="address to listen on (loopback by default)")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="port (0: any free port)")] = 8000,
    sync: Annotated[
        str,
        typer.Option(
            help="normal: an answer survives a crashed server; full: also a power cut "
            "(one disk flush per answer, slower)"
        ),
    ] = "normal",
) -> None:
    """Serve the study to its readers until Ctrl-C."""
    from trustmap.study.server import serve as run_server

    def ready(base: str) -> None:
        console.print(f"serving {study_dir} on {base}  (admin page {base}/admin; Ctrl-C stops)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(
                "[yellow]note:[/] listening beyond loopback: readers' links and answers travel "
                "unencrypted unless a TLS proxy is in front"
            )
        console.file.flush()  # a supervising process reads the URL from a pipe

    try:
        run_server(study_dir, host, port, on_ready=ready, sync=sync)
    except USER_ERRORS as err:
        raise _fail(err) from None


@app.command()
@cli_errors
def status(
    study_dir: Annotated[Path, typer.Argument(help="study directory or study.sqlite")],
) -> None:
    """Progress per reader."""
    from trustmap.study import Study

    try:
        st = Study.open(study_dir)
    except USER_ERRORS as err:
        raise _fail(err) from None
    rows = st.progress()
    done = sum(r["answered"] for r in rows)
    total = sum(r["total"] for r in rows)
    console.print(f"{st.meta.get('title')}: {done} of {total} answers")
    for r in rows:
        mark = "finished" if r["finished"] else ""
        console.print(
            f"  reader {r['reader'] + 1:<3} {r['variant'] or '-':<2} "
            f"{r['answered']:>5} / {r['total']:<5} {mark}"
        )


@app.command()
@cli_errors
def urls(
    study_dir: Annotated[Path, typer.Argument(help="study directory or study.sqlite")],
    admin_key: Annotated[
        str | None, typer.Option(help="admin key (default: $TRUSTMAP_STUDY_ADMIN_KEY, ADMIN_KEY)")
    ] = None,
    base_url: Annotated[str, typer.Option(help="where the server is reached")] = (
        "http://127.0.0.1:8000"
    ),
) -> None:
    """Print every reader's link again (needs the admin key)."""
    from trustmap.study import Study, reader_url
    from trustmap.study.store import read_admin_key

    try:
        st = Study.open(study_dir)
        tokens = st.reader_tokens(read_admin_key(study_dir, admin_key))
    except USER_ERRORS as err:
        raise _fail(err) from None
    for reader, token in tokens.items():
        console.print(f"reader {reader + 1}: {reader_url(base_url, token)}")


@app.command()
@cli_errors
def analyze(
    study_dir: Annotated[Path, typer.Argument(help="study directory or study.sqlite")],
    out: Annotated[Path, typer.Option(help="directory for report.html, analysis.json, CSVs")],
    admin_key: Annotated[
        str | None, typer.Option(help="admin key (default: $TRUSTMAP_STUDY_ADMIN_KEY, ADMIN_KEY)")
    ] = None,
    simulate: Annotated[
        int | None,
        typer.Option(
            help="fill a copy of the study with simulated readers and analyse it; N > 1 also "
            "estimates the power over N simulated studies"
        ),
    ] = None,
    effect: Annotated[
        str | None,
        typer.Option(help="simulated method effects, method=value,... (scale units)"),
    ] = None,
    reader_noise: Annotated[float, typer.Option(help="simulated answer noise sd")] = 1.0,
    reader_bias: Annotated[float, typer.Option(help="simulated reader offset sd")] = 0.5,
    drift: Annotated[float, typer.Option(help="simulated change from first to last question")] = (
        0.0
    ),
    first_slot: Annotated[
        float, typer.Option(help="simulated bonus for the panel shown first")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="seeds the bootstrap and the simulation")] = 0,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the CIs")] = 2000,
) -> None:
    """De-blind and analyse the answers: Tables 2-4, Figures 7-9 and the checks of
    Katzmann et al. 2021 (or the reader-performance arms), as HTML, JSON and CSV."""
    from trustmap.study.report import analyze_study
    from trustmap.study.simulate import SimulationSpec, parse_effects

    try:
        spec = None
        if simulate is not None:
            if simulate < 1:
                raise ValueError(f"--simulate must be >= 1, got {simulate}")
            spec = SimulationSpec(
                parse_effects(effect),
                reader_noise=reader_noise,
                reader_bias=reader_bias,
                drift=drift,
                first_slot=first_slot,
            )
        elif effect:
            raise ValueError("--effect only applies with --simulate N")
        if n_boot < 100:
            raise ValueError(f"--n-boot must be >= 100, got {n_boot}")
        with console.status("analysing"):
            result = analyze_study(
                study_dir,
                out,
                admin_key=admin_key,
                simulate=spec,
                n_sim=simulate if simulate and simulate > 1 else 0,
                seed=seed,
                n_boot=n_boot,
            )
    except USER_ERRORS as err:
        raise _fail(err) from None
    res = result.analysis
    if result.simulated:
        console.print("[yellow]simulated readers[/] (the study's own answers are untouched)")
    if result.design == "rating":
        console.print(f"{res.n_readers} readers, {res.n_answers} of {res.n_expected} answers")
        for crit in res.criteria:
            ordered = sorted(res.methods, key=lambda m: -res.z.cells[crit][m]["mean"])
            shown = ", ".join(
                f"{m} {res.z.cells[crit][m]['mean']:+.2f}{res.z.cells[crit][m].get('stars', '')}"
                for m in ordered
            )
            console.print(f"  {crit}: {shown}")
        console.print(f"order: {res.order['verdict']}")
    else:
        for arm in res.arms:
            t = res.table[arm]
            console.print(
                f"  {arm:<24} accuracy {t['correct']['mean']:.3f}  confidence "
                f"{t['confidence']['mean']:.2f}  time {t['time_ms']['mean']:.0f} ms"
            )
    if result.power is not None:
        console.print(
            f"power over {result.power['n_sim']} simulated studies: planted order recovered in "
            f"{result.power['ranking'] if result.power['ranking'] is not None else '-'}, "
            f"best first in {result.power['best_first']:.2f}"
        )
    console.print(f"wrote {result.files['report']} and {len(result.files) - 1} more files")
