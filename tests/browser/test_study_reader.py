"""End to end in headless Chromium: a reader rates with the keyboard, reloads and resumes,
finishes; the admin export then holds exactly those answers. Screenshots of the reader
page (desktop and tablet), the admin page and the analysis report."""

from __future__ import annotations

import httpx
import pytest

from tests.study.conftest import make_trained_model, start_server
from trustmap.study import create_study


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_study")
    data, run = make_trained_model(root)
    made = create_study(
        root / "study",
        methods=["grad_cam", "integrated_gradients", "saliency"],
        dataset=data,
        model=run,
        n_cases=4,
        n_readers=2,
        criteria="intuitive_validity,image_quality",
        seed=1,
        title="Toy lesion study",
    )
    return made


def _type_value(page, value: int) -> None:
    if value < 0:
        page.keyboard.press("-")
    page.keyboard.press(str(abs(value)))


def _rate_question(page, q: int, expected: dict[str, int]) -> None:
    items = page.eval_on_selector_all("figure.panel", "els => els.map(e => e.dataset.item)")
    for k, item in enumerate(items):
        value = (q * 3 + k) % 9 - 4
        _type_value(page, value)
        expected[item] = value
    page.wait_for_function("() => !document.querySelector('figure.panel.saving')")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('saved')")


def test_reader_rates_with_the_keyboard_resumes_and_finishes(browser_page, small_study):
    proc, base = start_server(small_study.path.parent)
    try:
        page = browser_page.page
        page.goto(f"{base}/r/{small_study.tokens[0]}")
        page.wait_for_selector("figure.panel img")
        assert page.inner_text("#position") == "Question 1 of 8"
        expected: dict[str, int] = {}
        for q in range(3):
            _rate_question(page, q, expected)
            if q == 2:
                browser_page.shot("study_reader_1280x800")
            page.keyboard.press("Enter")
        assert page.inner_text("#position") == "Question 4 of 8"
        assert "9 of 24 answers" in page.inner_text("#progress-text")

        page.reload()  # closes the tab's state: the server has every answer
        page.wait_for_selector("figure.panel img")
        assert page.inner_text("#position") == "Question 4 of 8"
        assert "Welcome back" in page.inner_text("#status")
        page.keyboard.press("ArrowLeft")
        assert page.inner_text("#position") == "Question 3 of 8"
        chosen = page.eval_on_selector_all(
            "figure.panel",
            "els => els.map(e => [e.dataset.item, Number(e.querySelector('.opt.chosen')"
            ".dataset.value)])",
        )
        assert {item: value for item, value in chosen} == {
            item: expected[item] for item, _ in chosen
        }
        page.keyboard.press("ArrowRight")
        page.set_viewport_size({"width": 768, "height": 1024})
        browser_page.shot("study_reader_tablet_768x1024")
        page.set_viewport_size({"width": 1280, "height": 800})
        for q in range(3, 8):
            _rate_question(page, q, expected)
            page.keyboard.press("Enter")
        page.wait_for_selector("#done:not([hidden])")
        assert "24 answers in 8 questions" in page.inner_text("#done")
        browser_page.shot("study_reader_done")

        # The admin page (key typed into a form, never in a URL) shows the progress.
        page.goto(f"{base}/admin")
        page.fill("#key", small_study.admin_key)
        page.click("#login button")
        page.wait_for_selector("#admin-body:not([hidden])")
        page.wait_for_function(
            "() => document.querySelector('#progress-table tbody').innerText.includes('24 / 24')"
        )
        browser_page.shot("study_admin")

        export = httpx.get(
            f"{base}/api/admin/export.json", headers={"X-Admin-Key": small_study.admin_key}
        ).json()["answers"]
        assert {a["item"]: a["value"] for a in export} == expected
        assert {a["reader"] for a in export} == {0} and len(export) == 24
        assert browser_page.hosts() == {base}  # nothing from anywhere else: no CDN
        assert browser_page.failed() == []
        assert all(small_study.admin_key not in r.url for r in browser_page.requests)
        assert browser_page.errors == []
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_the_analysis_report_renders(browser_page, small_study, tmp_path):
    from trustmap.study.report import analyze_study
    from trustmap.study.simulate import SimulationSpec

    result = analyze_study(
        small_study.path.parent,
        tmp_path / "analysis",
        simulate=SimulationSpec({"grad_cam": 1.5, "saliency": -1.0}),
        n_boot=300,
    )
    page = browser_page.page
    page.goto(result.files["report"].as_uri())
    assert "Table 2" in page.inner_text("body")
    widths = page.eval_on_selector_all("figure img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 3 and all(w > 100 for w in widths)  # Figures 7-9 decoded
    browser_page.shot("study_report_top")
    page.locator("text=Figure 7").first.scroll_into_view_if_needed()
    browser_page.shot("study_report_figures")
    assert browser_page.hosts() == {"file://"} and browser_page.errors == []
