"""``jpr launch -n N -- CMD…``: N local processes wired to one ``jax.distributed`` job.

The launcher picks a free port on 127.0.0.1 for the coordinator and starts N
copies of the command, process ``i`` with::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>   # JAX reads it too
    JPR_NUM_PROCESSES=N
    JPR_PROCESS_ID=i

which :func:`jpr.distributed.initialize` (and so ``jpr run``) picks up. A
command word ``jpr`` or ``python`` means this jpr and this interpreter, so the
processes run in the launcher's environment whatever ``PATH`` says.

Each line a process prints is streamed with a ``[i] `` prefix, stdout to
stdout and stderr to stderr. When a process fails (non-zero exit or a
signal), the others get ``--grace`` seconds to finish on their own, then they
are stopped (SIGTERM, then SIGKILL), so a peer blocked in a collective never
hangs the job. The launcher's exit status is the worst status of the
processes that failed on their own (a signal ``s`` counts as ``128 + s``);
``--timeout`` stops everything and exits 124.

With ``--restart-on-preempt K``, a job whose processes all stopped on a
signal together (each exited 143 or 130 on its own: the coordinated stop of
``jpr run``, which saved the step it stopped at) is started again, up to K
times, with ``--restore-from latest`` appended if the command lacks it, and
with the next process count of ``--restart-n`` (cycling) if given. With
``--microbatches`` the bits do not depend on the process count, so the
final model is the uninterrupted run's.

On a real cluster the cluster's own launcher replaces it: ``srun`` (SLURM)
and ``mpirun`` (Open MPI 4, and Open MPI 5 through :func:`jpr.distributed.pmix_settings`)
start processes that ``jpr run`` joins by itself; see :mod:`jpr.distributed`
for what is detected and what is not (Kubernetes needs ``jax[k8s]``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from jpr.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from jpr.errors import JprError
from jpr.signals import Stopped

__all__ = [
    "add_launch_arguments",
    "free_port",
    "launch",
    "parse_counts",
    "resolve_command",
    "restart_command",
    "run",
]

MAX_PROCESSES = 64


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``launch`` flags to a parser.

    Example:
        >>> import argparse
        >>> from jpr.launch import add_launch_arguments
        >>> p = argparse.ArgumentParser()
        >>> add_launch_arguments(p)
        >>> p.parse_args(["-n", "2", "--", "jpr", "run"]).num_processes
        2
    """
    p.add_argument(
        "-n",
        "--num-processes",
        type=int,
        required=True,
        metavar="N",
        help=f"number of processes (1 to {MAX_PROCESSES})",
    )
    p.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop every process after this long and exit 124",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="after a failure, how long the others may take to finish before "
        "they are stopped (default 3)",
    )
    p.add_argument(
        "--restart-on-preempt",
        type=int,
        default=0,
        metavar="K",
        help="start the job again (with --restore-from latest) after a coordinated "
        "stop on SIGTERM/SIGINT, at most K times (default 0)",
    )
    p.add_argument(
        "--restart-n",
        type=parse_counts,
        metavar="N1,N2,...",
        help="process counts of the restarts, in turn (cycling; default: -n)",
    )
    p.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ...",
        help="the command every process runs",
    )


def parse_counts(text: str) -> list[int]:
    """``"1,2,1"`` -> ``[1, 2, 1]``: the process counts of ``--restart-n``.

    Example:
        >>> from jpr.launch import parse_counts
        >>> parse_counts("1,2,1")
        [1, 2, 1]
        >>> parse_counts("2,x")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be process counts like 1,2,1, got '2,x'
    """
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be process counts like 1,2,1, got {text!r}"
        ) from None
    bad = [n for n in counts if not 1 <= n <= MAX_PROCESSES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"process counts must be between 1 and {MAX_PROCESSES}, got {bad[0]}"
        )
    return counts


def restart_command(command: Sequence[str]) -> list[str]:
    """``command`` with ``--restore-from latest`` appended, unless it names a restore already.

    Example:
        >>> from jpr.launch import restart_command
        >>> restart_command(["jpr", "run", "--checkpoint-dir", "ck"])[-2:]
        ['--restore-from', 'latest']
        >>> restart_command(["jpr", "run", "--restore-from=40"])
        ['jpr', 'run', '--restore-from=40']
    """
    argv = list(command)
    if any(a == "--restore-from" or a.startswith("--restore-from=") for a in argv):
        return argv
    return [*argv, "--restore-from", "latest"]


def _restore_text(command: list[str]) -> str:
    for i, a in enumerate(command):
        if a.startswith("--restore-from="):
            return a.replace("=", " ", 1)
        if a == "--restore-from" and i + 1 < len(command):
            return f"{a} {command[i + 1]}"
    return "as before"


