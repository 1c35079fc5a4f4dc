"""What every AppTest module shares: open a page of the app on a runs folder, read its text, fresh caches."""
from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 60
TEXT_KINDS = ("markdown", "caption", "info", "success", "warning", "error", "title")


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test gets the JobManager and RunStore of its own runs folder (import it into the module)."""
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()


def open_page(page: str, runs: Path, monkeypatch, env: dict[str, str] | None = None) -> AppTest:
    """Run the app with `DPCORE_RUNS_DIR=runs` (and `env`), switch to `page`, fail on any exception."""
    monkeypatch.setenv("DPCORE_RUNS_DIR", str(runs))
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    if page != "pages/home.py":
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest, *more_kinds: str) -> str:
    """All the page's text elements of TEXT_KINDS (and `more_kinds`), one per line."""
    parts = [el.value for kind in (*TEXT_KINDS, *more_kinds) for el in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)
