"""SIGINT and SIGTERM as an exception, never in the middle of a write.

Inside :func:`interrupts_raise`, either signal raises :class:`Interrupted` in the main thread, wherever it
is (a training step in progress is abandoned). Inside a :func:`deferred` block (every atomic write is
one) the signal is only recorded, and raised when the block ends: a write is finished and renamed, or
not begun, but never cut in the middle, where the file writer's own clean-up would turn the interrupt
into an unrelated error.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Dict, Iterator, List

__all__ = ["Interrupted", "deferred", "interrupts_raise"]


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (``signum``); a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` of the run swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


_state: Dict[str, Any] = {"depth": 0, "pending": []}


def _handler(signum: int, frame: Any) -> None:
    if _state["depth"] > 0:
        _state["pending"].append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a signal does not cut: one that arrives inside it is raised when it ends (in the
    main thread; elsewhere, and outside :func:`interrupts_raise`, the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        pending: List[int] = _state["pending"]
        if _state["depth"] == 0 and pending:
            signum = pending[0]
            pending.clear()
            raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (deferred inside
    :func:`deferred` blocks); the previous handlers come back after it. Elsewhere than in the main
    thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _state["pending"].clear()
