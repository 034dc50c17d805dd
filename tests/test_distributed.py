"""Multi-process runs for real: ``jax.distributed`` on 127.0.0.1 with gloo collectives.

The module-scoped fixtures start real processes (``jpr launch -n 2 -- jpr run``,
and a pair joined through JAX's own SLURM detection) and share the results
between the assertions. The single-process runs they are compared with start
at the same time, so the slow part (process start-up and, on process 1, XLA
compilation, which JAX's persistent cache does not serve there) overlaps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jpr import data, distributed, run_repro
from jpr.config import RunConfig
from jpr.errors import JprError
from jpr.launch import free_port

TIMEOUT = 300  # seconds; a loaded 2-core machine is slow, a hang is not
RUN = ["jpr", "run", "--steps", "6", "--microbatches", "8", "--no-progress"]


def _start(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=cwd,
        env={**os.environ, **(env or {})},
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
            os.killpg(p.pid, signal.SIGTERM)  # the launcher stops its own children
        out, err = p.communicate()
        pytest.fail(f"{p.args} did not finish in {TIMEOUT}s:\n{out}\n{err}")
    return p.returncode, out, err


def _slurm_env(i: int, port: int) -> dict:
    # What srun sets for task i of a 2-task job on one node; JAX's SlurmCluster
    # detector turns it into coordinator address, process count and id.
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(i),
        "SLURM_LOCALID": str(i),
        "JAX_COORDINATOR_PORT": str(port),
    }


def _launch(*argv: str) -> list[str]:
    # A generous --grace: under load the second process may need seconds to exit
    # on its own, and the test checks what each process says, not the launcher's kill.
    return ["jpr", "launch", "-n", "2", "--grace", "60", "--", *argv]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this module, started together where they are independent."""
    d = tmp_path_factory.mktemp("multihost")
    ck = ["--checkpoint-dir", str(d / "ckpt")]
    # 2 processes (uninterrupted, checkpoint at 3), 8 simulated devices in one
    # process, and the classic bug: all at once.
    two = _start(_launch(*RUN, *ck, "--save-at", "3", "--out", str(d / "two.json")), d)
    eight = _start(
        [*RUN, "--out", str(d / "eight.json")],
        d,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    bug = _start(_launch("jpr", "run", "--steps", "2", "--bug-fold-process-into-init"), d)
    results = {"two": _finish(two)}
    assert results["two"][0] == 0, results["two"]
    assert not (d / "ckpt" / ".jpr-lock").exists()  # process 0 held it, and released it
    # The resumed pair joins through JAX's own SLURM detection, not jpr launch.
    port = free_port()
    argv = [*RUN, *ck, "--restore-from", "3", "--out", str(d / "resumed.json")]
    resumed = [_start(argv, d, _slurm_env(i, port)) for i in range(2)]
    # 1 device: in this process (pytest's JAX has one CPU device) while the others run.
    assert jax.device_count() == 1
    assert run_repro.main([*RUN[2:], "--out", str(d / "one.json")]) == 0
    results.update(eight=_finish(eight), bug=_finish(bug))
    results["resumed"] = [_finish(p) for p in resumed]
    for name in ("two", "eight"):
        assert results[name][0] == 0, results[name]
    for code, out, err in results["resumed"]:
        assert code == 0, (out, err)
    records = {n: json.loads((d / f"{n}.json").read_text()) for n in ("one", "two", "eight")}
    records["resumed"] = json.loads((d / "resumed.json").read_text())
    return results, records


@pytest.mark.slow
def test_every_process_ends_with_the_same_model(runs):
    results, records = runs
    rec = records["two"]
    topo = rec["topology"]
    assert (topo["process_count"], topo["device_count"], topo["joined_via"]) == (2, 2, "jpr launch")
    assert [p["process_index"] for p in topo["processes"]] == [0, 1]
    assert {p["params_hash"] for p in topo["processes"]} == {rec["hash"]}
    assert topo["verified_identical_at"] == [0, 3, 6]
    out = results["two"][1].splitlines()
    assert "[0] 2 processes, 2 devices: state identical on every process at steps 0, 3, 6" in out
    assert not [line for line in out if line.startswith("[1]")]  # only process 0 prints
    assert "[Gloo]" not in results["two"][1]


@pytest.mark.slow
def test_processes_draw_different_data(runs):
    _, records = runs
    procs = records["two"]["topology"]["processes"]
    assert procs[0]["data_hash"] != procs[1]["data_hash"]
    assert procs[0]["host_data_key"] != procs[1]["host_data_key"]
    # Each fingerprint is exactly that process's slice of the global batches.
    cfg = RunConfig(seed=0, microbatches=8)
    ds = data.make_dataset(cfg)
    for p in (0, 1):
        fp = distributed.DataFingerprint()
        for step in range(6):
            x, y = data.get_batch(step, ds=ds, batch_size=64, process_index=p, process_count=2)
            fp.update(x[None], y[None])
        assert procs[p]["data_hash"] == fp.hexdigest()
        assert procs[p]["steps"] == [0, 6]


@pytest.mark.slow
def test_two_process_resume_equals_uninterrupted(runs):
    results, records = runs
    two, resumed = records["two"], records["resumed"]
    assert resumed["resumed_from"]["step"] == 3
    assert (resumed["hash"], resumed["state_hash"]) == (two["hash"], two["state_hash"])
    assert resumed["topology"]["verified_identical_at"] == [3, 6]
    assert resumed["topology"]["joined_via"] == "cluster:SlurmCluster; slurm job 4242"
    assert resumed["topology"]["cluster_job"] == {"scheduler": "slurm", "job_id": "4242"}
    assert {p["params_hash"] for p in resumed["topology"]["processes"]} == {two["hash"]}
    (_, out0, _), (_, out1, _) = results["resumed"]
    assert out0.startswith("restored step 3 from ") and out1 == ""


@pytest.mark.slow
def test_microbatches_give_one_hash_on_any_topology(runs):
    _, records = runs
    devices = {n: records[n]["env"]["device_count"] for n in ("one", "eight", "two")}
    assert devices == {"one": 1, "eight": 8, "two": 2}
    assert records["two"]["env"]["process_count"] == 2
    assert len({records[n]["hash"] for n in devices}) == 1
    assert len({records[n]["state_hash"] for n in devices}) == 1
    # Not only the end: every step of the trajectory.
    steps = [[(e["step"], e["params_hash"]) for e in records[n]["trajectory"]] for n in devices]
    assert steps[0] == steps[1] == steps[2] and len(steps[0]) == 7


@pytest.mark.slow
def test_wrong_init_key_is_caught_naming_process_and_leaf(runs):
    results, _ = runs
    code, out, err = results["bug"]
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2, err  # process 0 reports it once; the launcher sums up
    assert lines[0].startswith(
        "[0] jpr run: error: training state differs across processes at "
        "step 0: params/fc1/kernel (and 1 more) on process 1 does not match process 0 "
    )
    assert lines[0].endswith(
        "every process must initialise the model from the same key "
        "(is the process index folded into the init key?)"
    )
    assert lines[1] == "jpr launch: error: processes 0 and 1 exited with status 2"


# ------------------------------------------------------- in-process, no peers


def test_single_process_run_joins_nothing_and_checks_nothing(tmp_path):
    assert distributed.initialize() is None
    assert run_repro.main(["--steps", "2", "--out", str(tmp_path / "r.json")]) == 0
    topo = json.loads((tmp_path / "r.json").read_text())["topology"]
    assert (topo["process_count"], topo["joined_via"], topo["verified_identical_at"]) == (
        1,
        None,
        [],
    )
    assert len(topo["processes"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("127.0.0.1:1234", 2, None), "go together"),
        (("localhost", 2, 0), "must be host:port"),
        (("127.0.0.1:70000", 2, 0), "port must be in [1, 65535]"),
        (("127.0.0.1:1234", 0, 0), "at least 1"),
        (("127.0.0.1:1234", 2, 2), "process id must be in [0, 2)"),
    ],
)
def test_bad_flags_are_one_clear_error(args, message):
    with pytest.raises(JprError, match=re.escape(message)):
        distributed.initialize(*args)


