"""One command-line grammar and one way out for every command of the applications.

Grammar: options (``--config FILE``, ``--no-progress``, ...) and ``key.sub=value`` overrides in any
order, e.g. ``bilevel-train train.epochs=1 --no-progress seed=1`` (:func:`parse_args`, argparse's
intermixed parsing).

Way out (:func:`run_command`): the command's body runs with SIGINT and SIGTERM turned into
:class:`~applications.common.interrupts.Interrupted`, raised wherever the main thread is (the current
step is abandoned), except inside a write, which is finished first
(:func:`~applications.common.interrupts.deferred`). Then:

* a :class:`~applications.common.errors.UserError` or an ``OSError`` (a full disk, a read-only folder)
  prints ``error: <message>`` on stderr, no traceback (one line; a configuration error lists its
  problems one per line below it) and exits 2;
* :class:`~applications.common.errors.Diverged` prints its message and exits 3;
* ``Interrupted`` prints one line, ``interrupted by SIGINT: <how to resume>``, and exits 130
  (SIGINT) or 143 (SIGTERM);
* anything else is a bug and keeps its traceback.

Under ``torchrun`` (``RANK`` set) an error that rank 0 reports for the whole run (one it raises itself, or that
every rank meets alike: :func:`~applications.common.distributed.silent_exit_code`) ends the other ranks silently
with the same status, so the run prints one line; a collective that fails because another process is gone is one
line on rank 0, ``error: another process of the run stopped (...)``, exit 4.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

from .distributed import EXIT_PEER_LOST, env_int, leave_silently, peer_lost, peer_lost_reason, silent_exit_code
from .errors import EXIT_DIVERGED, EXIT_USAGE, Diverged, UserError
from .interrupts import Interrupted, interrupts_raise

__all__ = ["help_text", "ResumeHint", "parse_args", "run_command"]


class ResumeHint:
    """What the interrupt message says: ``command``, the command that resumes the run, and ``checkpoint``,
    the file it continues from, both set once the run directory is known."""

    def __init__(self, before: str = "stopped before the run started; nothing was saved") -> None:
        self.command: Optional[str] = None
        self.checkpoint: Optional[Path] = None
        self.before = before  # what an interrupt means before there is a run (a command that trains none says so)

    def message(self) -> str:
        """The sentence after ``interrupted by SIG...:``."""
        if self.command is None:
            return self.before
        if self.checkpoint is not None and not self.checkpoint.is_file():
            return "stopped before the first checkpoint; run the same command again to start afresh"
        where = f" ({self.checkpoint})" if self.checkpoint is not None else ""
        return f"the last checkpoint{where} is kept; resume with: {self.command}"


def help_text(doc: str) -> str:
    """A docstring as ``--help`` prints it: reST roles reduced to their name, double backticks dropped."""
    return re.sub(r":\w+:`~?\.?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], doc).replace("``", "")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """``parser``'s arguments with options and positionals (the overrides) in any order."""
    return parser.parse_intermixed_args(argv)


def run_command(body: Callable[[ResumeHint], int], hint: Optional[ResumeHint] = None,
                prog: Optional[str] = None) -> int:
    """Runs ``body(hint)`` under the policy of the module docstring; returns the exit status.

    ``body`` sets ``hint.command`` as soon as there is a run to resume. ``prog`` prefixes the error lines
    (``bilevel-train: error: ...``; default: plain ``error: ...``).
    """
    hint = hint or ResumeHint()
    prefix = f"{prog}: " if prog else ""
    try:
        with interrupts_raise(), _reader_may_leave():
            return _on_this_rank(body, hint, prefix)
    except Interrupted as exc:
        print(f"\n{prefix}interrupted by {signal.Signals(exc.signum).name}: {hint.message()}", file=sys.stderr,
              flush=True)
        return exc.exit_code
    except KeyboardInterrupt:  # a SIGINT that arrived where the handler was not installed
        print(f"\n{prefix}interrupted by SIGINT: {hint.message()}", file=sys.stderr, flush=True)
        return 128 + int(signal.SIGINT)
    except Diverged as exc:
        print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except (UserError, OSError) as exc:
        print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE


class _DroppedWhenClosed:
    """``sys.stdout`` for a command whose reader may leave (``bilevel-train ... | head -1``): once the pipe is
    closed, what is printed is dropped and the run goes on to write its files, instead of dying of a
    ``BrokenPipeError`` before them."""

    def __init__(self, stream: Any) -> None:
        self._stream, self._gone = stream, False

    def _leave(self) -> None:
        self._gone = True
        with contextlib.suppress(OSError, ValueError):  # Python's recipe: no second error when it exits
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._leave()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._leave()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _reader_may_leave() -> Iterator[None]:
    stdout = sys.stdout
    sys.stdout = _DroppedWhenClosed(stdout)
    try:
        yield
    finally:
        sys.stdout = stdout


def _on_this_rank(body: Callable[[ResumeHint], int], hint: ResumeHint, prefix: str) -> int:
    """``body(hint)``; on a rank other than 0, an error that rank 0 reports ends it silently with that error's
    status, and on any rank a lost peer is one line (exit 4)."""
    try:
        return body(hint)
    except BaseException as exc:
        code = silent_exit_code(exc) if env_int("RANK", 0) > 0 else None
        if code is not None:
            return leave_silently(code)
        if peer_lost(exc):
            print(f"{prefix}error: another process of the run stopped ({peer_lost_reason(exc)}); {hint.message()}",
                  file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
        raise
