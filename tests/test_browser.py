"""End to end in a real headless browser: `mistudio ui` (its own Ray head, actors and SQLite
registry) on a data root holding only a registered model, driven by Playwright in Debian's
Chromium. A new user's whole job, one step per test in file order: every page renders; add a
dataset on the Datasets page; start a run (extract → train an SAE → discover) on the Jobs page
and watch its progress change until it completes; open a feature page; run a steering
comparison; a label holding Markdown shows as typed; a server file outside the allowed roots is
refused. Screenshots of each page go to test-artifacts/browser/.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MISTUDIO_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"
PREPARE = """
from actors.client import Client
c = Client()
assert c.wait(c.submit("add_model", {{"source": {model!r}, "name": "tiny-llama"}}), timeout=300)["state"] == "completed"
"""
PAGES = ("Datasets", "Models", "Jobs", "Extraction", "Training", "SAEs", "Features", "Steering", "Templates",
         "System", "Settings")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


@pytest.fixture(scope="module")
def ui_url(tmp_path_factory, tiny_model_dir):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium; "
                    "`make test` installs it when run as root)")
    home = tmp_path_factory.mktemp("browser_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_ADDRESS"))}
    env.update(MISTUDIO_HOME=str(home), MISTUDIO_WORKER_CPUS="1", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([sys.executable, "-c", PREPARE.format(model=str(tiny_model_dir))], env=env, check=True,
                   timeout=900)
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "ui.cli", "ui", "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://localhost:{port}/_stcore/health", 120)
        yield f"http://localhost:{port}"
    finally:
        ui.terminate()
        ui.wait(30)
        subprocess.run([sys.executable, "-m", "ui.cli", "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def page(ui_url):
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(ui_url)
        yield pg
        browser.close()


def _open(page, name: str) -> None:
    page.get_by_role("link", name=name).first.click()
    page.get_by_role("heading", name=name).first.wait_for()


def _no_error(page) -> None:
    assert page.get_by_text("Something went wrong").count() == 0
    assert page.locator("[data-testid='stException']").count() == 0


def _wait_or_say(page, locator, what: str) -> None:
    """Wait for `locator`; failing that, fail with what the page showed (the CI log keeps the
    assertion message, not the browser's screenshot)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.wait_for()
    except PlaywrightTimeout:
        shown = page.locator("body").inner_text()
        raise AssertionError(f"{what} never showed; the page read:\n{shown[:4000]}") from None


def _wait_completed(page, kind: str, timeout_s: float) -> set:
    """Poll the progress panel until the newest `kind` job shows completed; the bar values seen."""
    bar = page.get_by_role("progressbar").first
    seen = set()
    end = time.monotonic() + timeout_s
    done = page.get_by_text(re.compile(rf"^{kind} \S+ — completed"))
    while time.monotonic() < end:
        if bar.count():
            seen.add(bar.get_attribute("aria-valuenow"))
        if done.count():
            return seen
        page.wait_for_timeout(1000)
    raise AssertionError(f"no {kind} job completed in {timeout_s:.0f} s (bar values seen: {seen})")


def test_every_page_renders(page):
    for name in PAGES:
        _open(page, name)
        page.wait_for_timeout(1500)  # let the page's data arrive
        _no_error(page)
        page.screenshot(path=str(ARTIFACTS / f"{name.lower()}.png"), full_page=True)
    assert (ARTIFACTS / "system.png").stat().st_size > 10_000


def test_add_a_dataset(page):
    _open(page, "Datasets")
    page.get_by_label("Context length (tokens per row)").fill("64")
    page.get_by_label("Max documents (0 = all)").fill("40")
    page.get_by_role("button", name="Add dataset").click()
    page.get_by_text("Submitted add_dataset job").wait_for()
    _wait_completed(page, "add_dataset", 240)
    page.reload()
    page.get_by_role("heading", name="Datasets").first.wait_for()
    # the visible listing (the table's grid also keeps hidden copies of its cells for screen readers)
    page.get_by_text("stdlib-docs").filter(visible=True).first.wait_for()
    page.wait_for_timeout(1500)  # the rest of the page's data
    page.screenshot(path=str(ARTIFACTS / "datasets-added.png"), full_page=True)
    _no_error(page)


def test_start_a_run_and_watch_it_train_an_sae(page):
    _open(page, "Jobs")
    page.get_by_label("Top contexts per feature").fill("5")
    page.get_by_role("button", name="Start run").click()
    page.get_by_text("Submitted pipeline job").wait_for()
    seen = _wait_completed(page, "pipeline", 600)
    page.screenshot(path=str(ARTIFACTS / "jobs-running.png"), full_page=True)
    assert len(seen) > 1, f"the progress bar never moved: {seen}"
    _open(page, "SAEs")
    page.get_by_text("blocks.1.hook_resid_post").filter(visible=True).first.wait_for()
    _no_error(page)


def test_feature_page(page):
    _open(page, "Features")
    page.get_by_text(re.compile(r"Top \d+ contexts")).first.wait_for()
    assert page.get_by_text("Activation histogram").count() >= 1
    assert page.get_by_role("heading", name=re.compile(r"^Latent \d+")).count() == 1
    page.screenshot(path=str(ARTIFACTS / "feature-page.png"), full_page=True)
    _no_error(page)


def test_steering_comparison(page):
    _open(page, "Steering")
    page.locator("[data-testid='stMultiSelect']").first.click()
    page.get_by_role("option").first.click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("perplexity").first.wait_for(timeout=240_000)
    assert page.get_by_text("baseline").count() >= 1 and page.get_by_text(re.compile(r"latent \d+ add \+8")).count() >= 1
    assert page.get_by_text("Saved as experiment").count() == 1
    page.screenshot(path=str(ARTIFACTS / "steering.png"), full_page=True)
    _no_error(page)


def test_a_label_with_markdown_shows_as_typed(page):
    """A label is free text: its Markdown (bold, an image link) is shown literally, and no
    viewer's browser fetches the image."""
    fetched = []
    page.on("request", lambda r: fetched.append(r.url) if "example.invalid" in r.url else None)
    label = "**bold** ![x](http://example.invalid/x.png)"
    _open(page, "Features")
    page.get_by_text(re.compile(r"Top \d+ contexts")).first.wait_for()
    page.get_by_text("Edit label").first.click()
    page.get_by_label("Name").fill(label)
    page.get_by_role("button", name="Save label").click()
    _wait_or_say(page, page.get_by_role("heading", name=re.compile(r"^Latent \d+: \*\*bold\*\* !\[x\]")).first,
                 "the saved label's heading")
    heading = page.get_by_role("heading", name=re.compile(r"^Latent \d+"))
    shown = heading.inner_text().replace("\u2060", "")  # the invisible word joiner that stops autolinking
    assert heading.count() == 1 and shown.endswith(label), shown
    # nothing of the label became markup (Streamlit's own anchor link beside a heading aside)
    assert heading.locator("strong, em, img").count() == 0, heading.inner_html()
    assert heading.locator("a[href*='example.invalid']").count() == 0, heading.inner_html()
    assert page.locator("img[src*='example.invalid']").count() == 0
    page.screenshot(path=str(ARTIFACTS / "feature-markdown-label.png"), full_page=True)
    assert not fetched, fetched
    _no_error(page)


def test_a_server_path_outside_the_allowed_roots_is_refused(page):
    _open(page, "Datasets")
    page.get_by_text("File on the server").first.click()
    page.get_by_role("textbox", name="Path on the server").fill("/etc/passwd")
    page.get_by_role("button", name="Add dataset").click()
    page.get_by_text("/etc/passwd is outside the folders the dashboard may read").first.wait_for()
    assert page.get_by_text("Submitted add_dataset job").count() == 0
    page.screenshot(path=str(ARTIFACTS / "datasets-refused-path.png"), full_page=True)
    _no_error(page)
