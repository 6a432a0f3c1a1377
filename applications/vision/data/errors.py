"""The one error a dataset that cannot be read raises."""

from __future__ import annotations

from applications.common.errors import UserError

__all__ = ["DataError"]


class DataError(UserError, ValueError):
    """A dataset that cannot be used: a truncated or corrupt archive, an image that does not decode,
    arrays of the wrong shape or labels. The message names the file."""
