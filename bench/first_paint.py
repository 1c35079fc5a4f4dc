"""How long a cold app takes to show its first words, and to finish the Home page, in headless Chromium.

A fresh `streamlit run app.py` per repeat (so every import is cold), the browser opened as soon as the
server answers its health check; times from `page.goto` to the first words (a title, or the cold-start spinner) being visible (first paint) and to the
script having finished (the whole Home page). Also lists any response of the app's own origin with status
>= 400 (an asset a page asks for and does not get).

    PYTHONPATH=. .venv/bin/python bench/first_paint.py [--repeats 3] [--page ""]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.app_server import CHROMIUM, FLAGS, READY, serve


def measure(path: str = "") -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp) / "runs") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        bad: list[str] = []
        page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400 and r.url.startswith(url)
                else None)
        t0 = time.perf_counter()
        page.goto(f"{url}/{path}")
        page.wait_for_selector("h1, [data-testid='stSpinner']", timeout=120_000)  # words: a title or a spinner
        first = time.perf_counter() - t0
        page.wait_for_selector(READY, timeout=120_000)
        done = time.perf_counter() - t0
        browser.close()
    return {"first_paint_s": first, "page_done_s": done, "bad_responses": bad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--page", default="", help="url path of a page, e.g. clinician ('' = Home)")
    args = ap.parse_args()
    rows = [measure(args.page) for _ in range(args.repeats)]
    for r in rows:
        print(f"first paint {r['first_paint_s']:.2f} s · page done {r['page_done_s']:.2f} s · "
              f"{len(r['bad_responses'])} bad responses {r['bad_responses'][:3]}")
    first = statistics.median(r["first_paint_s"] for r in rows)
    print(f"median: first paint {first:.2f} s, page done {statistics.median(r['page_done_s'] for r in rows):.2f} s")
    print(f"first_paint_seconds {first:.2f}")


if __name__ == "__main__":
    main()
