"""inspect.html in headless Chromium: self-contained (nothing requested beyond the file
and its embedded images), every figure decoded, the section links working, no script
errors; screenshots of the top of the page and of the figures."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from tests.inspect.test_cli_inspect import FAST, _concepts
from tests.models._toy import write_toy_dir
from trustmap.cli.inspect import inspect
from trustmap.data import open_dataset
from trustmap.models import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect_page")
    root = write_toy_dir(base / "toyset", n=60, size=24)
    _concepts(root, open_dataset(root))
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, model_kwargs={"width": 4}, n_boot=50,
                         patience=None, checks=False)  # fmt: skip
    run = train_classifier(root, "small_cnn", out=base / "run", seed=0, config=config)
    app = typer.Typer()
    app.command()(inspect)
    out = base / "out"
    result = CliRunner().invoke(app, [str(run.checkpoint), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return out


def test_inspect_page_is_self_contained_and_complete(inspected, browser_page):
    page = browser_page.page
    page.goto((inspected / "inspect.html").as_uri())
    page.wait_for_load_state("load")
    assert browser_page.hosts() == {"file://"}, browser_page.requests
    assert not browser_page.failed() and not browser_page.errors
    figures = page.eval_on_selector_all(
        "figure img", "els => els.map(e => [e.complete, e.naturalWidth])"
    )
    assert len(figures) == len(list((inspected / "figures").iterdir())) >= 8
    assert all(done and width > 0 for done, width in figures)
    headings = page.eval_on_selector_all("h2", "els => els.map(e => e.id)")
    assert headings == ["units", "embedding", "dissection", "maximization", "figures"]
    browser_page.shot("inspect_top")
    page.click("nav >> text=Dissection")
    assert page.evaluate("window.location.hash") == "#dissection"
    assert page.evaluate("document.getElementById('dissection').getBoundingClientRect().top") < 5
    assert page.locator("#dissection ~ table").first.is_visible()
    page.click("nav >> text=Figures")
    browser_page.shot("inspect_figures")
