"""One writer per checkpoint folder: an advisory lock on ``<folder>/.jpr-lock``.

A run that saves into a folder holds an exclusive ``fcntl.flock`` on the file
``.jpr-lock`` in it for as long as it runs. The file says who holds it (JSON:
``pid``, ``host``, ``started``, ``command``), so that a second run on the same
folder can refuse at once, in one line that names the first. The kernel drops
the lock when its holder exits, however it exits (SIGKILL included): a lock
file left behind by a dead run is taken over, and the new holder says so.

The lock file is removed when the lock is released normally. Taking the lock
checks that the file locked is still the one at the path (a releasing holder
may have just removed it), so two runs can never both believe they hold it.

The lock is advisory: it keeps ``jpr`` runs (and anyone using
:func:`folder_lock`) apart, not other programs. ``flock`` works between the
processes of one machine; on a network file system it is only as good as the
file system's locking (NFS emulates it with POSIX record locks).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jpr.errors import JprError

__all__ = [
    "LOCK_NAME",
    "FolderLock",
    "FolderLocked",
    "describe",
    "folder_lock",
    "holder",
    "releasing",
]

#: The lock file's name inside the folder (a dot file: not a step to Orbax or ``jpr``).
LOCK_NAME = ".jpr-lock"

#: Locks held by this process, oldest first (see :func:`releasing`).
_HELD: list[FolderLock] = []


class FolderLocked(JprError):
    """The folder is locked by another writer.

    Attributes:
        holder: what the lock file says about the holder (``pid``, ``host``,
            ``started``, ``command``); empty if it could not be read.

    Example:
        >>> from jpr.lock import FolderLocked
        >>> e = FolderLocked("ck is in use", {"pid": 12})
        >>> e.holder["pid"], str(e)
        (12, 'ck is in use')
    """

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    name = os.path.basename(argv[0])
    if argv[0] == "-c":
        name = "python -c ..."  # the code itself is not a command line
    elif name == "__main__.py":
        name = "python -m " + os.path.basename(os.path.dirname(argv[0]))
    elif name.endswith(".py") and os.path.basename(os.path.dirname(argv[0])) == "jpr":
        name = "python -m jpr." + name[:-3]
    text = " ".join([name, *(shlex.quote(a) for a in argv[1:])])
    return text if len(text) <= 300 else text[:297] + "..."


def _now() -> str:
    t = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return t.isoformat().replace("+00:00", "Z")


def _parse(blob: bytes) -> dict[str, Any]:
    try:
        info = json.loads(blob.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def describe(info: dict[str, Any]) -> str:
    """``pid N on HOST, started TIME (COMMAND)``: the holder, as far as known.

    Example:
        >>> from jpr.lock import describe
        >>> describe({"pid": 7, "host": "h1", "started": "2026-01-02T03:04:05Z",
        ...           "command": "jpr run --steps 400"})
        'pid 7 on h1, started 2026-01-02T03:04:05Z (jpr run --steps 400)'
        >>> describe({})
        'a holder that has not written its details'
    """
    if "pid" not in info:
        return "a holder that has not written its details"
    text = f"pid {info['pid']}"
    if info.get("host"):
        text += f" on {info['host']}"
    if info.get("started"):
        text += f", started {info['started']}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def holder(directory: str | Path) -> dict[str, Any] | None:
    """What the lock file of ``directory`` says about a writer still running, or ``None``.

    Reads only: takes no lock (not even a shared one, which could make a
    writer starting at that moment refuse) and changes nothing. A lock file
    naming a process of this host that is gone is reported as ``None``.

    Example:
        >>> import os, tempfile
        >>> from jpr.lock import folder_lock, holder
        >>> d = tempfile.mkdtemp()
        >>> holder(d) is None
        True
        >>> with folder_lock(d):
        ...     holder(d)["pid"] == os.getpid()
        True
        >>> holder(d) is None
        True
    """
    try:
        info = _parse((Path(directory) / LOCK_NAME).read_bytes())
    except OSError:
        return None
    if not info:
        return None
    if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
        return None
    return info


class FolderLock:
    """An exclusive, advisory lock on a folder (``<folder>/.jpr-lock``).

    Args:
        directory: the folder to lock; it must exist when the lock is taken.
        shown: how to name the folder in messages (default: ``directory`` as given).
        command: the command line written into the lock file (default: this
            process's, as typed).

    Attributes:
        previous: after :meth:`acquire`, what the lock file said about a holder
            that had gone without releasing it (``None`` if there was none).

    Example:
        >>> import tempfile
        >>> from jpr.lock import FolderLock, FolderLocked
        >>> d = tempfile.mkdtemp()
        >>> first = FolderLock(d, shown="ck").acquire()
        >>> try:
        ...     FolderLock(d, shown="ck").acquire()
        ... except FolderLocked as e:
        ...     print(str(e).split(":")[0])
        checkpoint dir ck is in use by another writer in this process
        >>> first.release()
        >>> with FolderLock(d) as again:
        ...     again.held
        True
    """

    def __init__(
        self, directory: str | Path, *, shown: str | None = None, command: str | None = None
    ):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.shown = str(directory) if shown is None else shown
        self.command = command
        self.previous: dict[str, Any] | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    @property
    def notice(self) -> str | None:
        """One line about a lock taken over from a holder that is gone, or ``None``."""
        p = self.previous
        if p is None:
            return None
        pid = p.get("pid", "?")
        host = p.get("host")
        if host and host != socket.gethostname():
            why = f"on {host}; it no longer holds it"
        elif _alive(pid):
            why = "it no longer holds it"
        else:
            why = "no longer running"
        return f"{self.shown}: taking over a lock left by pid {pid} ({why})"

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`FolderLocked` naming its holder; returns ``self``.

        Never waits for the holder: a second writer is refused at once.
        """
        if self._fd is not None:
            return self
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise JprError(
                    f"cannot lock checkpoint dir {self.shown}: {e.strerror or e}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read_holder(fd)
                os.close(fd)
                raise self._locked(info) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise JprError(
                        f"cannot lock checkpoint dir {self.shown}: its file system does not "
                        f"support locks ({e.strerror})"
                    ) from None
                raise JprError(f"cannot lock checkpoint dir {self.shown}: {e.strerror}") from None
            if self._same_file(fd):
                break
            os.close(fd)  # removed or replaced by a holder releasing it: try the new one
        else:  # pragma: no cover - a folder where the lock file keeps vanishing
            raise JprError(f"cannot lock checkpoint dir {self.shown}: the lock file keeps changing")
        left = _parse(os.pread(fd, 1 << 16, 0))
        self.previous = left or None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "command": self.command if self.command is not None else _command(),
        }
        blob = json.dumps(info, sort_keys=True).encode() + b"\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, blob, 0)
        except OSError as e:  # a full disk: the lock holds, its file names nobody
            if e.errno != errno.ENOSPC:
                os.close(fd)
                raise JprError(f"cannot lock checkpoint dir {self.shown}: {e.strerror}") from None
        self._fd = fd
        _HELD.append(self)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (does nothing if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(ValueError):
            _HELD.remove(self)
        try:
            if self._same_file(fd):
                with contextlib.suppress(OSError):
                    os.unlink(self.path)  # while still holding it: see _same_file
        finally:
            os.close(fd)

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _read_holder(self, fd: int) -> dict[str, Any]:
        # The holder writes its details just after taking the lock: give it a moment.
        deadline = time.monotonic() + 1.0
        while True:
            info = _parse(os.pread(fd, 1 << 16, 0))
            if info or time.monotonic() > deadline:
                return info
            time.sleep(0.01)

    def _locked(self, info: dict[str, Any]) -> FolderLocked:
        if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            return FolderLocked(
                f"checkpoint dir {self.shown} is in use by another writer in this process: "
                "close it first (Checkpointer.close)",
                info,
            )
        return FolderLocked(
            f"checkpoint dir {self.shown} is in use by another run: {describe(info)}; "
            "wait for it to finish, or use another --checkpoint-dir",
            info,
        )

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lock never outlives its object
        if self._fd is not None:
            with contextlib.suppress(Exception):
                self.release()


def folder_lock(
    directory: str | Path, *, shown: str | None = None, command: str | None = None
) -> FolderLock:
    """A :class:`FolderLock` on ``directory``, to use in a ``with`` statement.

    Anyone who writes into a checkpoint folder outside ``jpr run`` can take
    the same lock, so that a ``jpr run`` started on it meanwhile refuses.

    Example:
        >>> import tempfile
        >>> from jpr.lock import folder_lock
        >>> d = tempfile.mkdtemp()
        >>> with folder_lock(d) as lock:
        ...     lock.path.name
        '.jpr-lock'
        >>> lock.held, lock.path.exists()
        (False, False)
    """
    return FolderLock(directory, shown=shown, command=command)


@contextlib.contextmanager
def releasing() -> Iterator[None]:
    """Release every lock taken inside the block when it ends, however it ends.

    ``jpr run`` runs inside one: a run that fails (bad input, a corrupt
    checkpoint) leaves no lock behind, even when it runs in-process.

    Example:
        >>> import tempfile
        >>> from jpr.lock import FolderLock, releasing
        >>> d = tempfile.mkdtemp()
        >>> with releasing():
        ...     lock = FolderLock(d).acquire()
        >>> lock.held
        False
    """
    before = list(_HELD)
    try:
        yield
    finally:
        for lock in [x for x in _HELD if x not in before]:
            lock.release()