def test_bad_flags_exit_2_from_the_cli(capsys):
    code = run_repro.main(
        ["--steps", "2", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "jpr run: error: --coordinator-address, --num-processes and --process-id go together\n"
    )


def test_launch_environment_is_read_and_checked():
    env = {
        "JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000",
        "JPR_NUM_PROCESSES": "4",
        "JPR_PROCESS_ID": "3",
    }
    assert distributed.launch_settings(env) == ("127.0.0.1:5000", 4, 3)
    assert distributed.launch_settings({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000"}) is None
    with pytest.raises(JprError, match="go together"):
        distributed.launch_settings({"JPR_PROCESS_ID": "0"})
    with pytest.raises(JprError, match="must be integers"):
        distributed.launch_settings({**env, "JPR_PROCESS_ID": "one"})
    with pytest.raises(JprError, match=r"process id must be in \[0, 4\)"):
        distributed.launch_settings({**env, "JPR_PROCESS_ID": "4"})


def test_cluster_detection_is_jaxs_own_with_two_precautions(monkeypatch, recwarn):
    for k in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_"))]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert distributed.detect_cluster() is None
    for k, v in _slurm_env(0, 1234).items():
        monkeypatch.setenv(k, v)
    assert distributed.detect_cluster() == "SlurmCluster"
    # A job of one task is no cluster: nothing to join, no coordinator port to claim.
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detect_cluster() is None
    # Every Kubernetes pod has this variable; only an Indexed Job is a JAX cluster.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert distributed.detect_cluster() is None
    assert not [w for w in recwarn if "ubernetes" in str(w.message)]


def test_verify_identical_alone_is_the_hash():
    tree = {"w": np.arange(3, dtype=np.float32)}
    from jpr.hashing import hash_pytree

    assert distributed.verify_identical(tree) == hash_pytree(tree)
    assert distributed.allgather_hex(["ab", "cdef"]) == [["ab", "cdef"]]
    e = distributed.collective_error("x")
    assert not distributed.reported_elsewhere(e)  # no peers: this process reports it


def test_a_runtime_error_behind_another_exception_is_found():
    """A peer's death can reach the CLI as the cause or context of another
    exception (a save, a hash); the chain is searched, and plain errors are not
    mistaken for it."""
    from jpr.distributed import runtime_failure_in

    gone = RuntimeError("Gloo AllGather failed: [pair.cc:538] Read error: Connection reset by peer")
    try:
        try:
            raise gone
        except RuntimeError:
            raise KeyError("leaf")  # noqa: B904 - context, not cause, on purpose
    except KeyError as outer:
        assert runtime_failure_in(outer) is gone
    assert runtime_failure_in(RuntimeError("shapes differ")) is None
    assert runtime_failure_in(ValueError("Connection reset by peer")) is None


# ----------------------------------------------------------- cluster environments


_PMIX = {"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "PMIX_NAMESPACE": "prterun-node-7-4242@1"}
_BATCH_SCRIPT = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODELIST": "node1"}


def _clean_cluster_env(monkeypatch) -> None:
    prefixes = ("SLURM_", "OMPI_", "PMIX_", "KUBERNETES_", "JPR_", "JAX_COORDINATOR")
    for k in [k for k in os.environ if k.startswith(prefixes)]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)


def test_open_mpi_5_is_read_from_its_pmix_variables():
    # JAX 0.10.2 reads only Open MPI 4's OMPI_MCA_orte_hnp_uri: jpr reads PMIx's.
    assert distributed.pmix_settings(_PMIX) == ("node-7:61586", 2, 1)  # 61440 + 4242 % 4096
    assert distributed.pmix_settings({**_PMIX, "JAX_COORDINATOR_PORT": "5000"}) == (
        "node-7:5000", 2, 1)
    assert distributed.pmix_settings({**_PMIX, "JAX_COORDINATOR_ADDRESS": "10.0.0.2:6000"}) == (
        "10.0.0.2:6000", 2, 1)
    assert distributed.pmix_settings({**_PMIX, "OMPI_MCA_orte_hnp_uri": "1.0;tcp://a:1"}) is None
    assert distributed.pmix_settings({**_PMIX, "OMPI_COMM_WORLD_SIZE": "1"}) is None
    with pytest.raises(JprError, match="not those of mpirun"):
        distributed.pmix_settings({**_PMIX, "PMIX_NAMESPACE": "slurm.pmix.12.0"})
    with pytest.raises(JprError, match=r"process id must be in \[0, 2\)"):
        distributed.pmix_settings({**_PMIX, "PMIX_RANK": "2"})


def test_a_cluster_set_in_part_is_one_line_naming_what_is_missing():
    problem = distributed.cluster_problem(_BATCH_SCRIPT)
    assert problem.startswith("SLURM_NTASKS=2 but SLURM_STEP_NODELIST is not set:")
    assert "srun" in problem
    step_task = {**_BATCH_SCRIPT, "SLURM_STEP_NODELIST": "node1"}
    assert distributed.cluster_problem(step_task) is None  # JAX's detector takes it
    assert distributed.cluster_problem({**_BATCH_SCRIPT, "SLURM_NTASKS": "1"}) is None
    assert distributed.cluster_problem({"SLURM_NTASKS": "4"}).startswith(
        "SLURM_NTASKS=4 but SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are")
    orphan = distributed.cluster_problem({"OMPI_COMM_WORLD_SIZE": "2"})
    assert "neither OMPI_MCA_orte_hnp_uri (Open MPI 4) nor a PMIX_NAMESPACE" in orphan
    assert distributed.cluster_problem(_PMIX) is None


def test_jpr_run_in_a_batch_script_outside_srun_stops_with_one_line(monkeypatch, capsys):
    _clean_cluster_env(monkeypatch)
    for k, v in _BATCH_SCRIPT.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect_cluster() is None  # JAX would run one process, silently
    with pytest.raises(JprError, match="SLURM_STEP_NODELIST is not set"):
        distributed.initialize()
    assert run_repro.main(["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "start the processes with srun" in err
    # The flags, and jpr launch's variables, come first: the batch script may use them.
    monkeypatch.setenv("JPR_NUM_PROCESSES", "1")
    monkeypatch.setenv("JPR_PROCESS_ID", "0")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    assert distributed.launch_settings() == ("127.0.0.1:1", 1, 0)


def test_kubernetes_needs_an_indexed_job_and_the_kubernetes_package(monkeypatch, recwarn):
    _clean_cluster_env(monkeypatch)
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    (note,) = distributed.undetected_clusters(pod)
    assert note.startswith("Kubernetes pod outside an Indexed Job")
    indexed = {**pod, "JOB_COMPLETION_INDEX": "1", "HOSTNAME": "train-1-x7"}
    has_package = distributed._has_module("kubernetes")
    notes = distributed.undetected_clusters(indexed)
    if not has_package:
        assert notes == [
            "Kubernetes Indexed Job: JAX will not detect it without the kubernetes package "
            "(pip install 'jax[k8s]'); until then jpr run runs one process per pod"
        ]
        for k, v in indexed.items():
            monkeypatch.setenv(k, v)
        assert distributed.detect_cluster() is None  # JAX warns and skips: jpr keeps it quiet
        assert not [w for w in recwarn if "ubernetes" in str(w.message)]
    assert distributed.cluster_job(indexed) == {
        "scheduler": "kubernetes", "completion_index": "1", "pod": "train-1-x7"}


def test_the_record_names_the_schedulers_job():
    slurm = {"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "2"}
    job = distributed.cluster_job(slurm)
    assert distributed._job_words(job) == "; slurm job 12, step 0, restart 2"
    ompi4 = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911"}
    assert distributed.cluster_job(ompi4) == {"scheduler": "openmpi", "job_id": "1531576320.0"}
    assert distributed.cluster_job(_PMIX)["job_id"] == "prterun-node-7-4242@1"
    assert distributed.cluster_job({}) is None and distributed._job_words(None) == ""


def test_doctor_names_a_cluster_that_jax_will_not_detect(monkeypatch, capsys):
    import argparse

    from jpr import doctor

    _clean_cluster_env(monkeypatch)
    for k, v in _PMIX.items():
        monkeypatch.setenv(k, v)
    assert doctor.run(argparse.Namespace(json=False, program=None)) == 0
    out = capsys.readouterr().out
    section = out.split("cluster environment that JAX will not detect:\n", 1)[1]
    assert section.startswith("  - Open MPI 5 job (PMIx): JAX 0.10.2 does not detect it")
    assert "coordinator node-7:61586" in section
    assert doctor.run(argparse.Namespace(json=True, program=None)) == 0
    assert json.loads(capsys.readouterr().out)["cluster"][0].startswith("Open MPI 5 job")


@pytest.mark.slow
def test_every_process_compiles_its_programs_once_per_machine(tmp_path):
    """JAX writes the compilation cache from process 0 only; jpr lets process 1 write too.

    Each process of a two-process run compiles the probe of the CPU's kernel
    families for its own device: two programs under two keys. One run on an
    empty cache writes both (with JAX's rule alone it writes one).
    """
    env = {"JPR_COMPILATION_CACHE": str(tmp_path / "cache"), "JAX_COMPILATION_CACHE_DIR": ""}
    code, _, err = _finish(_start(_launch(*RUN), tmp_path, env))
    assert code == 0, err
    probes = [p for p in (tmp_path / "cache").rglob("jit_every_family-*") if "atime" not in p.name]
    assert len(probes) == 2, [p.name for p in probes]
