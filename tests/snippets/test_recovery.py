"""Tests of snippets/recovery/ (included by docs/faults.md).

``disk_full.py`` needs a size-limited folder: a 600 KiB tmpfs, which only root
can mount. Where it cannot be mounted the test is skipped, saying why. The
transcript it prints must be the one the page shows, line for line; the
commands run in this process (the page's own blocks run the same way), which
is what keeps this test to a few seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys

import pytest
from docs_tools import REPO_ROOT

DISK_FULL = "snippets/recovery/disk_full.py"


def page_transcript() -> str:
    """The (skipped) ```console block that follows the snippet on docs/faults.md."""
    page = (REPO_ROOT / "docs" / "faults.md").read_text()
    after = page[page.index(f'--8<-- "{DISK_FULL}"') :]
    m = re.search(r"```console\n(.*?)```", after, re.S)
    assert m, "docs/faults.md shows no transcript after the disk_full snippet"
    return m.group(1)


def full_at(transcript: str) -> int:
    """The step whose save found the disk full."""
    return int(re.search(r"cannot save step (\d+) to small/ck", transcript).group(1))


def expected(full: int, job: list[str]) -> str:
    """The transcript when the save of step ``full`` is the first that does not fit.

    How many checkpoints fit in 600 KiB varies a little (compressed arrays, and
    files that Orbax splits depending on timing); everything else is fixed.
    """
    before = range(10, full, 10)
    after = range(full, 101, 10)
    lines = [
        "$ jpr " + " ".join(job),
        "no complete checkpoint in small/ck yet: starting from step 0",
        *(f"saved step {s} to small/ck" for s in before),
        f"jpr run: error: cannot save step {full} to small/ck: No space left on device",
        "[exit 2]",
        "$ jpr verify small/ck",
        f"step {full}: incomplete save (interrupted, or still being written): not a checkpoint",
        *(f"step {s}: ok (15 leaves)" for s in before),
        f"{len(before)} of {len(before)} checkpoints intact",
        "$ jpr " + " ".join([*job, "--keep", "2"]),
        f"ignoring an incomplete save of step {full} in small/ck (interrupted)",
        f"restored step {full - 10} from small/ck",
        *(f"saved step {s} to small/ck" for s in after),
        "$ jpr verify small/ck",
        "step 90: ok (15 leaves)",
        "step 100: ok (15 leaves)",
        "2 of 2 checkpoints intact",
    ]
    return "\n".join(lines) + "\n"


def in_this_process(args: list[str], cwd: str) -> tuple[int, str]:
    from jpr import cli

    out = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli.main(args)
    finally:
        os.chdir(old)
    return code, out.getvalue()


@pytest.fixture
def small(tmp_path):
    """A 600 KiB tmpfs at tmp_path/small, or a skip saying why there is none."""
    if not sys.platform.startswith("linux"):
        pytest.skip("a size-limited tmpfs needs Linux")
    if os.geteuid() != 0:
        pytest.skip("mounting a 600 KiB tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes(small):
    spec = importlib.util.spec_from_file_location("disk_full", REPO_ROOT / DISK_FULL)
    snippet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(snippet)
    import jax

    # In this process unless an earlier test left its JAX with other devices
    # (test_multi_host loads a script that asks for 8): other bits, other sizes.
    run = in_this_process if jax.device_count() == 1 else snippet.in_a_process
    got = snippet.transcript(str(small.parent), run=run)
    page = page_transcript()
    assert page == expected(full_at(page), snippet.JOB)
    assert got == expected(full_at(got), snippet.JOB), got
    assert full_at(got) >= 30  # a few checkpoints fit, whatever their exact sizes
    assert "Traceback" not in got
    from jpr.checkpoint import Checkpointer

    with contextlib.closing(Checkpointer(small / "ck", read_only=True)) as ck:
        assert ck.steps() == [90, 100] and ck.incomplete() == [] and ck.removing() == []
