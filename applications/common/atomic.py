"""Atomic file writes with per-process temporary names, and the removal of what killed writers left.

Every file of a run directory is written to ``.<name>.<pid>.<hex>.tmp`` beside its destination (created
exclusively, so two processes never share one), flushed, ``fsync``\\ ed and renamed onto the destination
with ``os.replace`` (atomic on POSIX and Windows when both names are on one file system); the directory
is then ``fsync``\\ ed so that the rename itself is durable. A process killed at any instant leaves either
the previous complete file or the new one, and at worst its temporary (SIGINT and SIGTERM wait for the
write to end: :func:`~applications.common.interrupts.deferred`), which
:func:`remove_stale_temporaries` deletes once the writer's process is gone. A failure (a full disk, a
read-only or vanished directory, ``KeyboardInterrupt``) removes the temporary and raises :class:`OSError`
with the errno of the cause and a message naming the destination.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from .interrupts import deferred

__all__ = [
    "PathLike",
    "pid_alive",
    "remove_stale_temporaries",
    "temporary_file",
    "temporary_name",
    "write_atomic",
    "write_json",
    "write_metrics",
    "write_text",
]

PathLike = Union[str, "os.PathLike[str]"]

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp(?P<suffix>\.[A-Za-z0-9]+)?$")


def temporary_name(path: Path, suffix: str = "") -> Path:
    """``<dir>/.<name>.<pid>.<12 hex>.tmp<suffix>``: unique to this process and call (``suffix``: for writers
    that choose the format by the extension, such as matplotlib's ``savefig``)."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows, or file systems that refuse to open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(err: BaseException) -> Optional[OSError]:
    """The OSError that ``err`` is or was raised while handling (torch's zip writer wraps it)."""
    e: Optional[BaseException] = err
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def write_atomic(path: PathLike, write: Callable[[IO[bytes]], None], what: str = "file") -> None:
    """Calls ``write(f)`` on a binary file that becomes ``path`` only once complete (see the module docstring).

    The parent directory is created if missing. ``what`` names the file in an error ("checkpoint", ...).

    Raises:
        OSError: the file cannot be written (errno of the cause; the message names ``path``).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    tmp = temporary_name(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {what} {path}: {err.strerror}") from err
    try:
        with deferred():  # a signal waits for the write and the rename
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(err)
        if cause is not None:
            raise OSError(cause.errno, f"cannot write {what} {path}: {cause.strerror or cause}") from err
        raise
    _fsync_directory(directory)


def write_text(path: PathLike, text: str) -> None:
    """``text`` (UTF-8) at ``path``, atomically."""
    data = text.encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


def write_json(path: PathLike, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    write_text(path, json.dumps(obj, indent=2))


def write_metrics(run_dir: PathLike, history: List[Dict[str, Any]], fields: Sequence[str]) -> None:
    """``metrics.jsonl`` (every key) and ``metrics.csv`` (columns ``fields``) rewritten from the history."""
    run_dir = Path(run_dir)
    write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in history:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    write_text(run_dir / "metrics.csv", buf.getvalue())


@contextlib.contextmanager
def temporary_file(path: PathLike) -> Iterator[Path]:
    """A per-process temporary name with ``path``'s extension, renamed onto ``path`` when the block ends
    without an error (removed otherwise): for writers that take a file name, such as ``savefig``."""
    path = Path(path)
    tmp = temporary_name(path, path.suffix)
    try:
        with deferred():
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (True where it exists but belongs to someone else, or cannot be told)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else (or the platform cannot tell): keep its file
        return True
    return True


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Deletes the ``.<name>.<pid>.<hex>.tmp`` files of ``directory`` whose writing process no longer
    runs (a write that was killed); returns their paths."""
    directory = Path(directory)
    removed: List[Path] = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        m = _TEMPORARY.match(p.name)
        if m and p.is_file() and not pid_alive(int(m.group("pid"))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
