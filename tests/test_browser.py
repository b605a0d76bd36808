"""The app in a real headless Chromium: upload and reconstruct, click an example, generate, visit
every tab, take a reader study to the end; the codebook chart in the dark theme too.

Screenshots go to test-artifacts/ (LESIONSTUDIO_SCREENSHOTS overrides the folder). Set
LESIONSTUDIO_TEST_CHECKPOINTS to run on real checkpoints instead of tiny ones. In CI (CI=true)
a missing Chromium is a failure, not a skip.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from conftest import ROOT, launch_app, lesion_image, write_images

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LESIONSTUDIO_SCREENSHOTS", ROOT / "test-artifacts"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail("Chromium is required for the browser test in CI (apt-get install chromium)")
    pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def quiz_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quiz") / "answers.csv"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, quiz_log: Path):
    source = os.environ.get("LESIONSTUDIO_TEST_CHECKPOINTS")
    real = tmp_path_factory.mktemp("real")
    write_images(real, 6, size=256, start_seed=40)  # the reader study's real images
    args = ("--reader-images", str(real), "--quiz-log", str(quiz_log))
    yield from launch_app(tmp_path_factory, Path(source) if source else None, extra_args=args)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(120_000)
    pg.goto(url)
    pg.get_by_text("not a diagnostic tool").first.wait_for()
    return pg


@pytest.fixture(scope="module")
def page(browser, app_url: str):
    return open_page(browser, app_url)


def test_reconstruct_in_the_browser(page, tmp_path: Path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    upload = tmp_path / "lesion.png"
    lesion_image(256, seed=11).save(upload)
    page.get_by_role("tab", name="Reconstruct").click()
    page.locator("#upload input[type=file]").set_input_files(str(upload))
    page.locator("#reconstruct-btn").click()
    page.locator("#reconstruction img").wait_for()
    assert page.locator("#reconstruction img").get_attribute("src")
    page.screenshot(path=str(ARTIFACTS / "reconstruct.png"), full_page=True)


def test_clicking_an_example_reconstructs_it(page):
    page.get_by_role("tab", name="Reconstruct").click()
    before = page.locator("#reconstruction img").get_attribute("src")  # the upload's, from the test above
    examples = page.locator("#reconstruct-examples")
    examples.locator("img").first.wait_for()  # the bundled examples are shown with no flag
    examples.locator("img").nth(1).click()
    # it runs on the click, with no button press
    page.wait_for_function(
        "before => { const i = document.querySelector('#reconstruction img'); return i && i.src !== before; }",
        arg=before,
    )


def test_generate_in_the_browser(page):
    page.get_by_role("tab", name="Generate").click()
    gallery = page.locator("#gallery")
    gallery.wait_for()
    # An output only: nothing invites a drop or an upload into it.
    assert "Drop" not in gallery.inner_text() and gallery.locator("input[type=file]").count() == 0
    page.screenshot(path=str(ARTIFACTS / "generate_empty.png"), full_page=True)
    page.locator("#generate-btn").click()
    page.locator("#gallery img").first.wait_for()
    assert page.locator("#gallery img").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)
    before = [page.locator("#gallery img").nth(i).get_attribute("src") for i in range(4)]
    page.locator("#generate-examples").get_by_text("benign").first.click()  # the 32x32 example setting
    page.wait_for_function(
        "before => { const i = document.querySelector('#gallery img'); return i && i.src !== before; }",
        arg=before[0],
    )
    assert page.locator("#generate-examples").count() == 1


def test_codebook_and_inpaint_tabs_render(page):
    page.get_by_role("tab", name="Codebook").click()
    page.get_by_role("button", name="Show").click()
    page.locator(".js-plotly-plot").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "codebook.png"), full_page=True)
    page.get_by_role("tab", name="Inpaint").click()
    page.get_by_text("Paint the region to change").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "inpaint.png"), full_page=True)


def test_reader_study_in_the_browser(page, quiz_log: Path):
    page.get_by_role("tab", name="Real or synthetic?").click()
    page.locator("#quiz-reader textarea, #quiz-reader input").first.fill("reader-7")
    n = page.locator("#quiz-n input[type=number]")
    n.fill("4")
    n.press("Enter")
    page.locator("#quiz-start").click()
    for k in range(1, 5):
        page.get_by_text(f"Image {k} of 4").wait_for()
        page.locator("#quiz-image img").wait_for()
        if k == 2:  # after one answer: the choice cleared, the confidence back at the middle
            page.screenshot(path=str(ARTIFACTS / "quiz.png"), full_page=True)
        confidence = page.locator("#quiz-conf input[type=number]")
        if k > 1:  # every image starts at the middle confidence, not at the last answer's
            assert confidence.input_value() == "3"
        page.locator("#quiz-choice").get_by_text("Real", exact=True).click()
        confidence.fill("5")
        confidence.press("Enter")
        page.locator("#quiz-answer").click()
        if k < 4:
            page.get_by_text(f"Image {k + 1} of 4").wait_for()
            page.wait_for_function("document.querySelector('#quiz-conf input[type=number]').value === '3'")
    summary = page.locator("#quiz-summary")
    summary.get_by_text("All images").wait_for()
    assert "Synthetic images" in summary.inner_text() and "%" in summary.inner_text()
    page.locator("#quiz-csv a").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "quiz_done.png"), full_page=True)
    with quiz_log.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"] and {r["reader"] for r in rows} == {"reader-7"}
    assert {r["answer"] for r in rows} == {"real"} and {r["truth"] for r in rows} == {"real", "synthetic"}
    assert {r["confidence"] for r in rows} == {"5"}


def test_codebook_chart_in_the_dark_theme(browser, app_url: str):
    dark = open_page(browser, app_url + "?__theme=dark")
    dark.get_by_role("tab", name="Codebook").click()
    dark.get_by_role("button", name="Show").click()
    dark.locator(".js-plotly-plot").first.wait_for()
    background = dark.locator(".js-plotly-plot .main-svg").first.evaluate("e => getComputedStyle(e).background")
    assert "255, 255, 255" not in background  # no white block on the dark page
    dark.screenshot(path=str(ARTIFACTS / "codebook_dark.png"), full_page=True)
    dark.close()
