"""MkDocs hooks: pages generated at build time from our own results and code.

* ``<!-- trustmap:method-verdicts -->``: the verdicts and costs of the trust benchmark,
  read from ``benchmarks/results/trust.json``;
* ``<!-- trustmap:method-list -->``: every registered method, its family and paper;
* ``<!-- trustmap:cli-help -->``: every command's ``--help``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = {"pass": "pass", "fail": "did not pass", "uncertain": "uncertain"}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "<!-- trustmap:method-verdicts -->" in markdown:
        markdown = markdown.replace("<!-- trustmap:method-verdicts -->", method_verdicts())
    if "<!-- trustmap:method-list -->" in markdown:
        markdown = markdown.replace("<!-- trustmap:method-list -->", method_list())
    if "<!-- trustmap:cli-help -->" in markdown:
        markdown = markdown.replace("<!-- trustmap:cli-help -->", cli_help())
    return markdown


def _verdict(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("verdict")
    return MARK.get(str(value), str(value))


def method_verdicts(path: Path = ROOT / "benchmarks" / "results" / "trust.json") -> str:
    """A markdown table of the benchmark's verdicts and explainer time per method."""
    if not path.is_file():
        return "*No trust benchmark result yet: run `python benchmarks/trust.py`.*"
    result = json.loads(path.read_text())
    ours = result.get("trustmap", {})
    verdicts = ours.get("verdicts", {})
    components = ours.get("components", {})
    bare = result.get("bare_passes", {}).get("components", {})
    setup = result.get("setup", {})
    config = setup.get("config", {})
    criteria = ["utility", "randomization", "repeatability", "reproducibility"]
    lines = [
        "| method | " + " | ".join(criteria) + " | explainer time | of which bare passes |",
        "|---|" + "---|" * (len(criteria) + 2),
    ]
    for method, row in verdicts.items():
        seconds = components.get(f"explainer {method}")
        passes = bare.get(f"explainer {method}")
        cells = [_verdict(row.get(c)) for c in criteria]
        t = f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        p = f"{passes:.1f} s" if isinstance(passes, (int, float)) else ""
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {t} | {p} |")
    models = config.get("models", {})
    arch = {k: v.get("arch") for k, v in models.items() if isinstance(v, dict)}
    load = setup.get("load_average_1min", {})
    lines += [
        "",
        f"Measured by `benchmarks/trust.py` with the `{setup.get('preset', '?')}` preset: "
        f"dataset `{config.get('dataset', '?')}` at {config.get('size', '?')} px, "
        f"{config.get('n_images', '?')} test images, architecture A `{arch.get('A')}`, "
        f"B `{arch.get('B')}`, localizer `{arch.get('localizer')}`; "
        f"{setup.get('cores', '?')} cores ({setup.get('cpu', '?')}), load average "
        f"{load.get('before', '?')} before the run. Explainer time is the time spent in "
        "each method over all model states; the bare passes are the forward and backward "
        "passes the method cannot avoid.",
    ]
    return "\n".join(lines)


def method_list() -> str:
    from trustmap.core.registry import get_method, list_methods

    lines = ["| method | family | what it computes | paper |", "|---|---|---|---|"]
    for name in list_methods():
        cls = get_method(name)
        summary = cls.summary.replace("|", "\\|")
        lines.append(f"| `{name}` | {cls.family} | {summary} | {cls.paper} |")
    return "\n".join(lines)


def cli_help() -> str:
    import typer
    from typer.testing import CliRunner

    from trustmap.cli.main import app

    runner = CliRunner()
    out = []

    def walk(command: Any, path: list[str]) -> None:
        result = runner.invoke(app, [*path[1:], "--help"], terminal_width=100, color=False)
        out.append(f"## `{' '.join(path)}`\n\n```text\n{result.output.rstrip()}\n```\n")
        if hasattr(command, "list_commands"):  # a group (typer ships its own click)
            ctx = command.context_class(command, info_name=path[-1])
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), [*path, name])

    walk(typer.main.get_command(app), ["trustmap"])
    return "\n".join(out)
