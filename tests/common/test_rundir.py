"""The run directory's lock: one process at a time, the second told who holds it, a dead holder's lock
taken over, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from applications.common.rundir import LOCK_NAME, RunDirBusy, RunDirError, RunLock

_HOLDER = """
import sys, time
from applications.common.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _hold(tmp_path: Path, run: Path) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = _hold(tmp_path, run)
    try:
        with pytest.raises(RunDirBusy, match=f"in use by process {holder.pid}") as info:
            RunLock(run).acquire()
        assert info.value.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = _hold(tmp_path, run)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (run / LOCK_NAME).read_text().strip() == str(holder.pid)  # the file is still there
    with RunLock(run) as lock:
        assert lock.took_over == holder.pid
        assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (run / LOCK_NAME).exists()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / LOCK_NAME).write_text(f"{dead}\n")
    with RunLock(run) as lock:
        assert lock.took_over == dead


def test_release_leaves_nothing_and_a_file_is_refused(tmp_path):
    run = tmp_path / "new"
    with RunLock(run):
        assert run.is_dir()
    assert not run.exists()  # created, nothing written into it: removed again
    kept = tmp_path / "kept"
    with RunLock(kept):
        (kept / "results.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == ["results.json"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="is a file"):
        RunLock(blocker).acquire()
    start = time.monotonic()
    with pytest.raises(RunDirError, match="cannot write to the run directory"):
        RunLock(blocker / "sub").acquire()
    assert time.monotonic() - start < 5
