"""One writer per workspace: a second run fails naming the first (or waits), and a killed holder frees it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from arcface import cli
from arcface.workspace_lock import LOCK_FILE, WorkspaceBusyError, workspace_lock

HOLD = """
import sys, time
from pathlib import Path
from arcface.workspace_lock import workspace_lock
with workspace_lock(Path(sys.argv[1]), what="holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    (Path(sys.argv[1]) / "holder-finished").touch()
"""


def hold(folder: Path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE
    )
    assert process.stdout.readline().strip() == b"held"
    return process


def test_second_run_fails_naming_the_holder_and_nothing_is_written(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    holder = hold(tmp_path, 60)
    try:
        busy = rf"in use by holder \(pid {holder.pid}, since "
        with pytest.raises(WorkspaceBusyError, match=busy), workspace_lock(tmp_path):
            pass
        monkeypatch.chdir(tmp_path)
        assert cli.main(["download", "--out", "data/raw"]) == 2
        assert "the workspace is in use by holder" in capsys.readouterr().err
        assert not (tmp_path / "data").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: the next run gets it at once.
    with workspace_lock(tmp_path, what="next"):
        assert '"what": "next"' in (tmp_path / LOCK_FILE).read_text()


def test_a_waiting_run_gets_the_workspace_when_the_holder_ends(tmp_path: Path) -> None:
    holder = hold(tmp_path, 1.5)
    started = time.monotonic()
    with workspace_lock(tmp_path, wait_s=30):
        assert (tmp_path / "holder-finished").exists()  # it only got in once the holder was done
    assert time.monotonic() - started < 30
    holder.wait()


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with workspace_lock(tmp_path), workspace_lock(tmp_path):
        pass
    with workspace_lock(tmp_path):  # and released after the outer hold
        pass
