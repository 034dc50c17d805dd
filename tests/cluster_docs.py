"""The cluster transcripts of docs/multi-host.md, read, run and compared by the slow tier.

The page's "On your cluster" section shows ```console blocks of commands that
the docs tests cannot run (``srun``, ``sbatch``, ``mpirun``: they need the
daemons and root); ``tests/test_cluster_slurm.py`` and
``tests/test_cluster_mpi.py`` take each command and its expected output from
the page through these helpers, run it for real and compare, after
:func:`normalise` replaced what changes from run to run.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from docs_tools import REPO_ROOT
from docs_tools.console import Command
from docs_tools.markdown import parse_page

PAGE = REPO_ROOT / "docs" / "multi-host.md"

#: The host name the page shows in place of the real one.
HOST = "node1"


def require(what: str, missing: bool, how: str) -> None:
    """Skip a test whose prerequisite is missing, saying why; in CI, fail it."""
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: {how} (.ci/run must install it)")
    pytest.skip(f"{what} is missing: {how}")


def commands(first_word: str, *, containing: str = "") -> list[Command]:
    """The commands of the page's shown-only console block that starts with ``first_word``.

    ``containing``: the first command must contain it too.
    """
    for block in parse_page(PAGE).blocks:
        if block.lang == "console" and block.kind == "static" and block.commands:
            first = block.commands[0].text
            if first.split()[0] == first_word and containing in first:
                return block.commands
    raise AssertionError(f"{PAGE.name} has no console block starting with {first_word!r}")


def script(marker: str) -> str:
    """The page's ```bash block that contains ``marker`` (e.g. ``#SBATCH``)."""
    for block in parse_page(PAGE).blocks:
        if block.lang == "bash" and marker in block.source:
            return block.source
    raise AssertionError(f"{PAGE.name} has no bash block containing {marker!r}")


def environment() -> dict[str, str]:
    """The tests' environment, with this interpreter's ``jpr`` first on ``PATH``."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def normalise(lines: Sequence[str]) -> list[str]:
    """Lines with job ids, step numbers, times, hashes and the host name replaced.

    Example: ``slurmstepd-vm: ... STEP 3.0 ... AT 2026-12-02T23:52:28`` reads
    ``slurmstepd-node1: ... STEP N ... AT <TIME>``.
    """
    host = re.escape(socket.gethostname().split(".")[0])
    out = []
    for line in lines:
        line = re.sub(rf"\b{host}\b", HOST, line.rstrip())
        line = re.sub(r"\b(step|STEP|job|JOB|pid) \d+(\.\d+)?", r"\1 N", line)
        line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", "<TIME>", line)
        line = re.sub(r"state_hash [0-9a-f]{16}", "state_hash …", line)
        out.append(line)
    return _tasks_together(out)


_TASK = re.compile(r"^(srun: error: \S+: )task (\d+): (.*)$")


def _tasks_together(lines: list[str]) -> list[str]:
    """srun's per-task lines as one, as srun prints them when the tasks end together.

    srun says ``tasks 0-1: Exited with exit code 143`` when both tasks end
    within its reporting window, and one line per task when they do not (a
    loaded machine): both read ``tasks 0-1: …`` here.

    Example: ``srun: error: node1: task 1: Killed`` and ``… task 0: Killed``
    read ``srun: error: node1: tasks 0-1: Killed``.
    """
    groups: dict[tuple[str, str], set[int]] = {}
    for line in lines:
        m = _TASK.match(line)
        if m:
            groups.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
    out, done = [], set()
    for line in lines:
        m = _TASK.match(line)
        if not m:
            out.append(line)
            continue
        key = (m.group(1), m.group(3))
        tasks = sorted(groups[key])
        if len(tasks) < 2 or tasks != list(range(tasks[0], tasks[-1] + 1)):
            out.append(line)
        elif key not in done:
            done.add(key)
            out.append(f"{key[0]}tasks {tasks[0]}-{tasks[-1]}: {key[1]}")
    return out


def run(command: Command, cwd: Path, *, env: dict[str, str], timeout: float = 300):
    """Run a page's command in a shell; returns ``(exit status, output lines)``."""
    proc = subprocess.run(
        command.text,
        shell=True,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout.splitlines()


def check(command: Command, code: int, output: list[str], *, any_order: bool = False) -> None:
    """The command exited as the page says and printed what it shows (normalised).

    ``any_order``: lines of several processes whose order varies run to run
    are compared as a multiset.
    """
    got, want = normalise(output), normalise(command.expected)
    if any_order:
        got, want = sorted(got), sorted(want)
    assert (code, got) == (command.exit_code, want), (
        f"$ {command.text}\nexit {code}, printed:\n" + "\n".join(output)
    )


def _reference_argv(folder: Path, steps: int) -> tuple[list[str], Path]:
    out = folder / f"one-{steps}.json"
    argv = [sys.executable, "-m", "jpr", "run", "--steps", str(steps), "--microbatches", "8",
            "--out", str(out), "--no-progress"]
    return argv, out


def reference_run(folder: Path, steps: int) -> Path:
    """A one-process ``jpr run --steps STEPS --microbatches 8``: the record to MATCH."""
    argv, out = _reference_argv(folder, steps)
    if not out.exists():
        subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=600, check=True)
    return out


def start_reference_run(folder: Path, steps: int):
    """:func:`reference_run` in the background (while a job waits in a queue);
    returns a function that waits for it and gives the record's path."""
    argv, out = _reference_argv(folder, steps)
    proc = subprocess.Popen(argv, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def wait() -> Path:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
        return out

    return wait


def assert_match(expected: Path, got: Path) -> None:
    """``jpr compare`` says MATCH."""
    proc = subprocess.run(
        [sys.executable, "-m", "jpr", "compare", str(expected), str(got)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("✅ MATCH"), proc.stdout + proc.stderr


def which(name: str) -> str | None:
    """``shutil.which`` on the tests' ``PATH``."""
    return shutil.which(name, path=environment()["PATH"])
