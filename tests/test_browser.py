"""The app in a real headless Chromium: upload and reconstruct, generate, visit every tab.

Screenshots go to test-artifacts/ (LESIONSTUDIO_SCREENSHOTS overrides the folder). Set
LESIONSTUDIO_TEST_CHECKPOINTS to run on real checkpoints instead of tiny ones. In CI (CI=true)
a missing Chromium is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ROOT, launch_app, lesion_image

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LESIONSTUDIO_SCREENSHOTS", ROOT / "test-artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail("Chromium is required for the browser test in CI (apt-get install chromium)")
    pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    source = os.environ.get("LESIONSTUDIO_TEST_CHECKPOINTS")
    yield from launch_app(tmp_path_factory, Path(source) if source else None)


@pytest.fixture(scope="module")
def page(app_url: str):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)
        pg.goto(app_url)
        pg.get_by_text("not a diagnostic tool").first.wait_for()
        yield pg
        browser.close()


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


def test_generate_in_the_browser(page):
    page.get_by_role("tab", name="Generate").click()
    page.locator("#generate-btn").click()
    page.locator("#gallery img").first.wait_for()
    assert page.locator("#gallery img").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)


def test_codebook_and_inpaint_tabs_render(page):
    page.get_by_role("tab", name="Codebook").click()
    page.get_by_role("button", name="Show").click()
    page.locator(".js-plotly-plot").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "codebook.png"), full_page=True)
    page.get_by_role("tab", name="Inpaint").click()
    page.get_by_text("Paint the region to change").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "inpaint.png"), full_page=True)
