"""End to end in a real browser: `streamlit run app.py`, click the Teaching demo preset in headless
Chromium, watch the live charts grow while the job runs, and wait for the run to finish.

Needs Debian's `chromium` (`.ci/run` installs it). Skipped where it is absent, except in CI.
"""
import os
import time
from pathlib import Path

import pytest

from bench.app_server import CHART_POINTS_JS, CHROMIUM, FLAGS, READY, busy_cores, click_preset, serve
from dpcore.store import RunStore


@pytest.fixture
def app_server(tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run must apt-get install chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    runs = tmp_path / "runs"
    with serve(runs) as url:
        yield url, runs


def test_teaching_demo_trains_live_in_the_browser(app_server, tmp_path):
    """On a machine loaded on purpose (two busy-loop processes on its cores): training runs in a worker process,
    so the watched page's re-rendering does not starve it (it did when training shared the app's process)."""
    from playwright.sync_api import sync_playwright

    url, runs = app_server
    shots = Path(os.environ.get("DPCORE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chrome-profile"), executable_path=CHROMIUM, args=FLAGS, headless=True,
            viewport={"width": 1400, "height": 1800})
        page = browser.new_page()
        page.goto(url)
        with busy_cores(2):
            click_preset(page)
            store = RunStore(runs)
            live_points, finished = _follow(page, store)
        assert finished, f"the demo run did not finish: {[r.status for r in store.list_runs()]}"
        assert live_points >= 2, "no chart showed two or more points while the run was training"
        page.wait_for_timeout(2500)  # one more refresh so the page shows the finished state
        page.screenshot(path=str(shots / "teaching_demo_finished.png"), full_page=True)
        assert max(page.evaluate(CHART_POINTS_JS) or [0]) >= 2
        browser.close()


def _follow(page, store: RunStore, timeout: float = 480) -> tuple[int, bool]:
    """Poll the page's charts and the run's status until it ends: (most chart points seen live, finished)."""
    live_points, deadline = 0, time.time() + timeout
    while time.time() < deadline:
        points = page.evaluate(CHART_POINTS_JS)
        status = [r.status for r in store.list_runs()]
        if status and status[0] == "running" and points:
            live_points = max(live_points, max(points))
        if status and status[0] in ("done", "failed", "cancelled"):
            return live_points, status[0] == "done"
        page.wait_for_timeout(500)
    return live_points, False


def test_audit_page_opens_in_the_browser(app_server, tmp_path):
    """Cheap: the Audit page loads from its URL and shows its heading (no run, so no audit is started)."""
    from playwright.sync_api import sync_playwright

    url, _ = app_server
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chrome-profile-audit"), executable_path=CHROMIUM, args=FLAGS, headless=True,
            viewport={"width": 1200, "height": 900})
        page = browser.new_page()
        page.goto(url + "/audit")
        page.wait_for_selector(READY, timeout=60_000)
        heading = page.get_by_role("heading", name="Membership-inference audit")
        heading.first.wait_for(timeout=30_000)
        assert page.get_by_text("No finished run yet").count() >= 1
        browser.close()


def test_privacy_budget_page_shows_the_ledger_in_the_browser(fresh_ledger, app_server, tmp_path):
    """The served app's ledger (one recorded run on digits, no training) appears on the Privacy budget page:
    the most-exposed image's ε and the histogram of ε per image."""
    from playwright.sync_api import sync_playwright

    from dpcore.data import load_dataset
    from dpcore.ledger import Ledger

    url, runs = app_server
    ledger = Ledger()  # the server's: DPCORE_LEDGER is inherited from the test session
    spend = ledger.begin("20260101-000000-abcdef", train=ledger.identify(load_dataset("digits").train),
                         dataset="digits", private=True, noise_multiplier=1.1, sample_rate=0.05, planned_steps=100,
                         delta=1e-5, accountant="rdp", label="tiny_cnn, ε=1.5")
    spend.ensure(100)
    spend.finish("done", 100, 1.5)
    total = f"{ledger.summary('digits').epsilon:.4g}"
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chrome-profile-ledger"), executable_path=CHROMIUM, args=FLAGS, headless=True,
            viewport={"width": 1200, "height": 1400})
        page = browser.new_page()
        page.goto(url + "/ledger")
        page.wait_for_selector(READY, timeout=60_000)
        page.get_by_role("heading", name="Privacy budget").first.wait_for(timeout=30_000)
        page.get_by_text("Most-exposed image: ε").first.wait_for(timeout=30_000)
        assert page.get_by_text(total, exact=True).count() >= 1
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)  # plotly draws after the text
        shots = os.environ.get("DPCORE_SCREENSHOTS")
        if shots:
            page.screenshot(path=str(Path(shots) / "privacy_budget.png"), full_page=True)
        browser.close()
