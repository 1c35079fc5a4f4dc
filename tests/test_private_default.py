"""Private by default: `streamlit run app.py` listens on localhost only and shows no error details, and every
page warns when the app is bound to an address other machines can reach (it has no login)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from streamlit import config as st_config
from streamlit.testing.v1.util import patch_config_options

from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from pages.banner import exposure_warning, is_loopback

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".streamlit" / "config.toml"
BANNER = "reachable from the network"


def test_the_config_file_binds_to_localhost_and_hides_error_details():
    cfg = tomllib.loads(CONFIG.read_text())
    assert cfg["server"]["address"] == "localhost"
    assert cfg["client"]["showErrorDetails"] == "type"
    assert cfg["server"]["maxUploadSize"] == 10 and cfg["browser"]["gatherUsageStats"] is False
    # Both are options of the installed Streamlit, and the value is one of its own that shows no message
    # and no traceback (the legacy `false` means "stacktrace" there).
    template = st_config._config_options_template
    assert "server.address" in template and "client.showErrorDetails" in template
    assert cfg["client"]["showErrorDetails"] in {o.value for o in st_config.ShowErrorDetailsConfigOptions}
    assert cfg["client"]["showErrorDetails"] not in ("full", "stacktrace")


def test_streamlit_started_in_the_repository_reads_those_settings():
    out = subprocess.run(
        [sys.executable, "-c", "from streamlit import config; "
         "print(config.get_option('server.address'), config.get_option('client.showErrorDetails'))"],
        cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["localhost", "type"], out.stderr


@pytest.mark.parametrize("address", ["localhost", "LOCALHOST", "127.0.0.1", "127.0.1.1", "::1", "[::1]",
                                     "unix:///tmp/dp.sock", "app.localhost"])
def test_loopback_addresses_show_no_banner(address):
    assert is_loopback(address) and exposure_warning(address) is None


@pytest.mark.parametrize("address", [None, "", "0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "203.0.113.7"])
def test_other_addresses_warn(address):
    text = exposure_warning(address)
    assert not is_loopback(address) and BANNER in text and "no login" in text
    assert "--server.address localhost" in text
    if not address:
        assert "not set" in text


@pytest.fixture
def served_navigation(monkeypatch):
    """Run app.py on every page, as a server does.

    The page files live in a folder named pages/, so Streamlit starts in its legacy folder mode
    (`PagesManager.uses_pages_directory`), in which a page opened by path runs on its own, without app.py.
    `st.navigation` in app.py turns that off for the server's later runs; AppTest turns it back on before
    each of its runs. This keeps it off, as on a server after its first run."""
    from streamlit.runtime.pages_manager import PagesManager

    real_init = PagesManager.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)


@pytest.mark.parametrize("page", ["pages/home.py", "pages/accounting.py", "pages/runs.py"])
def test_every_page_shows_the_banner_when_bound_to_all_interfaces(page, tmp_path, monkeypatch, served_navigation):
    with patch_config_options({"server.address": "0.0.0.0"}):
        at = open_page(page, tmp_path / "runs", monkeypatch)
    banners = [w.value for w in at.warning if BANNER in w.value]
    assert len(banners) == 1 and "every network interface" in banners[0] and "no login" in banners[0]
    if page != "pages/home.py":
        assert "DP Explorer" not in [t.value for t in at.title]  # really on the other page, not on Home


def test_a_lan_address_is_named_in_the_banner(tmp_path, monkeypatch, served_navigation):
    with patch_config_options({"server.address": "192.168.1.20"}):
        at = open_page("pages/accounting.py", tmp_path / "runs", monkeypatch)
    assert any(BANNER in w.value and "192.168.1.20" in w.value for w in at.warning)


@pytest.mark.parametrize("page", ["pages/home.py", "pages/accounting.py"])
def test_no_banner_on_localhost(page, tmp_path, monkeypatch, served_navigation):
    with patch_config_options({"server.address": "localhost"}):
        at = open_page(page, tmp_path / "runs", monkeypatch)
    assert BANNER not in texts(at)
