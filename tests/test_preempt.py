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
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jpr import compare, data, run_repro
from jpr.config import RunConfig

TIMEOUT = 300  # seconds; a loaded 2-core machine is slow, a hang is not
MB = ["--microbatches", "8", "--no-progress"]


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate()
        pytest.fail(f"{p.args} did not finish in {TIMEOUT}s:\n{out}\n{err}")
    return p.returncode, out, err


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


def _process(launcher: subprocess.Popen, index: int) -> int:
    """The pid of process ``index`` of a ``jpr launch`` job (from /proc)."""

    def find() -> int | None:
        with contextlib.suppress(OSError):
            kids = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
            for pid in map(int, kids):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"JPR_PROCESS_ID={index}".encode() in env:
                    return pid
        return None

    _wait_for(f"process {index}", lambda: find() is not None, launcher)
    return find()


def _match(a: Path, b: Path) -> bool:
    """``jpr compare a b`` says MATCH."""
    return compare.main([str(a), str(b)]) == 0


def _ref(tmp: Path, steps: int) -> Path:
    """The uninterrupted single-process run (in this process: one CPU device)."""
    out = tmp / f"ref{steps}.json"
    assert run_repro.main(["--steps", str(steps), *MB, "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------- elastic resume


def test_saved_on_n_processes_resumed_on_m_gives_the_same_bits(tmp_path):
    d = tmp_path
    first = {
        2: _start(_launch(2, "--steps", "10", *MB, "--save-every", "10",
                          "--checkpoint-dir", str(d / "ck2")), d),
        1: _start(["jpr", "run", "--steps", "10", *MB, "--save-every", "10",
                   "--checkpoint-dir", str(d / "ck1")], d),
    }
    ref = _ref(d, 20)
    for p in first.values():
        code, out, err = _finish(p)
        assert code == 0, (out, err)
    # Each resume gets its own copy of the folder it starts from.
    plan = {"2to1": (2, 1), "2to2": (2, 2), "1to2": (1, 2)}
    resumed = {}
    for name, (saved_on, n) in plan.items():
        ck = d / f"ck-{name}"
        shutil.copytree(d / f"ck{saved_on}", ck)
        argv = ["--steps", "20", *MB, "--checkpoint-dir", str(ck), "--restore-from", "latest",
                "--out", str(d / f"{name}.json")]
        resumed[name] = _start(_launch(n, *argv) if n > 1 else ["jpr", "run", *argv], d)
    for name, p in resumed.items():
        code, out, err = _finish(p)
        assert code == 0, (name, out, err)
        assert "bits will differ" not in out  # --microbatches: nothing to warn about
        rec = json.loads((d / f"{name}.json").read_text())
        saved_on, n = plan[name]
        assert rec["resumed_from"]["step"] == 10
        assert rec["resumed_from"]["topology"] == {"process_count": saved_on,
                                                   "device_count": saved_on}
        assert rec["topology"]["process_count"] == n
        assert _match(ref, d / f"{name}.json"), name


def test_without_microbatches_another_topology_says_the_bits_will_differ(tmp_path):
    ck = tmp_path / "ck"
    base = ["--steps", "4", "--no-progress", "--checkpoint-dir", str(ck)]
    assert run_repro.main([*base[:-2], "--steps", "2", "--save-every", "2",
                           "--checkpoint-dir", str(ck)]) == 0
    code, out, err = _finish(_start(_launch(2, *base, "--restore-from", "latest",
                                            "--out", str(tmp_path / "r.json")), tmp_path))
    assert code == 0, (out, err)
    said = [line for line in out.splitlines() if "bits will differ" in line]
    assert said == [
        "[0] resuming on 2 processes, 2 devices a checkpoint saved on 1 process, 1 device: "
        "without --microbatches the bits will differ from a run on the original topology"
    ]
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["resumed_from"]["topology"] == {"process_count": 1, "device_count": 1}
    assert (rec["topology"]["process_count"], rec["topology"]["device_count"]) == (2, 2)


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


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_anywhere(tmp_path):
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
    assert 50 <= stop < 400 and stop % 50 == 0  # chunks end at saves here
    assert err.splitlines()[-1] == "jpr launch: error: processes 0 and 1 exited with status 143"
    assert max(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == stop
    # Resume on 1 process and on 2, each from its own copy.
    jobs = {}
    for n in (1, 2):
        mine = d / f"ck{n}"
        shutil.copytree(ck, mine)
        argv = [*STEPS, "--checkpoint-dir", str(mine), "--restore-from", "latest",
                "--out", str(d / f"resumed{n}.json")]
        jobs[n] = _start(_launch(n, *argv) if n > 1 else ["jpr", "run", *argv], d)
    for n, p in jobs.items():
        code, out, err = _finish(p)
        assert code == 0, (out, err)
        rec = json.loads((d / f"resumed{n}.json").read_text())
        assert rec["resumed_from"]["step"] == stop
        assert _match(ref, d / f"resumed{n}.json"), n
