"""The trainer's console: log lines above the progress bars, and the progress bars themselves."""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["ConsoleHandler", "progress"]


class ConsoleHandler(logging.Handler):
    """Writes log messages to stdout, above any tqdm progress bar (plain ``print`` without tqdm)."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the apps extra
            print(msg)
        else:
            tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    """``iterable`` under a tqdm progress bar (``kwargs``) when ``enabled`` and tqdm is installed, else itself."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, dynamic_ncols=True, **kwargs)
