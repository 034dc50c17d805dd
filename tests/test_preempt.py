"""Preempted on many processes, resumed on any number of them, same bits (issue 13).

Real ``jpr launch`` jobs (``jax.distributed`` on 127.0.0.1, gloo), real
signals, real Orbax checkpoints in ``tmp_path``. Tests wait on events (a
checkpoint folder appearing, a process exiting), never on a guessed duration.
With ``--microbatches`` the bits do not depend on the process or device
count, so a run saved by 2 processes and resumed by 1 (or the other way round)
ends with the hash of the uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import types
from pathlib import Path

import numpy as np
import pytest
from test_distributed import TIMEOUT, _finish, _start  # one way to run and reap a process

from jpr import cli, compare, data, run_repro
from jpr.config import RunConfig
from jpr.launch import free_port

MB = ["--microbatches", "8", "--no-progress"]




def _launch(n: int, *argv: str) -> list[str]:
    return ["jpr", "launch", "-n", str(n), "--grace", "60", "--", "jpr", "run", *argv]


def _wait_for(what: str, ready, p: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if p is not None and p.poll() is not None:
            pytest.fail(f"exited ({p.returncode}) before {what}:\n{p.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {TIMEOUT}s")
        time.sleep(0.01)


def _children(launcher: subprocess.Popen) -> set[int]:
    """The pids of the processes a ``jpr launch`` job runs now."""
    with contextlib.suppress(OSError):
        return set(map(int, Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
                       .read_text().split()))
    return set()


def _process(launcher: subprocess.Popen, index: int, exclude: set[int] = frozenset()) -> int:
    """The pid of process ``index`` of a ``jpr launch`` job (from /proc), not in ``exclude``."""

    def find() -> int | None:
        with contextlib.suppress(OSError):
            for pid in _children(launcher) - exclude:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"JPR_PROCESS_ID={index}".encode() in env:
                    return pid
        return None

    _wait_for(f"process {index}", lambda: find() is not None, launcher)
    return find()


def _newest(ck: Path) -> int:
    """The newest complete (renamed) checkpoint step in ``ck``, or -1."""
    if not ck.is_dir():
        return -1
    return max((int(p.name) for p in ck.iterdir() if p.name.isdigit()), default=-1)


def _match(a: Path, b: Path) -> bool:
    """``jpr compare a b`` says MATCH."""
    return compare.main([str(a), str(b)]) == 0


def _ref(tmp: Path, steps: int) -> Path:
    """The uninterrupted single-process run (in this process: one CPU device)."""
    out = tmp / f"ref{steps}.json"
    assert run_repro.main(["--steps", str(steps), *MB, "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------- elastic resume
#
# Saved on 2 processes and resumed on 1 and on 2, and saved on 1 and resumed on
# 2, all after real preemptions: the two multi-process tests further down.


@pytest.mark.parametrize(
    ("microbatches", "saved", "said"),
    [
        (None, {"process_count": 2, "device_count": 2},
         "resuming on 1 process, 1 device a checkpoint saved on 2 processes, 2 devices: "
         "without --microbatches the bits will differ from a run on the original topology"),
        (None, {"process_count": 1, "device_count": 1}, None),  # the same topology
        (None, None, None),  # a checkpoint older than the topology field
        (8, {"process_count": 2, "device_count": 2}, None),  # bits independent of it
    ],
)
def test_resuming_on_another_topology_says_so_only_where_bits_change(microbatches, saved, said):
    lines = []
    setup = types.SimpleNamespace(
        pcount=1, cfg=RunConfig(microbatches=microbatches), say=lines.append
    )
    run_repro._say_if_topology_changed(setup, saved)
    assert lines == ([said] if said else [])


@pytest.mark.parametrize("step", [0, 1, 7, 31, 32, 1000])
def test_the_examples_of_a_step_do_not_depend_on_the_process_count(step):
    cfg = RunConfig(seed=3)
    ds = data.make_dataset(cfg)

    def seen(count: int) -> list[int]:
        idx = [data.batch_indices(step, ds=ds, batch_size=64, process_index=p,
                                  process_count=count) for p in range(count)]
        batches = [data.get_batches(step, 1, ds=ds, batch_size=64, process_index=p,
                                    process_count=count) for p in range(count)]
        for i, (x, _) in zip(idx, batches, strict=True):
            assert np.array_equal(x[0], ds.x[i])  # the batch is those examples
        return sorted(np.concatenate(idx).tolist())

    assert seen(1) == seen(2) == seen(4)
    # ... and a pure function of (seed, step, process index, process count).
    again = data.batch_indices(step, ds=data.make_dataset(cfg), batch_size=64,
                               process_index=1, process_count=4)
    assert np.array_equal(again, data.batch_indices(step, ds=ds, batch_size=64,
                                                    process_index=1, process_count=4))


# ------------------------------------------------------ coordinated preemption

STEPS = ["--steps", "400", *MB, "--save-every", "50"]
STOPPED = re.compile(
    r"\[(\d)\] jpr run: stopped by SIGTERM to process 1 after step (\d+): step \2 is saved "
    r"in (\S+); to resume, run the same command with --restore-from latest"
)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_step_then_a_sigkill_loses_nothing(tmp_path):
    """SIGTERM to process 1 only: both save one step and exit 143. Resumed from
    that step on 2 processes to the end: MATCH. Resumed again on 2 processes,
    SIGKILL to process 1: the job ends within 60 s in one line, the newest
    checkpoint verifies. Resumed on 1 process: MATCH."""
    d, ck = tmp_path, tmp_path / "ck"
    job = _start(_launch(2, *STEPS, "--checkpoint-dir", str(ck)), d)
    ref = _ref(d, 400)  # while the job runs
    victim = _process(job, 1)
    _wait_for("first checkpoint", lambda: (ck / "50").is_dir(), job)
    time.sleep(random.uniform(0, 0.5))  # a random moment after it, not a wait for anything
    os.kill(victim, signal.SIGTERM)
    code, out, err = _finish(job)
    assert code == 143, (out, err)
    lines = [m.groups() for m in map(STOPPED.fullmatch, err.splitlines()) if m]
    assert sorted(p for p, _, _ in lines) == ["0", "1"], err  # one line from each process
    (stop,) = {int(s) for _, s, _ in lines}
    assert 50 <= stop < 400 and stop % 50 == 0, err  # chunks end at saves here
    assert err.splitlines()[-1] == "jpr launch: error: processes 0 and 1 exited with status 143"
    assert _newest(ck) == stop

    # Resumed on 2 processes (from a copy of the folder) to the end: MATCH.
    shutil.copytree(ck, d / "ck2")
    two = d / "resumed2.json"
    job = _start(_launch(2, *STEPS, "--checkpoint-dir", str(d / "ck2"), "--restore-from",
                         "latest", "--out", str(two)), d)
    code, out, err = _finish(job)
    assert code == 0, (out, err)
    assert json.loads(two.read_text())["resumed_from"]["step"] == stop
    assert _match(ref, two)

    # Resumed on 2 processes; SIGKILL (no agreement possible) after a new checkpoint.
    resume = [*STEPS, "--checkpoint-dir", str(ck), "--restore-from", "latest"]
    job = _start(_launch(2, *resume), d)
    victim = _process(job, 1)
    _wait_for("a new checkpoint", lambda: _newest(ck) > stop, job)
    time.sleep(random.uniform(0, 0.5))
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    code, out, err = _finish(job)
    assert time.monotonic() - killed_at < 60
    assert code == 137, (out, err)
    assert "Traceback" not in err
    # Process 0 either fails at once in one line (its collective lost the peer)
    # or is stopped by the launcher; the launcher's line names the kill. Nothing
    # else: JAX's runtime log is kept out of it (jpr.runtime_log).
    *said, last = err.splitlines()
    assert last.startswith("jpr launch: error: ") and "process 1 was killed by SIGKILL" in last
    assert len(said) <= 1 and all(s.startswith("[0] jpr run: error: ") for s in said), err
    newest = _newest(ck)
    assert newest > stop
    assert cli.main(["verify", str(ck), "--step", str(newest)]) == 0

    # Resumed on 1 process (in this one): the uninterrupted run's bits.
    out_file = d / "resumed.json"
    assert run_repro.main([*resume, "--out", str(out_file)]) == 0
    rec = json.loads(out_file.read_text())
    assert rec["resumed_from"]["step"] == newest
    assert rec["resumed_from"]["topology"] == {"process_count": 2, "device_count": 2}
    assert _match(ref, out_file)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_a_sigkill_without_a_launcher_ends_the_other_process_in_one_line(tmp_path, victim):
    """No supervisor: 2 processes started by hand (as a cluster's scheduler would),
    one SIGKILLed after the first checkpoint. The other exits within 60 s with
    exactly one line on stderr, and the checkpoint verifies.

    Either jpr speaks (a collective or a save failed: "Connection reset by
    peer"), or JAX's runtime ends the process itself (process 0 hosts the
    coordination service; without it, the survivor's runtime aborts). Then the
    runtime's C++ log and stack dump are kept in a file (jpr.runtime_log), and
    the line names that file."""
    ck, port = tmp_path / "ck", free_port()
    procs = [
        _start(["jpr", "run", *STEPS, "--checkpoint-dir", str(ck), "--coordinator-address",
                f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], tmp_path,
               env={"TMPDIR": str(tmp_path)})
        for i in range(2)
    ]
    _wait_for("first checkpoint", lambda: (ck / "50").is_dir(), procs[0])
    time.sleep(random.uniform(0, 0.5))  # a random moment after it
    procs[victim].kill()
    killed_at = time.monotonic()
    code, _, err = _finish(procs[1 - victim])
    assert time.monotonic() - killed_at < 60
    procs[victim].wait()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jpr run: error: "), (code, err)
    logs = list(tmp_path.glob("jpr-runtime-*.log"))  # the survivor's, if its runtime spoke
    assert all(p.name.startswith(f"jpr-runtime-p{1 - victim}-") for p in logs), logs
    assert all(str(p) in lines[0] for p in logs), (lines, logs)
    if code == -signal.SIGABRT:
        assert victim == 0 and len(logs) == 1, (err, logs)
        assert lines[0].startswith("jpr run: error: JAX's distributed runtime ended process 1: "
                                   "Terminating process because "), err
        assert "Check failure stack trace" in logs[0].read_text()
    else:
        assert code in (1, 2), (code, err)
    newest = _newest(ck)
    assert newest >= 50 and cli.main(["verify", str(ck), "--step", str(newest)]) == 0


# ------------------------------------------------- jpr launch --restart-on-preempt


LONG = ["--steps", "1000", *MB, "--save-every", "50"]  # room for 5 stops after 5 saves


@pytest.mark.slow
def test_launch_restarts_after_preemptions_on_other_process_counts(tmp_path):
    """5 preemptions at random moments, each to a random process, on 2, 1, 2, 1, 2
    processes, then 1 process to the end: the uninterrupted run's bits."""
    d, ck = tmp_path, tmp_path / "ck"
    final = d / "final.json"
    job = _start(
        ["jpr", "launch", "-n", "2", "--grace", "60", "--restart-on-preempt", "5",
         "--restart-n", "1,2", "--", "jpr", "run", *LONG, "--checkpoint-dir", str(ck),
         "--out", str(final)],
        d,
    )
    ref = _ref(d, 1000)

    seen: set[int] = set()  # the processes of earlier attempts
    counts = (2, 1, 2, 1, 2)  # the process counts of the attempts that get a SIGTERM
    for n in counts:
        victim = _process(job, random.randrange(n), exclude=seen)
        before = _newest(ck)
        _wait_for("a new checkpoint", lambda b=before: _newest(ck) > b, job)
        attempt = _children(job) - seen  # all n of them are running by now
        assert victim in attempt and len(attempt) == n
        time.sleep(random.uniform(0, 0.3))  # a random moment after it
        os.kill(victim, signal.SIGTERM)
        _wait_for("the stop", lambda a=attempt: not any(Path(f"/proc/{p}").exists() for p in a),
                  job)
        seen |= attempt
    code, out, err = _finish(job)
    assert code == 0, (out, err)
    restarts = [line for line in err.splitlines() if line.startswith("jpr launch: preempted")]
    assert restarts == [
        f"jpr launch: preempted; restart {k} of at most 5 on {n} process{'es' * (n > 1)}, "
        "--restore-from latest"
        for k, n in enumerate((1, 2, 1, 2, 1), start=1)
    ], err
    said = re.findall(r"^\[\d\] jpr run: stopped by SIGTERM (?:to process \d )?after step (\d+)",
                      err, re.M)
    assert len(said) == sum(counts), err  # every process of every attempt said where
    stops = sorted({int(s) for s in said})
    assert len(stops) == 5 and all(s % 50 == 0 for s in stops), err  # 5 different saved steps
    rec = json.loads(final.read_text())
    assert rec["topology"]["process_count"] == 1
    assert rec["resumed_from"]["topology"] == {"process_count": 2, "device_count": 2}
    assert _match(ref, final)


def test_restart_flags_are_checked(capsys):
    from jpr.cli import main

    for argv, message in [
        (["--restart-on-preempt", "-1"], "--restart-on-preempt must be non-negative, got -1"),
        (["--restart-n", "1,2"], "--restart-n needs --restart-on-preempt K"),
        (["--restart-on-preempt", "1", "--restart-n", "1,x"],
         "argument --restart-n: must be process counts like 1,2,1, got '1,x'"),
        (["--restart-on-preempt", "1", "--restart-n", "0"],
         "argument --restart-n: process counts must be between 1 and 64, got 0"),
    ]:
        assert main(["launch", "-n", "1", *argv, "--", "python", "-c", "pass"]) == 2
        assert capsys.readouterr().err == f"jpr launch: error: {message}\n"
