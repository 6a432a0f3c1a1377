"""Atomic writes: per-process temporary names (two writers of one file never collide), nothing left behind
by a failure, and the removal of what killed writers left."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from applications.common import atomic
from applications.common.atomic import remove_stale_temporaries, temporary_file, write_json, write_text

_WRITER = """
import sys
from pathlib import Path
from applications.common.atomic import write_metrics
run = Path(sys.argv[1])
for i in range(150):
    write_metrics(run, [{"step": i, "writer": sys.argv[2]}], ["step", "writer"])
"""


def test_two_processes_writing_the_same_files_never_collide(tmp_path):
    """Two runs in one directory both finish; the old shared name `.metrics.csv.tmp` made one die."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    run = tmp_path / "run"
    run.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(run), name], stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv", "metrics.jsonl"]
    assert json.loads((run / "metrics.jsonl").read_text())["step"] == 149


def test_write_text_and_json_leave_only_the_file(tmp_path):
    write_text(tmp_path / "a" / "x.txt", "é\n")  # parent created, UTF-8
    write_json(tmp_path / "a" / "y.json", {"k": [1, 2]})
    assert (tmp_path / "a" / "x.txt").read_bytes() == "é\n".encode()
    assert json.loads((tmp_path / "a" / "y.json").read_text()) == {"k": [1, 2]}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt", "y.json"]


def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(path, {"v": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(OSError, match=f"cannot write file {path}: No space left on device") as info:
        write_json(path, {"v": 2})
    assert info.value.errno == 28
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_temporary_file_keeps_the_suffix_and_is_removed_on_error(tmp_path):
    path = tmp_path / "plot.png"
    with temporary_file(path) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and str(os.getpid()) in tmp.name
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png"
    with pytest.raises(RuntimeError), temporary_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("savefig failed")
    assert path.read_bytes() == b"png" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_stray_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stray = tmp_path / f".state.pt.{dead_pid}.0123456789ab.tmp"
    stray_png = tmp_path / f".plot.png.{dead_pid}.0123456789ab.tmp.png"
    live = tmp_path / f".best.pt.{os.getpid()}.0123456789ab.tmp"  # a write in progress in this process
    other = tmp_path / ".notes.tmp"  # not one of these temporaries
    for p in (stray, stray_png, live, other):
        p.write_bytes(b"partial")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stray, stray_png])
    assert not stray.exists() and not stray_png.exists() and live.exists() and other.exists()
