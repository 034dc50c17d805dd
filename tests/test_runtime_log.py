"""jpr.runtime_log: JAX's C++ log kept out of a process's one line, also through an abort.

Real child processes write to descriptor 2 the way XLA's C++ runtime does
(absl lines, a stack dump, then ``abort()``); the parent reads what reached
their stderr.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from jpr import runtime_log

E = b"E1202 05:01:54.473958   17602 coordination_service_agent.cc:289] Polled an error\n"
F = (b"F1202 05:01:54.473998   17602 client.h:80] Terminating process because the JAX "
     b"distributed service detected fatal errors. This most likely indicates ...\n")
GRPC = b":UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:\"Socket closed\"}\n"
STACK = b"*** Check failure stack trace: ***\n    @     0x7fa8a5440634  absl::LogMessage()\n"


def _filter(*chunks: bytes) -> tuple[str, str, int]:
    dst, log = io.BytesIO(), io.BytesIO()
    kept = runtime_log.filter_lines(io.BytesIO(b"".join(chunks)), dst, log, "1", "r.log")
    return dst.getvalue().decode(), log.getvalue().decode(), kept


def test_error_blocks_go_to_the_log_and_a_fatal_end_is_said_once():
    out, log, kept = _filter(b"I1202 00:00:00.1 1 a.cc:1] hello\n", E, GRPC, F, STACK)
    assert out.splitlines() == [
        "I1202 00:00:00.1 1 a.cc:1] hello",
        "jpr run: error: JAX's distributed runtime ended process 1: Terminating process "
        "because the JAX distributed service detected fatal errors (its log: r.log)",
    ]
    assert kept == 5 and log == (E + GRPC + F + STACK).decode()


def test_a_line_jpr_said_is_the_only_line_and_names_the_log():
    said = runtime_log._MARK + b"jpr run: error: a collective failed on process 1\n"
    out, _, kept = _filter(E, said, F, STACK)
    assert out == "jpr run: error: a collective failed on process 1 (JAX's runtime log: r.log)\n"
    assert kept == 4
    out, _, kept = _filter(said, b"W1202 00:00:00.1 1 a.cc:1] later\n")  # nothing kept
    assert out.splitlines() == ["W1202 00:00:00.1 1 a.cc:1] later",
                                "jpr run: error: a collective failed on process 1"]
    assert kept == 0


def test_runtime_errors_after_jpr_spoke_are_still_named():
    """The runtime may log while the process exits after jpr's line (seen in CI:
    a gloo AllGather failed, jpr said so, then the coordination client logged)."""
    said = runtime_log._MARK + b"jpr run: error: a collective failed on process 1\n"
    out, log, kept = _filter(said, E, GRPC)
    assert out == "jpr run: error: a collective failed on process 1 (JAX's runtime log: r.log)\n"
    assert kept == 2 and log == (E + GRPC).decode()


def test_a_process_that_lingers_after_jpr_spoke_still_shows_the_line():
    """A process that hangs on its way out (a shutdown waiting for a peer that is
    gone) gets its line printed hold_s after jpr said it, not never."""
    said = runtime_log._MARK + b"jpr run: error: a collective failed on process 1\n"
    r, w = os.pipe()
    dst, log = io.BytesIO(), io.BytesIO()
    with os.fdopen(r, "rb") as src:
        t = threading.Thread(target=runtime_log.filter_lines,
                             args=(src, dst, log, "1", "r.log"), kwargs={"hold_s": 0.2})
        t.start()
        os.write(w, said)
        deadline = time.monotonic() + 30
        while not dst.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        line = b"jpr run: error: a collective failed on process 1\n"
        assert dst.getvalue() == line  # while the process still runs
        os.write(w, E)  # the runtime speaks after that: logged, the line is not said again
        os.close(w)
        t.join(timeout=30)
    assert dst.getvalue() == line and log.getvalue() == E


CHILD = textwrap.dedent("""
    import os, sys
    from jpr import runtime_log
    log = runtime_log.route("3")
    print("LOG", log, flush=True)
    sys.stderr.write("python says hi\\n")  # Python's stderr: straight through
    os.write(2, {warn!r})                  # the runtime's descriptor 2
    os.write(2, {error!r})
    if {say!r}:
        runtime_log.say("jpr run: error: jpr got there first")
    if {fatal!r}:
        os.write(2, {f!r} + {stack!r})
        os.abort()                         # what absl's LOG(FATAL) ends with
""")


def _child(tmp_path, *, fatal: bool, say: bool, env: dict | None = None):
    code = CHILD.format(warn=b"W1202 00:00:00.1 1 a.cc:1] a warning\n", error=E + GRPC,
                        f=F, stack=STACK, fatal=fatal, say=say)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path), **(env or {})}, timeout=60)
    log = p.stdout.split("LOG ", 1)[1].strip()
    return p.returncode, p.stderr.splitlines(), log


def test_an_aborted_process_says_one_line_and_keeps_the_runtime_log(tmp_path):
    code, lines, log = _child(tmp_path, fatal=True, say=False)
    assert code == -signal.SIGABRT
    assert lines == [
        "python says hi",
        "W1202 00:00:00.1 1 a.cc:1] a warning",
        "jpr run: error: JAX's distributed runtime ended process 3: Terminating process "
        f"because the JAX distributed service detected fatal errors (its log: {log})",
    ]
    assert Path(log).read_bytes() == E + GRPC + F + STACK


def test_jpr_speaking_before_the_abort_is_the_one_line(tmp_path):
    code, lines, log = _child(tmp_path, fatal=True, say=True)
    assert code == -signal.SIGABRT
    assert lines[2:] == [f"jpr run: error: jpr got there first (JAX's runtime log: {log})"]


def test_a_quiet_runtime_leaves_no_log_file(tmp_path):
    p = subprocess.run(
        [sys.executable, "-c", "from jpr import runtime_log; print(runtime_log.route('0'))"],
        capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=60,
    )
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.strip().startswith(str(tmp_path)) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["show", "SHOW"])
def test_show_leaves_descriptor_2_alone(tmp_path, value):
    code, lines, log = _child(tmp_path, fatal=True, say=False, env={runtime_log.ENV_SHOW: value})
    assert code == -signal.SIGABRT and log == "None"
    assert "*** Check failure stack trace: ***" in lines and not any("jpr run" in s for s in lines)
