"""Tests of snippets/faults/ (included by docs/faults.md).

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

DISK_FULL = "snippets/faults/disk_full.py"


def page_transcript() -> str:
    """The (skipped) ```console block that follows the snippet on docs/faults.md."""
    page = (REPO_ROOT / "docs" / "faults.md").read_text()
    after = page[page.index(f'--8<-- "{DISK_FULL}"') :]
    m = re.search(r"```console\n(.*?)```", after, re.S)
    assert m, "docs/faults.md shows no transcript after the disk_full snippet"
    return m.group(1)


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
    got = snippet.transcript(str(small.parent), run=in_this_process)
    assert got == page_transcript()
    assert "Traceback" not in got
    from jpr.checkpoint import Checkpointer

    with contextlib.closing(Checkpointer(small / "ck", read_only=True)) as ck:
        assert ck.steps() == [90, 100] and ck.incomplete() == [] and ck.removing() == []
