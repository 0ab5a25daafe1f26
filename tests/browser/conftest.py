"""Browser tests: a Playwright page on Debian's Chromium, shared by every web feature.

``browser_page`` gives a fresh page (1280 x 800) in its own context, with

* ``requests``: every request the page made (method, URL, resource type, status), so a
  test can assert that nothing left the server under test (no CDN, no external font);
* ``errors``: console errors and uncaught page errors;
* ``shot(name)``: a PNG screenshot into ``$TRUSTMAP_SCREENSHOTS`` (default: the test's
  temporary directory), returning its path.

The browser is ``/usr/bin/chromium`` (``$TRUSTMAP_CHROMIUM`` overrides), installed by
``make test`` with apt; Playwright drives it through ``executable_path`` and never
downloads a browser. When Chromium or Playwright is missing the tests FAIL and say why:
they are never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = os.environ.get("TRUSTMAP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class RequestRecord:
    method: str
    url: str
    resource_type: str
    status: int | None = None
    failure: str | None = None


@dataclass
class BrowserPage:
    """A page with its request log, its errors and a screenshot helper."""

    page: Any
    shots: Path
    requests: list[RequestRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def shot(self, name: str, *, full_page: bool = False) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def hosts(self) -> set[str]:
        """Every ``scheme://host:port`` the page requested (data: and blob: excluded)."""
        out = set()
        for r in self.requests:
            parts = urlsplit(r.url)
            if parts.scheme in ("http", "https", "ws", "wss", "ftp"):
                out.add(f"{parts.scheme}://{parts.netloc}")
            elif parts.scheme == "file":
                out.add("file://")
        return out

    def failed(self) -> list[RequestRecord]:
        """Requests that got a 4xx/5xx answer or none at all."""
        return [
            r for r in self.requests if (r.failure and r.status is None) or (r.status or 0) >= 400
        ]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: the browser tests need Debian's "
            "chromium package (`make test` runs `apt-get install -y chromium`; run it by "
            "hand if that failed, or set TRUSTMAP_CHROMIUM)",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the Python package playwright is missing: pip install -e '.[dev]' "
            "(never `playwright install`: the tests use the system Chromium)",
            pytrace=False,
        )
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        except Exception as err:  # Playwright raises its own error types
            pytest.fail(f"Chromium at {CHROMIUM} could not be started: {err}", pytrace=False)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(browser: Any, tmp_path: Path) -> Iterator[BrowserPage]:
    shots = Path(os.environ.get("TRUSTMAP_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15000)
    bp = BrowserPage(page, shots)
    records: dict[Any, RequestRecord] = {}

    def on_request(req: Any) -> None:
        records[req] = RequestRecord(req.method, req.url, req.resource_type)
        bp.requests.append(records[req])

    def on_response(resp: Any) -> None:
        if resp.request in records:
            records[resp.request].status = resp.status

    def on_failed(req: Any) -> None:
        if req in records:
            records[req].failure = req.failure or "failed"

    page.on("request", on_request)
    page.on("response", on_response)
    page.on("requestfailed", on_failed)
    page.on("console", lambda m: bp.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: bp.errors.append(str(e)))
    try:
        yield bp
    finally:
        context.close()
