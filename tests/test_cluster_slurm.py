"""jpr on a real SLURM cluster: Debian's slurmctld, slurmd and munge, one node, two CPUs.

The session fixture brings the cluster up with ``scripts/slurm_cluster.sh up``
(as root, on loopback, its configuration and state in a temporary folder)
and takes it down at the end. The commands and outputs are the ones that
docs/multi-host.md shows ("On your cluster", read by ``cluster_docs``):

- ``srun --ntasks 2 jpr run``: two processes joined by JAX's SLURM detector,
  MATCH with one process;
- the page's batch script, preempted by SLURM (``PreemptMode=REQUEUE``,
  ``GraceTime``: a job in the ``high`` partition takes the CPUs), which
  saves on both processes and requeues itself, then cancelled with
  ``scancel --signal=TERM --full`` (``srun`` kills its tasks: nothing saved),
  requeued again, resumed: its record MATCHes the uninterrupted run;
- ``jpr run`` in a batch script outside ``srun``: one line, exit 2.

Outside CI a missing prerequisite (root, Debian's ``slurm-wlm`` and ``munge``)
skips, saying why; in CI it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cluster_docs import (
    assert_match,
    check,
    commands,
    environment,
    reference_run,
    require,
    run,
    script,
    start_reference_run,
)
from docs_tools import REPO_ROOT

pytestmark = pytest.mark.slow

SCRIPT = REPO_ROOT / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm():
    """The environment of a running one-node cluster (``SLURM_CONF`` set)."""
    require("root", os.geteuid() != 0, "the SLURM daemons run as root")
    missing = [d for d in ("slurmctld", "slurmd", "munged", "srun", "sbatch") if not
               shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")]
    require("slurm-wlm and munge", bool(missing),
            f"{', '.join(missing)} not found; run 'sudo scripts/slurm_cluster.sh install'")
    folder = Path(tempfile.mkdtemp(prefix="jpr-slurm-"))
    env = {**environment(), "JPR_SLURM_DIR": str(folder / "cluster")}
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        env["SLURM_CONF"] = up.stdout.strip().rsplit("=", 1)[1]
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True,
                       timeout=120, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    # One folder for the session's one-process runs (both cluster test files use it).
    folder = tmp_path_factory.getbasetemp() / "cluster-references"
    folder.mkdir(exist_ok=True)
    return folder


def test_srun_two_tasks_match_one_process(slurm, tmp_path, references):
    (command,) = commands("srun")
    code, output = run(command, tmp_path, env=slurm)
    check(command, code, output)
    record = json.loads((tmp_path / "runs" / "srun.json").read_text())
    assert record["topology"]["process_count"] == 2
    assert record["topology"]["joined_via"].startswith("cluster:SlurmCluster; slurm job ")
    job = record["topology"]["cluster_job"]
    assert job["scheduler"] == "slurm" and job["job_id"].isdigit() and job["step_id"] == "0"
    assert_match(reference_run(references, 20), tmp_path / "runs" / "srun.json")


def _job_state(env: dict, name: str) -> str:
    out = subprocess.run(["squeue", "-h", "--name", name, "-o", "%T"], env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.strip()


def _wait_for(predicate, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _saves(folder: Path) -> int:
    out = folder / "job.out"
    return out.read_text().count("saved step") if out.exists() else 0


def _restarts(folder: Path) -> int:
    out = folder / "job.out"
    return out.read_text().count("restored step") if out.exists() else 0


def test_preempted_and_cancelled_batch_job_resumes_to_the_same_bits(slurm, tmp_path, references):
    job = script("#SBATCH")
    (tmp_path / "job.sh").write_text(job)
    submit, preempt, cancel, grep = commands("sbatch", containing="job.sh")
    code, output = run(submit, tmp_path, env=slurm)
    check(submit, code, output)
    # The uninterrupted run, meanwhile (the job spends seconds queued at each requeue).
    straight = start_reference_run(references, int(job.split("--steps ")[1].split()[0]))
    try:
        # SLURM's preemption once the first checkpoint is written.
        _wait_for(lambda: _saves(tmp_path) >= 1, "the first checkpoint")
        check(preempt, *run(preempt, tmp_path, env=slurm))
        # The requeued run restores, then saves once more: then scancel --full.
        _wait_for(lambda: _restarts(tmp_path) >= 1, "the requeued run")
        saves = _saves(tmp_path)
        _wait_for(lambda: _saves(tmp_path) > saves, "the requeued run's checkpoint")
        check(cancel, *run(cancel, tmp_path, env=slurm))
        _wait_for(lambda: _job_state(slurm, "train") == "", "the job's end", timeout=300)
    finally:
        subprocess.run(["scancel", "--name", "train"], env=slurm, timeout=30, check=False)
    code, output = run(grep, tmp_path, env=slurm)
    check(grep, code, output, any_order=True)
    assert_match(straight(), tmp_path / "runs" / "job.json")
    topology = json.loads((tmp_path / "runs" / "job.json").read_text())["topology"]
    assert topology["joined_via"].endswith(", restart 2"), topology["joined_via"]
    assert topology["cluster_job"]["restart_count"] == "2"


def test_jpr_run_outside_srun_says_what_is_missing(slurm, tmp_path):
    submit, cat = commands("sbatch", containing="--wait")
    check(submit, *run(submit, tmp_path, env=slurm, timeout=180))
    check(cat, *run(cat, tmp_path, env=slurm))
