"""JAX's C++ runtime log, kept out of a multi-process run's one-line errors.

When a peer of a multi-process run dies, JAX's runtime (XLA's coordination
service client, gRPC, gloo) writes its own view to file descriptor 2 from
C++: absl log lines (``E1202 05:01:54.473958 17602 client.h:80] …``),
gRPC details, and, when it decides the process must end (process 0, which
hosts the coordination service, is gone), a ``LOG(FATAL)`` with a stack dump
followed by ``abort()``. Nothing in Python can catch that abort, and the
callback JAX's client offers for it cannot be called from Python (JAX 0.10.2:
its ``absl::Status`` argument has no Python type, so it throws
``std::bad_cast`` instead).

So in a multi-process run, :func:`route` gives descriptor 2 to a small
filter process (this file, run as a script: it imports nothing of jpr or
JAX) and points Python's ``sys.stderr`` at a copy of the original
descriptor. Python's output (jpr's lines, tracebacks, warnings) goes out as
before; the runtime's ``I``/``W`` lines pass through; its ``E``/``F``
messages and stack dumps go to a log file instead. jpr's own error line is
written through the filter too (:func:`say`); when the runtime ended the
process before jpr could say anything, the filter, which outlives it, prints
the one line::

    jpr run: error: JAX's distributed runtime ended process 1: … (its log: …)

Either way a process that ends says one line, once.

Set ``JPR_RUNTIME_LOGS=show`` to leave descriptor 2 alone and see everything.
This module does not import JAX.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import threading
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import subprocess

__all__ = ["ENV_SHOW", "HOLD_S", "filter_lines", "route", "say"]

#: ``JPR_RUNTIME_LOGS=show`` turns the filter off.
ENV_SHOW = "JPR_RUNTIME_LOGS"

#: An absl log line: severity, date, time, thread, ``file:line]``.
_HEADER = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\]]+\] ?")
#: Lines that start a fatal end of the process without an absl header.
_FATAL = (b"*** Check failure stack trace", b"terminate called after throwing")

#: Starts a line that jpr itself says through the filter (:func:`say`).
_MARK = b"\x1ejpr\x1e"

_filters: list[subprocess.Popen] = []  # kept alive for the life of the process


def say(line: str) -> None:
    """Print jpr's one line about how this process ends.

    Routed (:func:`route`): the line goes through the filter process, in one
    ``write`` to descriptor 2, so it is printed even if JAX's runtime aborts
    the process the moment after, and the filter does not add its own. The
    filter prints it when the process has ended, or :data:`HOLD_S` seconds
    later if it has not, naming the runtime's log if anything reached it by
    then. Otherwise it is printed to ``sys.stderr``.

    Example:
        >>> import contextlib, io
        >>> from jpr.runtime_log import say
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     say("jpr run: error: no such step")
        >>> err.getvalue()
        'jpr run: error: no such step\\n'
    """
    if _filters and _filters[0].poll() is None:
        sys.stderr.flush()
        os.write(2, _MARK + line.encode("utf-8", "backslashreplace") + b"\n")
    else:
        print(line, file=sys.stderr)


#: At most this long (seconds) jpr's line waits for the process to end.
HOLD_S = 5.0


class _Out:
    """The filter's output: lines copied through, and jpr's line, held.

    jpr's line is written when the process ends (:meth:`close`) or
    :data:`HOLD_S` after it came, whichever is first, naming the log if it
    holds lines by then. One lock orders the writes of the two threads.
    """

    def __init__(self, dst: BinaryIO, where: str, hold_s: float):
        self.dst, self.where, self.hold_s = dst, where, hold_s
        self.kept, self.said, self.held = 0, False, []
        self.lock, self.timer = threading.Lock(), None

    def write(self, line: bytes) -> None:
        with self.lock:
            self.dst.write(line)
            self.dst.flush()

    def hold(self, line: bytes) -> None:
        with self.lock:
            self.held.append(line)
            self.said = True
        if self.timer is None:
            self.timer = threading.Timer(self.hold_s, self.release)
            self.timer.daemon = True
            self.timer.start()

    def release(self) -> None:
        with self.lock:
            named = f" (JAX's runtime log: {self.where})\n".encode() if self.kept else b"\n"
            for line in self.held:
                self.dst.write(line + named)
            self.held = []
            self.dst.flush()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.release()


def filter_lines(src: BinaryIO, dst: BinaryIO, log: BinaryIO, label: str, where: str,
                 *, hold_s: float = HOLD_S) -> int:
    """Copy ``src`` to ``dst`` line by line, diverting runtime errors to ``log``.

    An ``E`` or ``F`` absl line and the lines after it (its continuation,
    up to the next ``I``/``W`` line) go to ``log``, as do C++ stack dumps;
    everything else is copied. A line from :func:`say` is written without its
    mark when ``src`` ends (the process has ended) or ``hold_s`` seconds after
    it came, whichever is first: the runtime may still log while the process
    exits, and the line names the log if anything reached it by then. If the
    runtime ended the process (an ``F`` line or a C++ ``terminate``) and jpr
    said nothing, one ``jpr run: error:`` line naming process ``label``
    (``""``: unknown) and the log ``where`` is written to ``dst`` at the end.

    Returns:
        The number of lines written to ``log``.

    Example:
        >>> import io
        >>> from jpr.runtime_log import filter_lines
        >>> src = io.BytesIO(
        ...     b"W1202 05:01:54.4 17 a.cc:9] a warning\\n"
        ...     b"E1202 05:01:54.4 17 b.cc:2] Polled an error\\n"
        ...     b"F1202 05:01:54.4 17 client.h:80] Terminating. More.\\n"
        ...     b"*** Check failure stack trace: ***\\n"
        ... )
        >>> dst, log = io.BytesIO(), io.BytesIO()
        >>> filter_lines(src, dst, log, "1", "r.log")
        3
        >>> print(dst.getvalue().decode(), end="")
        W1202 05:01:54.4 17 a.cc:9] a warning
        jpr run: error: JAX's distributed runtime ended process 1: Terminating (its log: r.log)
    """
    out, hiding, fatal = _Out(dst, where, hold_s), False, None
    for line in src:
        head = _HEADER.match(line)
        if line.startswith(_MARK):
            out.hold(line[len(_MARK):].rstrip(b"\n"))
            hiding = False
            continue
        if head:
            hiding = head.group(1) in b"EF"
            if head.group(1) == b"F" and fatal is None:
                fatal = line[head.end():]
        elif line.startswith(_FATAL):
            hiding, fatal = True, fatal or line
        if hiding:
            log.write(line)
            log.flush()
            with out.lock:
                out.kept += 1
        else:
            out.write(line)
    out.close()
    if fatal is not None and not out.said:
        first = fatal.decode("utf-8", "replace").strip().split(". ")[0].rstrip(".")
        out.write(
            f"jpr run: error: JAX's distributed runtime ended "
            f"{f'process {label}' if label else 'this process'}: "
            f"{first[:200]} (its log: {where})\n".encode()
        )
    return out.kept


def route(label: str) -> str | None:
    """Give descriptor 2 to a filter process; Python keeps the real stderr.

    Call once, before ``jax.distributed.initialize``. Returns the path of the
    log file the runtime's error messages go to (removed again if none came),
    or ``None`` when :data:`ENV_SHOW` is ``show`` or descriptor 2 is closed.

    Example:
        >>> import os
        >>> from jpr.runtime_log import ENV_SHOW
        >>> os.environ.get(ENV_SHOW, "unset")
        'unset'
    """
    if os.environ.get(ENV_SHOW, "").lower() == "show":
        return None
    import subprocess  # here, not at the top: every jpr command imports this module
    import tempfile

    try:
        real = os.dup(2)
    except OSError:
        return None
    fd, path = tempfile.mkstemp(prefix=f"jpr-runtime-p{label}-", suffix=".log")
    os.close(fd)
    proc = subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), label, path],
        stdin=subprocess.PIPE, stdout=real, stderr=real, close_fds=True,
    )
    _filters.append(proc)
    sys.stderr.flush()
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    sys.stderr = io.TextIOWrapper(
        io.FileIO(real, "w"), encoding=encoding, errors="backslashreplace",
        line_buffering=True, write_through=True,
    )
    return path


def _main(label: str, path: str) -> None:
    # Outlive the process it serves: its signals are not for the filter, and
    # the end of its descriptor 2 (EOF) is when the filter's work is done.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with open(path, "ab") as log:
        kept = filter_lines(sys.stdin.buffer, sys.stdout.buffer, log, label, path)
    if not kept:
        os.remove(path)


if __name__ == "__main__":
    _main(*sys.argv[1:3])
