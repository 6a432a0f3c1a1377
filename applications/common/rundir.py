"""A run directory held by one process at a time.

:class:`RunLock` creates the directory and takes ``<run>/.lock``: an exclusive ``fcntl.flock`` on the
file (released by the kernel when its holder dies, however it dies), and the holder's pid written into
it. A second process on the same directory gets :class:`RunDirBusy`, whose message names the holder's
pid, instead of mixing its files with the first run's. A lock file left by a dead process (a kill, a
crash, a machine that went down) holds no ``flock`` any more and is taken over. Where ``fcntl`` is
missing (Windows) the file is created with ``O_EXCL`` instead, and a lock whose pid no longer runs is
taken over.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType
from typing import Optional, Type

from .atomic import PathLike, pid_alive
from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunDirBusy", "RunDirError", "RunLock"]

#: The lock file of a run directory.
LOCK_NAME = ".lock"


class RunDirError(UserError):
    """The run directory cannot be used (holds a checkpoint of another run, lacks one to resume, is a file,
    or cannot be written)."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory; ``pid`` is its process id (None if unreadable)."""

    def __init__(self, run_dir: Path, pid: Optional[int]) -> None:
        self.run_dir, self.pid = run_dir, pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"run directory {run_dir} is in use by {holder}; wait for it to finish, stop it, "
                         "or choose another output.name")


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


class RunLock:
    """The exclusive hold of a run directory; a context manager (``with RunLock(run_dir) as lock: ...``).

    Args:
        run_dir: the directory (created with its parents when missing).

    Attributes:
        took_over: the pid of a dead process whose lock was taken over, else None.

    Raises (from :meth:`acquire`):
        RunDirBusy: a live process holds the directory.
        RunDirError: the directory cannot be created or written (it is a file, read-only, ...).
    """

    def __init__(self, run_dir: PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.took_over: Optional[int] = None
        self._fd: Optional[int] = None
        self._created = False

    def acquire(self) -> RunLock:
        """Takes the lock (see the class docstring); returns self."""
        if self._fd is not None:
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run directory {self.run_dir} is a file; choose another output.dir / output.name")
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fd = self._flock() if fcntl is not None else self._exclusive()
        except OSError as exc:
            raise RunDirError(f"cannot write to the run directory {self.run_dir}: {exc.strerror or exc}") from None
        return self

    def _flock(self) -> int:
        for _ in range(10):  # retried while a finishing holder removes the file we opened
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                same = os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path))
            except BlockingIOError:
                os.close(fd)
                raise RunDirBusy(self.run_dir, _read_pid(self.path)) from None
            except BaseException:
                os.close(fd)
                raise
            if not same:
                os.close(fd)
                continue
            previous = _read_pid(self.path)
            if previous is not None and previous != os.getpid():
                self.took_over = previous
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            return fd
        raise RunDirBusy(self.run_dir, _read_pid(self.path))

    def _exclusive(self) -> int:  # pragma: no cover - platforms without fcntl
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is not None and pid_alive(pid):
                    raise RunDirBusy(self.run_dir, pid) from None
                self.took_over = pid
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        raise RunDirBusy(self.run_dir, _read_pid(self.path))

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Gives the directory back (the lock file is removed, and the directory too when :meth:`acquire`
        created it and nothing was written into it); a no-op when not held."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()
