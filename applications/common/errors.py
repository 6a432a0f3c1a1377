"""The error-to-exit-code policy of every command of the applications.

A user error (a bad configuration or option, an unusable run directory or checkpoint, unreadable data,
an unavailable device, a file that cannot be written) is one line on stderr and exit status
:data:`EXIT_USAGE`, never a traceback; a run that diverged exits :data:`EXIT_DIVERGED`; an interrupt
keeps the last checkpoint and exits 128 + the signal's number (:data:`EXIT_SIGINT`, :data:`EXIT_SIGTERM`).
Anything else is a bug of the program and keeps its traceback (exit 1).
"""

from __future__ import annotations

import signal

__all__ = ["EXIT_DIVERGED", "EXIT_OK", "EXIT_SIGINT", "EXIT_SIGTERM", "EXIT_USAGE", "Diverged", "UserError"]

#: Success.
EXIT_OK = 0
#: A user error: invalid configuration or option, unusable run directory / checkpoint / data / device / output.
EXIT_USAGE = 2
#: The run diverged (a non-finite or exploding loss); the last good checkpoint is kept.
EXIT_DIVERGED = 3
#: Interrupted by SIGINT (Ctrl-C): 128 + 2.
EXIT_SIGINT = 128 + int(signal.SIGINT)
#: Stopped by SIGTERM: 128 + 15.
EXIT_SIGTERM = 128 + int(signal.SIGTERM)


class UserError(Exception):
    """An error the user can fix (its message says how); a command prints it as one line and exits
    :data:`EXIT_USAGE`."""


class Diverged(RuntimeError):
    """The optimization diverged; a command prints the message as one line and exits :data:`EXIT_DIVERGED`."""
