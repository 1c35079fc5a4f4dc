"""Whether the process that owns a run (a trainer, an audit) is still alive: one answer for every store."""
from __future__ import annotations

import os


def alive(pid: int | None) -> bool:
    """True while `pid` runs (or is ours); a pid we may not signal belongs to someone else and is alive."""
    if not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