#: What each process of a coordinated stop exits with: 128 + SIGINT, 128 + SIGTERM.
PREEMPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago.

    Example:
        >>> from jpr.launch import free_port
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_command(command: Sequence[str]) -> list[str]:
    """The argv to start: ``jpr`` and ``python`` mean this jpr and this interpreter.

    Example:
        >>> import sys
        >>> from jpr.launch import resolve_command
        >>> resolve_command(["jpr", "run", "--steps", "5"])[1:]
        ['-m', 'jpr', 'run', '--steps', '5']
        >>> resolve_command(["python", "-c", "pass"])[0] == sys.executable
        True
    """
    argv = list(command)
    if not argv:
        raise JprError("no command given: jpr launch -n N -- CMD ...")
    if argv[0] == "jpr":
        return [sys.executable, "-m", "jpr", *argv[1:]]
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    if shutil.which(argv[0]) is None:
        raise JprError(f"command not found: {argv[0]}")
    return argv


def _pump(src: IO[bytes], dst: IO[str], prefix: str, lock: threading.Lock) -> None:
    for raw in iter(src.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        with lock:
            dst.write(f"{prefix}{line}\n")
            dst.flush()
    src.close()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


def _describe(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def _processes(ids: list[int]) -> str:
    if len(ids) == 1:
        return f"process {ids[0]}"
    return "processes " + ", ".join(map(str, ids[:-1])) + f" and {ids[-1]}"


def _stop(procs: dict[int, subprocess.Popen], sig: int) -> None:
    for p in procs.values():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # the child's own session: it and its children


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    port: int | None = None,
    timeout: float | None = None,
    grace: float = 3.0,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    exit_codes: dict[int, int] | None = None,
) -> int:
    """Start ``num_processes`` copies of ``command`` as one distributed job; wait for them.

    Args:
        command: the argv every process runs (see :func:`resolve_command`).
        num_processes: how many processes.
        port: the coordinator port on 127.0.0.1 (default: a free one).
        timeout: stop everything after this many seconds (exit status 124).
        grace: after a failure, seconds the others may take to end on their own.
        stdout: where prefixed stdout lines go (default ``sys.stdout``).
        stderr: where prefixed stderr lines and the launcher's errors go.
        exit_codes: filled with each process's return code (``-s``: killed by
            signal ``s``), if given.

    Returns:
        0 when every process succeeded, else the worst status of the processes
        that failed on their own (124 on timeout).

    Example:
        >>> import io
        >>> from jpr.launch import launch
        >>> out = io.StringIO()
        >>> code = launch(["python", "-c", "import os; print(os.environ['JPR_PROCESS_ID'])"],
        ...               2, stdout=out)
        >>> code, sorted(out.getvalue().splitlines())
        (0, ['[0] 0', '[1] 1'])
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    _check_launch(num_processes, port=port, timeout=timeout, grace=grace)
    argv = resolve_command(command)
    address = f"127.0.0.1:{port or free_port()}"

    lock = threading.Lock()
    procs: dict[int, subprocess.Popen] = {}
    pumps: list[threading.Thread] = []
    forwarded: list[float] = []
    previous = _forward_sigterm(procs, num_processes, forwarded)
    base = {**os.environ, ENV_COORDINATOR: address, ENV_NUM_PROCESSES: str(num_processes)}
    base["PYTHONUNBUFFERED"] = "1"  # stream lines as they are printed
    try:
        for i in range(num_processes):
            procs[i] = _start(argv, {**base, ENV_PROCESS_ID: str(i)})
            for src, dst in ((procs[i].stdout, stdout), (procs[i].stderr, stderr)):
                t = threading.Thread(target=_pump, args=(src, dst, f"[{i}] ", lock), daemon=True)
                t.start()
                pumps.append(t)
        code, codes = _supervise(
            procs, pumps, timeout=timeout, grace=grace, stderr=stderr, lock=lock,
            forwarded=forwarded,
        )
        if exit_codes is not None:
            exit_codes.update(codes)
        if forwarded:  # the launcher itself was stopped: no restart, whatever the codes
            raise Stopped(signal.SIGTERM, "stopped by SIGTERM (passed on to every process)")
        return code
    except BaseException:
        _stop(procs, signal.SIGKILL)
        for p in procs.values():  # reap them: none outlives the launcher
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _check_launch(
    num_processes: int, *, port: int | None, timeout: float | None, grace: float
) -> None:
    """Refuse bad arguments of :func:`launch` with the flag's name."""
    if isinstance(num_processes, bool) or not 1 <= num_processes <= MAX_PROCESSES:
        raise JprError(f"-n must be between 1 and {MAX_PROCESSES}, got {num_processes}")
    if port is not None and not 0 < port < 65536:
        raise JprError(f"--port must be in [1, 65535], got {port}")
    if timeout is not None and not timeout > 0:
        raise JprError(f"--timeout must be positive, got {timeout}")
    if not grace >= 0:
        raise JprError(f"--grace must be non-negative, got {grace}")


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """One process of the job, in a session of its own, its output piped."""
    try:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        raise JprError(f"cannot start {argv[0]}: {e.strerror or e}") from None


def _forward_sigterm(
    procs: dict[int, subprocess.Popen], num_processes: int, forwarded: list[float]
):
    """Pass a SIGTERM to the launcher on to every process; returns the previous handler.

    SIGTERM to the launcher (its machine is being preempted) is passed on to
    every process: a ``jpr run`` job then stops at one agreed step and saves
    it, and ``forwarded`` gets the time. A second SIGTERM, one during start-up,
    or processes still running :data:`FORWARD_WAIT` seconds later: an
    exception that stops them all (they run in sessions of their own, so none
    is orphaned). Only the main thread can install it (else ``None``).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def _terminated(signum, frame):
        if forwarded or len(procs) < num_processes:
            raise SystemExit(128 + signum)
        forwarded.append(time.monotonic())
        _stop(procs, signum)

    return signal.signal(signal.SIGTERM, _terminated)


#: Seconds the processes get to stop on a SIGTERM passed on by the launcher.
FORWARD_WAIT = 60.0


def _supervise(procs, pumps, *, timeout, grace, stderr, lock, forwarded=()) -> int:
    start = time.monotonic()
    failed_at: float | None = None
    stop_sent_at: float | None = None
    killed = False
    stopped: set[int] = set()
    timed_out = False
    while True:
        codes = {i: p.poll() for i, p in procs.items()}
        running = [i for i, c in codes.items() if c is None]
        if not running:
            break
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes.values()):
            failed_at = now
        if stop_sent_at is None:
            timed_out = timeout is not None and now - start > timeout
            if timed_out or (failed_at is not None and now - failed_at > grace):
                stopped.update(running)
                _stop(procs, signal.SIGTERM)
                stop_sent_at = now
        elif not killed and now - stop_sent_at > 5:
            _stop(procs, signal.SIGKILL)
            killed = True
        if forwarded and not killed and now - forwarded[0] > FORWARD_WAIT:
            stopped.update(running)
            _stop(procs, signal.SIGKILL)
            killed = True
        time.sleep(0.02)
    for t in pumps:
        t.join(timeout=5)

    codes = {i: p.returncode for i, p in procs.items()}
    own = {i: c for i, c in codes.items() if c != 0 and i not in stopped}
    by_outcome: dict[str, list[int]] = {}
    for i, c in sorted(own.items()):
        by_outcome.setdefault(_describe(c), []).append(i)
    parts = [f"{_processes(ids)} {what}" for what, ids in by_outcome.items()]
    if stopped:
        parts.append(f"stopped {_processes(sorted(stopped))}")
    if timed_out:
        msg = f"timed out after {timeout:g}s; " + "; ".join(parts)
        code = 124
    elif own:
        msg = "; ".join(parts)
        code = max(_status(c) for c in own.values())
    else:
        return 0, codes
    with lock:
        stderr.write(f"jpr launch: error: {msg}\n")
        stderr.flush()
    return code, codes


def run(args: argparse.Namespace) -> int:
    """Entry point of ``jpr launch`` with parsed ``args``; returns the exit status.

    Example:
        >>> import argparse
        >>> from jpr.launch import add_launch_arguments, run
        >>> p = argparse.ArgumentParser()
        >>> add_launch_arguments(p)
        >>> run(p.parse_args(["-n", "1", "--", "python", "-c", "pass"]))
        0
    """
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    restarts = args.restart_on_preempt
    if restarts < 0:
        raise JprError(f"--restart-on-preempt must be non-negative, got {restarts}")
    if args.restart_n and not restarts:
        raise JprError("--restart-n needs --restart-on-preempt K")
    attempt, n = 0, args.num_processes
    while True:
        if attempt:
            noun = "process" if n == 1 else "processes"
            print(
                f"jpr launch: preempted; restart {attempt} of at most {restarts} "
                f"on {n} {noun}, {_restore_text(command)}",
                file=sys.stderr,
                flush=True,
            )
        codes: dict[int, int] = {}
        code = launch(
            command, n, port=args.port, timeout=args.timeout, grace=args.grace, exit_codes=codes
        )
        # Restart only a coordinated stop: every process stopped on a signal by itself.
        preempted = bool(codes) and all(c in PREEMPTED for c in codes.values())
        if not preempted or attempt >= restarts:
            return code
        attempt += 1
        command = restart_command(command)
        if args.restart_n:
            n = args.restart_n[(attempt - 1) % len(args.restart_n)]
