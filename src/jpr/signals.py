"""Graceful stop: the first SIGTERM or SIGINT asks a run to stop at the next step.

A preemptible job gets a SIGTERM some seconds before its machine goes away;
Ctrl-C sends a SIGINT. :class:`GracefulStop` turns the first one into a flag
that the training loop reads between steps, so that the checkpoint being
written is finished (never cut in half by an exception), the current step is
saved, and the run exits with ``128 + signal number`` and a message that says
how to resume. In a multi-process run the processes exchange their flags at
every chunk boundary and stop together. A second signal of the same kind
stops the process at once, as if no handler were installed; checkpoints
stay safe even then, because an interrupted save is never listed as a step.

This module does not import JAX.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

__all__ = ["GracefulStop", "Stopped"]


class Stopped(Exception):
    """A run stopped early on request; ``code`` is the exit status (128 + signal).

    Example:
        >>> import signal
        >>> from jpr.signals import Stopped
        >>> e = Stopped(signal.SIGTERM, "stopped by SIGTERM after step 8")
        >>> e.code, str(e)
        (143, 'stopped by SIGTERM after step 8')
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.code = 128 + int(signum)


class GracefulStop:
    """Context manager: record the first SIGTERM/SIGINT instead of dying.

    Handlers can only be installed from the main thread; elsewhere (or with
    ``enabled=False``) the context does nothing and :attr:`requested` stays
    ``False``. The previous handlers are put back on exit.

    Args:
        signals: the signals to catch.
        enabled: install the handlers at all.

    Example:
        >>> import os, signal
        >>> from jpr.signals import GracefulStop
        >>> with GracefulStop() as stop:
        ...     os.kill(os.getpid(), signal.SIGTERM)
        ...     stop.requested, stop.name
        (True, 'SIGTERM')
    """

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
        *,
        enabled: bool = True,
    ):
        self.signals = signals
        self.enabled = enabled
        #: The first signal received, or ``None``.
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """``"SIGTERM"``, ``"SIGINT"``, ... or ``None``."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # Asked twice: stop now, the way the signal would have without us.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> GracefulStop:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def release(self) -> None:
        """Put the previous handlers back now; a signal already received is re-sent to them.

        For code that finds out late that it cannot stop gracefully. (A
        multi-process ``jpr run`` no longer needs it: its processes agree on
        where to stop, see :func:`jpr.distributed.stop_requested_anywhere`.)
        """
        installed = bool(self._previous)
        self._restore()
        pending, self.signum = self.signum, None
        if installed and pending is not None:
            os.kill(os.getpid(), pending)

    def stopped(self, message: str) -> Stopped:
        """The :class:`Stopped` exception to raise, for the signal received."""
        assert self.signum is not None
        return Stopped(self.signum, message)
