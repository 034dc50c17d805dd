"""benchmarks/_census.py: the census of processes that bench_suite.py takes of the default tier."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys

import pytest
from docs_tools import REPO_ROOT

# A root that starts two workers the way pytest-xdist does (`python -c`), one of
# which starts a JAX process and a script; the root also runs a plain child.
ROOT = """
import subprocess, sys
worker = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import jax']); " \\
         "subprocess.run([sys.executable, sys.argv[1]])"
subprocess.run([sys.executable, "-c", worker.replace("sys.argv[1]", repr(sys.argv[1]))])
subprocess.run([sys.executable, "-c", "pass"])
"""


@pytest.fixture
def census(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    yield importlib.import_module("_census")
    sys.modules.pop("_census", None)


def test_it_counts_every_process_and_who_started_it(census, tmp_path):
    script = tmp_path / "snippets" / "show.py"
    script.parent.mkdir()
    script.write_text("print('shown')\n")
    env = census.census_env(tmp_path / "log")
    proc = subprocess.run([sys.executable, "-c", ROOT, str(script)], env=env,
                          capture_output=True, text=True, check=True)
    assert proc.stdout == "shown\n"  # the census prints nothing of its own
    c = census.summarize(census.read_log(tmp_path / "log"))
    assert (c.processes, c.jax_processes, c.workers) == (5, 1, 2)
    assert c.children.keys() == {("python -c", False), ("snippets/show.py", False)}
    assert c.children[("python -c", False)][::2] == [1, 1]  # one child, and it imported JAX
    assert c.cpu_logged >= c.cpu_workers + c.cpu_root > 0
    assert c.imports_floor(jax_s=1.0, flax_s=2.0) == 1.0
    assert list(c.top(1)) in (["python -c"], ["snippets/show.py"])


@pytest.mark.parametrize("argv, name", [
    (["-c"], "python -c"),
    (["/x/.venv/bin/jpr", "run", "--steps"], "jpr run"),
    (["/x/src/jpr/__main__.py", "launch", "-n"], "jpr launch"),
    (["/x/src/jpr/explain.py", "--worker", "a.json"], "python -m jpr.explain --worker"),
    (["/x/src/jpr/run_repro.py", "--steps", "3"], "python -m jpr.run_repro"),
    (["/x/site-packages/ipykernel_launcher.py", "-f"], "notebook kernel"),
    (["snippets/pitfalls/samplers.py", "draws.npz"], "pitfalls/samplers.py"),
])
def test_a_kind_names_the_command_and_no_folder_of_this_machine(census, argv, name):
    assert census.kind(argv) == name


def test_its_example_runs(census):
    assert doctest.testmod(census).failed == 0
