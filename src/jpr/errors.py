"""The one exception type that the command line turns into a clean exit 2."""

from __future__ import annotations

__all__ = ["JprError"]


class JprError(Exception):
    """Bad input or a refused operation: reported as one line, exit code 2.

    Example:
        >>> from jpr.errors import JprError
        >>> str(JprError("checkpoint step 7 not found"))
        'checkpoint step 7 not found'
    """
