"""Argument parsing and error handling shared by every ``jpr`` subcommand.

Below the subcommand modules (``compare``, ``run_repro``, ``verify``,
``launch``) and ``cli`` above them: each imports this module, and none imports
``cli``, so there is no import circle. ``jpr.cli`` re-exports both names.
It does not import JAX (``jpr compare`` never loads it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from jpr.errors import JprError
from jpr.runtime_log import say
from jpr.signals import Stopped

__all__ = ["Parser", "guarded"]


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`JprError` (one line, exit 2) on bad usage.

    Example:
        >>> from jpr._cli_common import Parser
        >>> from jpr.errors import JprError
        >>> p = Parser(prog="demo")
        >>> _ = p.add_argument("--steps", type=int)
        >>> try:
        ...     p.parse_args(["--steps", "abc"])
        ... except JprError as e:
        ...     print(e)
        argument --steps: invalid int value: 'abc'
    """

    def error(self, message: str):  # type: ignore[override]
        raise JprError(message)


def guarded(fn: Callable[[], int], *, prog: str = "jpr") -> int:
    """Run ``fn``; turn :class:`JprError` into ``prog: error: …`` and exit code 2.

    A run stopped by SIGTERM/SIGINT (:class:`jpr.signals.Stopped`) prints its
    message and exits with 128 + the signal number. Orbax's own log lines
    (absl warnings, asyncio's "Task exception was never retrieved" after a
    failed read) are silenced: every failure is reported here, once.

    Example:
        >>> from jpr._cli_common import guarded
        >>> from jpr.errors import JprError
        >>> def bad():
        ...     raise JprError("no such step")
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = guarded(bad, prog="jpr run")
        >>> code, err.getvalue().strip()
        (2, 'jpr run: error: no such step')
    """
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return fn()
    except Stopped as e:
        say(f"{prog}: {e}")
        return e.code
    except JprError as e:
        # Deferred: jpr.distributed loads NumPy, which only a failing command needs.
        from jpr.distributed import exit_now_if_distributed, reported_elsewhere

        if not reported_elsewhere(e):  # a check every process failed: process 0 says it
            say(f"{prog}: error: {e}")
        # Multi-process: a lone failure never waits for its peers at shutdown;
        # a failure every process shares shuts down together, in order.
        exit_now_if_distributed(2, together=getattr(e, "collective", False))
        return 2
    except Exception as e:
        # A collective that failed because a peer process is gone (killed,
        # crashed): one line, not a traceback from JAX's runtime.
        from jpr.distributed import exit_now_if_distributed, peer_failure

        said = peer_failure(e)
        if said is None:
            raise
        say(f"{prog}: error: {said}")
        exit_now_if_distributed(1)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
