"""One writer per workspace: a pipeline run (flow, `dvc repro` stage, CLI stage) holds an exclusive lock.

The lock is `flock` on `.pipeline.lock` in the workspace root: the kernel drops it when the holder exits,
even when it is killed, so a crashed run never leaves a stale lock behind. The file names the holder so
the second run can say who is in the way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = ".pipeline.lock"


class WorkspaceBusyError(RuntimeError):
    """Another pipeline run holds the workspace."""


@contextlib.contextmanager
def workspace_lock(root: Path = Path("."), what: str = "pipeline", wait_s: float = 0.0) -> Iterator[None]:
    """Hold the workspace for `what`; wait up to `wait_s` seconds for another holder, then fail naming it.
    Re-entrant within one process (a flow's stages run inside the flow's hold)."""
    path = Path(root) / LOCK_FILE
    if _HELD.get(path.resolve()):
        _HELD[path.resolve()] += 1
        try:
            yield
        finally:
            _HELD[path.resolve()] -= 1
        return
    handle = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WorkspaceBusyError(_busy_message(path, wait_s)) from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        started = datetime.now(UTC).isoformat(timespec="seconds")
        handle.write(json.dumps({"pid": os.getpid(), "what": what, "since": started}))
        handle.flush()
        _HELD[path.resolve()] = 1
        try:
            yield
        finally:
            _HELD.pop(path.resolve(), None)
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


_HELD: dict[Path, int] = {}


def _busy_message(path: Path, wait_s: float) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    what, pid, since = (holder.get(key, "?") for key in ("what", "pid", "since"))
    who = f"{what} (pid {pid}, since {since})"
    waited = f" after waiting {wait_s:.0f} s" if wait_s else ""
    return f"{path.parent.resolve()}: the workspace is in use by {who}{waited}; try again when it ends"
