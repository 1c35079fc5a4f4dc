"""Whether the process that owns a run (a trainer, an audit) is still alive: one answer for every store.

A pid alone is not an identity: after a crash or a restart the same number is handed to another
process (in a container the app often gets the same small pid every time). On Linux a process is
therefore also identified by its start time (`/proc/<pid>/stat`, field 22, in clock ticks since boot)
and the boot it belongs to (`/proc/sys/kernel/random/boot_id`); `start_token(pid)` gives both as one
string. Elsewhere the token is None and the checks fall back to the pid alone.
"""
from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")
_own: tuple[int, str | None] | None = None  # (pid, token) of this process, recomputed after a fork


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    close = raw.rfind(")")
    if close < 0:
        return None
    return raw[close + 1:].split()  # [0] is field 3 (state), so field N is [N - 3]


def _boot_id() -> str:
    try:
        return (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def start_token(pid: int | None) -> str | None:
    """`BOOT_ID/START_TICKS` of a running process, or None where /proc cannot tell (not Linux, no such pid)."""
    if not pid:
        return None
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return f"{_boot_id()}/{fields[19]}"  # field 22: starttime


def own_token() -> str | None:
    """This process's start token (cached per pid, so a forked child gets its own)."""
    global _own
    pid = os.getpid()
    if _own is None or _own[0] != pid:
        _own = (pid, start_token(pid))
    return _own[1]


def _zombie(pid: int) -> bool:
    """Exited but not yet waited for by its parent: it will never run again."""
    fields = _stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] in ("Z", "X")


def alive(pid: int | None, start: str | None = None) -> bool:
    """True while `pid` runs (or is ours); a pid we may not signal belongs to someone else and is alive.

    With `start` (the `start_token` recorded when the process took the run) a live process that has the
    same pid but another start time is a different process, so the owner counts as dead. Where no token
    can be read (not Linux) only the pid is checked.
    """
    if not pid:
        return False
    if pid == os.getpid():
        mine = own_token()
        return start is None or mine is None or start == mine
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    if _zombie(pid):
        return False
    if start is not None:
        now = start_token(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True
