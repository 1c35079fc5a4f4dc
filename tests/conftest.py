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
