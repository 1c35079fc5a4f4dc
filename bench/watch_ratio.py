"""Does watching a run slow it? The Teaching demo launched from the Home page in headless Chromium, once with its
Train page left open (re-rendering every second) and once with the tab closed right after the click, in
alternation, in one app. Reports each run's own training time (started → finished in the run store) and the
ratio watched / unwatched; goal ≤ 1.1 (issue 15: it was 10x with training in the app's process).

    python -m bench.watch_ratio [--pairs 2] [--busy 0]

Needs Debian's chromium and playwright (as tests/test_browser.py). Last line: `watch_ratio X`.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.app_server import CHROMIUM, FLAGS, busy_cores, click_preset, serve
from dpcore.store.runs import RunStore


def _one(browser, url: str, store: RunStore, watched: bool, timeout: float = 600) -> tuple[float, float]:
    """(training time from the run store, wall time from the click to the finished run)."""
    before = {r.run_id for r in store.list_runs()}
    page = browser.new_page()
    page.goto(url)
    click_preset(page)
    clicked = time.time()
    deadline = time.time() + timeout
    new = None
    while new is None and time.time() < deadline:
        fresh = [r for r in store.list_runs() if r.run_id not in before]
        new = fresh[0].run_id if fresh else None
        page.wait_for_timeout(200)
    if not watched:
        page.close()
    while time.time() < deadline:
        rec = store.get_run(new)
        if rec.status in ("done", "failed", "cancelled"):
            break
        time.sleep(0.5)
    if watched:
        page.close()
    wall = time.time() - clicked
    rec = store.get_run(new)
    if rec.status != "done":
        raise RuntimeError(f"run {new} ended {rec.status}: {rec.error}")
    return rec.duration, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2, help="watched/unwatched pairs, alternated")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes to load the machine with")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        with serve(runs) as url, busy_cores(args.busy), sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(str(Path(tmp) / "profile"), executable_path=CHROMIUM,
                                                           args=FLAGS, headless=True,
                                                           viewport={"width": 1400, "height": 1800})
            store = RunStore(runs)
            times = {"watched": [], "unwatched": []}
            walls = {"watched": [], "unwatched": []}
            for i in range(args.pairs):
                for watched in ((False, True) if i % 2 == 0 else (True, False)):
                    t, wall = _one(browser, url, store, watched)
                    key = "watched" if watched else "unwatched"
                    times[key].append(t)
                    walls[key].append(wall)
                    print(f"pair {i + 1}: {key:<9} training {t:6.1f} s, click to finished {wall:6.1f} s", flush=True)
            browser.close()
    w, u = statistics.median(times["watched"]), statistics.median(times["unwatched"])
    ww, wu = statistics.median(walls["watched"]), statistics.median(walls["unwatched"])
    print(f"median training time: watched {w:.1f} s, unwatched {u:.1f} s; click to finished: watched {ww:.1f} s, "
          f"unwatched {wu:.1f} s ({args.busy} busy-loop processes; {args.pairs} pairs)")
    print(f"wall_ratio {ww / wu:.2f}")
    print(f"watch_ratio {w / u:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
