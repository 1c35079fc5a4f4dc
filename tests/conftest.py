import os
from pathlib import Path

import pytest

# CI clones the repo with shared/ beside it; a developer checkout has it one level up as well.
SHARED_DATA = Path(os.environ.get("DPCORE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def session_ledger(tmp_path_factory):
    """Tests never touch the machine's own privacy ledger (~/.dpcore): the whole session writes to a
    temporary one. A test that checks ledger contents takes `fresh_ledger` (its own, empty)."""
    path = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    old = os.environ.get("DPCORE_LEDGER")
    os.environ["DPCORE_LEDGER"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DPCORE_LEDGER", None)
    else:
        os.environ["DPCORE_LEDGER"] = old


@pytest.fixture
def fresh_ledger(tmp_path, monkeypatch):
    path = tmp_path / "ledger" / "ledger.sqlite"
    monkeypatch.setenv("DPCORE_LEDGER", str(path))
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """The headless browser of the end-to-end tests: skipped where absent, a failure in CI (`.ci/run` installs it)."""
    from bench.app_server import CHROMIUM

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run must apt-get install chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    return CHROMIUM
