"""Serve the app (`streamlit run app.py`) on a free local port and drive it with headless Chromium:
shared by the browser test (tests/test_browser.py) and the watched-vs-unwatched benchmark (bench/watch_ratio.py)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic", "--no-first-run"]
READY = "[data-testid='stApp'][data-test-script-state='notRunning']"
# Point counts of every plotly chart on the page (plotly keeps its traces on the graph div).
CHART_POINTS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
    .map(g => Math.max(0, ...(g.data || []).map(t => (t.x || []).length)))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("streamlit did not become healthy")


@contextlib.contextmanager
def serve(runs: Path, env: dict | None = None) -> Iterator[str]:
    """The app on 127.0.0.1 with its runs in `runs`; yields its URL and stops it afterwards."""
    port = free_port()
    env = dict(os.environ if env is None else env, DPCORE_RUNS_DIR=str(runs), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port",
         str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def click_preset(page, key: str = "preset-teaching-demo", name: str = "Teaching demo") -> None:
    """Click a Home-page preset button (Streamlit tags a keyed widget's container with st-key-<key>)."""
    page.wait_for_selector(READY, timeout=60_000)
    page.locator(f".st-key-{key} button").or_(page.get_by_role("button", name=name)).first.click()


@contextlib.contextmanager
def busy_cores(n: int = 2) -> Iterator[None]:
    """`n` busy-loop processes for the duration: a loaded machine, made on purpose."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
