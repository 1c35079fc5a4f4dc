"""Every page in a real browser: each one renders with a finished run, asks its own server for nothing it does
not get, and leaves a screenshot (2600 px tall) (in $DPCORE_SCREENSHOT_DIR, else the test's folder) to look at.

Needs Debian's `chromium` (`.ci/run` installs it). Skipped where it is absent, except in CI.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

from bench.app_server import CHROMIUM, FLAGS, READY, serve
from dpcore.config import RunConfig
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

PAGES = {"": "DP Explorer", "train": "Train", "accounting": "accounting", "runs": "Runs",
         "experiments": "Experiments", "predictions": "predictions", "audit": "audit", "ledger": "Privacy budget",
         "clinician": "Clinician"}
# Streamlit's frontend, opened on a page's own URL, first looks for its server under that page's path and then
# under the root (streamlit/streamlit#7074, open): those two probes are Streamlit's, not assets of these pages.
STREAMLIT_PROBE = re.compile(r"/[a-z]+/_stcore/(health|host-config)$")


@pytest.fixture(scope="module")
def served(tmp_path_factory, chromium):
    runs = tmp_path_factory.mktemp("runs_pages")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, batch_size=64,
                        max_physical_batch_size=64, epsilon=2.0, device="cpu"), RunStore(runs))
    with serve(runs) as url:
        yield url


def test_every_page_renders_and_asks_for_nothing_missing(served, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("DPCORE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2600})  # Streamlit scrolls inside the page: a tall window shows it all
        failed: list[tuple[str, str]] = []
        errors: list[str] = []
        page.on("response", lambda r: failed.append((str(r.status), r.url))
                if r.status >= 400 and r.url.startswith(served) else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        for path, words in PAGES.items():
            page.goto(f"{served}/{path}")
            page.wait_for_selector(READY, timeout=180_000)  # generous: CI machines are loaded by other work
            page.get_by_role("heading", name=re.compile(words, re.I)).first.wait_for(timeout=60_000)
            main = page.locator("[data-testid='stMain']").inner_text()
            assert "Traceback" not in main and "Error:" not in main.split("\n")[0], (path, main[:500])
            page.wait_for_timeout(1500)  # only for the picture: tables draw on a canvas after the script is done
            page.screenshot(path=str(shots / f"page-{path or 'home'}.png"), full_page=True)
        browser.close()
    own = [(status, url) for status, url in failed if not STREAMLIT_PROBE.search(url)]
    assert not own, own
    assert not errors, errors


def test_a_deep_link_as_the_first_request_gets_the_apps_navigation(tmp_path, chromium):
    """On a fresh server the first request opens /ledger directly: the page runs inside app.py's navigation
    (page titles in the sidebar, wide layout), not as a file of Streamlit's old `pages/` folder mode, which
    listed every module (banner, common, …) as a page."""
    from playwright.sync_api import sync_playwright

    with serve(tmp_path / "runs") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/ledger")
        page.get_by_role("heading", name=re.compile("Privacy budget")).first.wait_for(timeout=180_000)
        page.wait_for_selector(READY, timeout=180_000)
        nav = page.locator("[data-testid='stSidebarNav']").inner_text(timeout=60_000)
        browser.close()
    assert "Privacy budget" in nav and "Clinician" in nav, nav
    assert not {"banner", "common", "train form"} & {line.strip().lower() for line in nav.splitlines()}, nav
