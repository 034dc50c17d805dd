"""Multi-process runs: joining ``jax.distributed`` and checking that hosts agree.

A run joins a distributed job in one of three ways, tried in this order:

1. explicit ``--coordinator-address/--num-processes/--process-id`` flags;
2. the environment set by ``jpr launch`` (``JAX_COORDINATOR_ADDRESS``, which
   JAX itself reads, plus ``JPR_NUM_PROCESSES`` and ``JPR_PROCESS_ID``);
3. a cluster that ``jax.distributed.initialize()`` can detect on its own:
   then it is called without arguments. At JAX 0.10.2 that is a SLURM job step
   (``srun``), Open MPI up to 4 (``mpirun`` sets ``OMPI_MCA_orte_hnp_uri``),
   Cloud TPU, and Kubernetes if the ``kubernetes`` package is installed
   (``jax[k8s]``) and the pod belongs to an Indexed Job;
4. an Open MPI 5 job, which JAX does not detect (PRRTE no longer sets
   ``OMPI_MCA_orte_hnp_uri``): jpr reads its PMIx variables itself
   (:func:`pmix_settings`) and passes an explicit coordinator.

Otherwise the run is a single process, unless the environment is a cluster's
set only in part (``SLURM_NTASKS=2`` in a batch script, outside ``srun``):
that is one line naming what is missing (:func:`cluster_problem`), never a
wait for peers that will not come. On CPU the cross-process collectives
are gloo's (``jax_cpu_collectives_implementation``); on GPU and TPU the
setting is ignored and the backend's own collectives are used.

Every process initialises the model from the same key, so every process must
hold the same bits at every step. :func:`verify_identical` checks that with
JAX's multihost machinery: each process hashes every leaf of its state
(:func:`jpr.hashing.leaf_hashes`), the 32-byte digests are gathered from all
processes (a global array made with ``jax.make_array_from_process_local_data``
and replicated by a jitted identity, the recipe of
``multihost_utils.process_allgather``), and a mismatch is a
:class:`~jpr.errors.JprError` that names the process and the leaf. Folding the
process index into the init key (the classic bug, see
:func:`buggy_init_state`) is caught at step 0.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from jpr import runtime_log
from jpr.errors import JprError

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "GATHER_BYTES",
    "INIT_HINT",
    "DataFingerprint",
    "allgather_bytes",
    "allgather_hex",
    "buggy_init_state",
    "cluster_job",
    "cluster_problem",
    "collective_error",
    "detect_cluster",
    "exit_now_if_distributed",
    "initialize",
    "launch_settings",
    "peer_failure",
    "pmix_settings",
    "process_table",
    "reported_elsewhere",
    "runtime_failure_in",
    "stop_requested_anywhere",
    "undetected_clusters",
    "verify_identical",
    "verify_training_state",
]

#: Read by JAX itself as the default coordinator address; set by ``jpr launch``.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
#: The number of processes of a ``jpr launch`` job.
ENV_NUM_PROCESSES = "JPR_NUM_PROCESSES"
#: This process's index in a ``jpr launch`` job.
ENV_PROCESS_ID = "JPR_PROCESS_ID"

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _check_settings(address: Any, num_processes: Any, process_id: Any, source: str) -> None:
    if not isinstance(address, str) or not _ADDRESS.match(address):
        raise JprError(f"{source}: coordinator address must be host:port, got {address!r}")
    port = int(address.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise JprError(f"{source}: coordinator port must be in [1, 65535], got {port}")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise JprError(f"{source}: number of processes must be at least 1, got {num_processes!r}")
    if (
        isinstance(process_id, bool)
        or not isinstance(process_id, int)
        or not 0 <= process_id < num_processes
    ):
        raise JprError(f"{source}: process id must be in [0, {num_processes}), got {process_id!r}")


def launch_settings(env: Mapping[str, str] | None = None) -> tuple[str, int, int] | None:
    """The ``(address, num_processes, process_id)`` that ``jpr launch`` set, if any.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        ``None`` when the process was not started by ``jpr launch``.

    Raises:
        JprError: the variables are incomplete or malformed.

    Example:
        >>> from jpr.distributed import launch_settings
        >>> launch_settings({})
        >>> launch_settings({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:4321",
        ...                  "JPR_NUM_PROCESSES": "2", "JPR_PROCESS_ID": "1"})
        ('127.0.0.1:4321', 2, 1)
    """
    env = os.environ if env is None else env
    n, i = env.get(ENV_NUM_PROCESSES), env.get(ENV_PROCESS_ID)
    if n is None and i is None:
        return None
    address = env.get(ENV_COORDINATOR)
    if n is None or i is None or address is None:
        raise JprError(
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} go together "
            "(they are set by jpr launch)"
        )
    try:
        num, pid = int(n), int(i)
    except ValueError:
        raise JprError(
            f"{ENV_NUM_PROCESSES}={n!r} and {ENV_PROCESS_ID}={i!r} must be integers"
        ) from None
    _check_settings(address, num, pid, "jpr launch environment")
    return address, num, pid


def detect_cluster() -> str | None:
    """The multi-process job that ``jax.distributed.initialize()`` would join, or ``None``.

    This asks JAX's own cluster detectors (SLURM, Open MPI, Cloud TPU,
    Kubernetes; the opt-in ``mpi4py`` method is skipped, as JAX skips it), with
    two precautions, because ``jpr run`` asks on every start, not only when told
    to: a job of one process is no cluster (a test suite run inside a SLURM
    allocation must not have every process claim the job's coordinator port),
    and Kubernetes counts only in an Indexed Job (``JOB_COMPLETION_INDEX``), the
    only kind JAX can bootstrap, not in every pod (a CI runner, say). Detectors
    run with their warnings silenced.

    Example:
        >>> from jpr.distributed import detect_cluster
        >>> name = detect_cluster()  # None on a workstation
        >>> name is None or name.endswith("Cluster")
        True
    """
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - JAX moved its detectors
        return None
    for env in getattr(clusters.ClusterEnv, "_cluster_types", []):
        if getattr(env, "opt_in_only_method", False):
            continue
        if env.__name__ == "K8sCluster" and "JOB_COMPLETION_INDEX" not in os.environ:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if env.is_env_present() and env.get_process_count() > 1:
                    return env.__name__
        except Exception:  # a detector that cannot decide does not count
            continue
    return None


#: The variables JAX's SLURM detector needs, all of them (set in the tasks of ``srun``).
SLURM_TASK_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)

#: ``PMIX_NAMESPACE`` of a job started by Open MPI 5's ``mpirun`` (PRRTE's ``prterun``).
_PRTERUN_NAMESPACE = re.compile(r"^prterun-(?P<host>.+)-(?P<pid>\d+)@(?P<job>\d+)$")


def _count(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def pmix_settings(env: Mapping[str, str] | None = None) -> tuple[str, int, int] | None:
    """The ``(address, num_processes, process_id)`` of an Open MPI 5 job, if this is one.

    JAX 0.10.2's Open MPI detector reads ``OMPI_MCA_orte_hnp_uri``, which only
    Open MPI up to 4 sets; Open MPI 5's ``mpirun`` (PRRTE) starts every
    process with PMIx variables instead. jpr reads ``PMIX_RANK``,
    ``OMPI_COMM_WORLD_SIZE`` and ``PMIX_NAMESPACE``, whose form
    ``prterun-<host>-<pid>@<job>`` names the host ``mpirun`` runs on. As
    JAX's own Open MPI detector does with ``mpirun``'s address, it takes that
    host for process 0's (the default mapping puts rank 0 on the first host,
    where ``mpirun`` is started), with a port picked from ``mpirun``'s
    process id in JAX's range [61440, 65535] (``JAX_COORDINATOR_PORT``
    overrides it); ``JAX_COORDINATOR_ADDRESS`` overrides the whole address.

    Returns:
        ``None`` outside an Open MPI 5 job of two or more processes, and under
        Open MPI 4, which JAX detects itself.

    Raises:
        JprError: the variables are malformed.

    Example:
        >>> from jpr.distributed import pmix_settings
        >>> pmix_settings({})
        >>> pmix_settings({"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
        ...                "PMIX_NAMESPACE": "prterun-node7-4242@1"})
        ('node7:61586', 2, 1)
    """
    env = os.environ if env is None else env
    if "OMPI_MCA_orte_hnp_uri" in env or "PMIX_RANK" not in env:
        return None
    size, rank = _count(env, "OMPI_COMM_WORLD_SIZE"), _count(env, "PMIX_RANK")
    if size is None or size < 2:
        return None
    where = "Open MPI 5 environment"
    match = _PRTERUN_NAMESPACE.match(env.get("PMIX_NAMESPACE", ""))
    if rank is None or match is None:
        raise JprError(
            f"{where}: PMIX_RANK={env.get('PMIX_RANK')!r} and "
            f"PMIX_NAMESPACE={env.get('PMIX_NAMESPACE')!r} are not those of mpirun "
            "(an integer, and prterun-<host>-<pid>@<job>)"
        )
    port = env.get("JAX_COORDINATOR_PORT") or str(61440 + int(match["pid"]) % 4096)
    address = env.get(ENV_COORDINATOR) or f"{match['host']}:{port}"
    _check_settings(address, size, rank, where)
    return address, size, rank


def cluster_problem(env: Mapping[str, str] | None = None) -> str | None:
    """One line saying why a cluster's environment, set only in part, cannot be joined.

    A SLURM batch script of ``--ntasks=2`` has ``SLURM_NTASKS=2`` but is no
    task of a job step (``srun`` starts those): run there, ``jpr run`` would
    train alone while the user asked for two processes. The same for an Open
    MPI job whose launcher is neither Open MPI 4's (``OMPI_MCA_orte_hnp_uri``)
    nor Open MPI 5's (``PMIX_NAMESPACE`` of ``prterun``). Returns ``None`` when
    there is nothing to say (no such variables, or a job of one task).

    Example:
        >>> from jpr.distributed import cluster_problem
        >>> cluster_problem({})
        >>> cluster_problem({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2",
        ...                  "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})[:58]
        'SLURM_NTASKS=2 but SLURM_STEP_NODELIST is not set: this pr'
    """
    env = os.environ if env is None else env
    ntasks = _count(env, "SLURM_NTASKS")
    if ntasks is not None and ntasks > 1:
        missing = [v for v in SLURM_TASK_VARS if v not in env]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            return (
                f"SLURM_NTASKS={ntasks} but {', '.join(missing)} {verb} not set: this "
                "process is not a task of a job step (a batch script?); start the "
                "processes with srun, or unset SLURM_NTASKS to run one"
            )
    size = _count(env, "OMPI_COMM_WORLD_SIZE")
    launcher = "OMPI_MCA_orte_hnp_uri" in env or _PRTERUN_NAMESPACE.match(
        env.get("PMIX_NAMESPACE", "")
    )
    if size is not None and size > 1 and not launcher:
        return (
            f"OMPI_COMM_WORLD_SIZE={size} but neither OMPI_MCA_orte_hnp_uri (Open MPI 4) "
            "nor a PMIX_NAMESPACE of prterun (Open MPI 5) is set: start the processes "
            "with mpirun, or pass --coordinator-address, --num-processes and --process-id"
        )
    return None


def undetected_clusters(env: Mapping[str, str] | None = None) -> list[str]:
    """What ``jpr doctor`` says about a cluster environment that JAX will not detect.

    One line each: an Open MPI 5 job (JAX 0.10.2 reads only Open MPI 4's
    variable; ``jpr run`` joins it itself), a Kubernetes pod (JAX needs the
    ``kubernetes`` package, ``jax[k8s]``, and an Indexed Job), and an
    environment set only in part (:func:`cluster_problem`).

    Example:
        >>> from jpr.distributed import undetected_clusters
        >>> undetected_clusters({})
        []
        >>> undetected_clusters({"PMIX_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
        ...                      "PMIX_NAMESPACE": "prterun-node7-4242@1"})[0][:49]
        'Open MPI 5 job (PMIx): JAX 0.10.2 does not detect'
    """
    env = os.environ if env is None else env
    notes = []
    with contextlib.suppress(JprError):
        found = pmix_settings(env)
        if found is not None:
            notes.append(
                "Open MPI 5 job (PMIx): JAX 0.10.2 does not detect it (its Open MPI "
                "detector reads only OMPI_MCA_orte_hnp_uri, set by Open MPI 4); jpr run "
                f"joins it itself, {found[1]} processes, coordinator {found[0]}"
            )
    if "KUBERNETES_SERVICE_HOST" in env:
        if "JOB_COMPLETION_INDEX" not in env:
            notes.append(
                "Kubernetes pod outside an Indexed Job: no multi-process job to join "
                "(JAX bootstraps only an Indexed Job's pods); jpr run runs one process"
            )
        elif not _has_module("kubernetes"):
            notes.append(
                "Kubernetes Indexed Job: JAX will not detect it without the kubernetes "
                "package (pip install 'jax[k8s]'); until then jpr run runs one process "
                "per pod"
            )
    problem = cluster_problem(env)
    if problem is not None:
        notes.append(f"cluster environment set in part: {problem}")
    return notes


def _job_words(job: dict[str, str] | None) -> str:
    """``"; slurm job 12, step 0, restart 1"``: the job in ``joined_via``."""
    if not job:
        return ""
    words = {"job_id": "job", "step_id": "step", "restart_count": "restart",
             "completion_index": "index", "pod": "pod"}
    rest = ", ".join(f"{words[k]} {v}" for k, v in job.items() if k in words and v)
    return f"; {job['scheduler']} {rest}"


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def cluster_job(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The scheduler's names for this job, for the run record: ``None`` outside one.

    SLURM: job id, step id, restart count (a requeued job's); Open MPI: the
    job's namespace (Open MPI 5) or the launcher's job id (Open MPI 4);
    Kubernetes: the Indexed Job's completion index and the pod's host name.

    Example:
        >>> from jpr.distributed import cluster_job
        >>> cluster_job({})
        >>> cluster_job({"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "1"})
        {'scheduler': 'slurm', 'job_id': '12', 'step_id': '0', 'restart_count': '1'}
    """
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env:
        job = {"scheduler": "slurm", "job_id": env["SLURM_JOB_ID"]}
        for key, var in (("step_id", "SLURM_STEP_ID"), ("restart_count", "SLURM_RESTART_COUNT")):
            if var in env:
                job[key] = env[var]
        return job
    if "OMPI_MCA_orte_hnp_uri" in env:
        return {"scheduler": "openmpi", "job_id": env["OMPI_MCA_orte_hnp_uri"].split(";")[0]}
    if "PMIX_NAMESPACE" in env and "OMPI_COMM_WORLD_SIZE" in env:
        return {"scheduler": "openmpi", "job_id": env["PMIX_NAMESPACE"]}
    if "JOB_COMPLETION_INDEX" in env and "KUBERNETES_SERVICE_HOST" in env:
        return {
            "scheduler": "kubernetes",
            "completion_index": env["JOB_COMPLETION_INDEX"],
            "pod": env.get("HOSTNAME", ""),
        }
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> str | None:
    """Join a distributed run if this process is part of one.

    Must run before JAX computes anything. Returns how the run was joined:
    ``"flags"``, ``"jpr launch"``, ``"cluster:<Detector>"`` (JAX's detector),
    ``"cluster:OpenMPI5 (PMIx, read by jpr)"`` (:func:`pmix_settings`), or
    ``None`` for a single process (nothing is initialised then). A cluster's
    join names the scheduler's job after a semicolon (:func:`cluster_job`):
    ``"cluster:SlurmCluster; slurm job 12, step 0"``; ``jpr run`` keeps it in
    its record as ``topology.joined_via``.

    Args:
        coordinator_address: ``host:port`` of process 0.
        num_processes: the total number of processes.
        process_id: this process's index.

    Raises:
        JprError: flags given only in part, malformed values, a cluster's
            environment set only in part (:func:`cluster_problem`), or a
            coordinator that cannot be reached.

    Example:
        >>> from jpr.distributed import initialize
        >>> initialize() is None  # no flags, not launched, no cluster
        True
        >>> initialize("127.0.0.1:1234", 2, None)
        Traceback (most recent call last):
        ...
        jpr.errors.JprError: --coordinator-address, --num-processes and --process-id go together
    """
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise JprError("--coordinator-address, --num-processes and --process-id go together")
        _check_settings(coordinator_address, num_processes, process_id, "flags")
        how: str | None = "flags"
    elif (launched := launch_settings()) is not None:
        coordinator_address, num_processes, process_id = launched
        how = "jpr launch"
    elif (cluster := detect_cluster()) is not None:
        how = f"cluster:{cluster}{_job_words(cluster_job())}"
    elif (pmix := pmix_settings()) is not None:
        coordinator_address, num_processes, process_id = pmix
        how = f"cluster:OpenMPI5 (PMIx, read by jpr){_job_words(cluster_job())}"
    elif (problem := cluster_problem()) is not None:
        raise JprError(problem)
    else:
        return None

    import jax

    if jax.distributed.is_initialized():
        return how
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service (on by default) installs a C++ SIGTERM handler
    # at initialize() that replaces Python's, so jpr's graceful stop would never
    # see the signal; jpr agrees on the stop step itself (stop_requested_anywhere).
    jax.config.update("jax_enable_preemption_service", False)
    if num_processes is None or num_processes > 1:
        # JAX's C++ runtime logs and aborts on its own when a peer dies: keep
        # that out of the one line each process prints (jpr.runtime_log).
        runtime_log.route("" if process_id is None else str(process_id))
    try:
        jax.distributed.initialize(
            coordinator_address, num_processes=num_processes, process_id=process_id
        )
    except (RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise JprError(f"cannot join the distributed run ({how}): {first[:300]}") from None
    if jax.process_count() > 1:
        _install_excepthook()
        _connect_quietly()
    return how


def _connect_quietly() -> None:
    import jax

    # The first collective connects the processes; on CPU, gloo then prints
    # "[Gloo] Rank i is connected to ..." on file descriptor 1 from C++, once
    # per process and group of devices, in an order that varies run to run.
    # Make those connections here (barriers), with descriptor 1 on /dev/null.
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 to protect
        saved = None
    try:
        if saved is not None:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 1)
        allgather_bytes(b"connected")  # also compiles the gather the checks use
        if jax.local_device_count() > 1:
            # Several devices per process: connect the group of all devices too,
            # the one a step over a mesh of every device uses.
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
            local = np.zeros(jax.local_device_count(), np.int32)
            x = jax.make_array_from_process_local_data(
                NamedSharding(mesh, P("all")), local, (jax.device_count(),)
            )
            jax.block_until_ready(jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(x))
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _install_excepthook() -> None:
    # A crashed process would otherwise wait at JAX's shutdown barrier for peers
    # that are themselves blocked in a collective: print the traceback, then go.
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        exit_now_if_distributed(1)

    sys.excepthook = hook


def exit_now_if_distributed(code: int, *, together: bool = False) -> None:
    """In a multi-process run, end this process now with ``code``.

    A process that fails alone must not wait at ``jax.distributed``'s shutdown
    barrier: its peers may be blocked in a collective that will never complete,
    and each would wait for the other until a heartbeat timeout. Exiting at
    once lets ``jpr launch`` (or the cluster's scheduler) see the failure and
    stop the rest. When every process fails together (``together=True``, a
    :func:`collective_error`), they all reach the shutdown barrier, so they shut
    down in order first: otherwise process 0, which hosts the coordination
    service, may leave while a peer still polls it, and that peer's runtime
    prints pages of connection errors. Does nothing in a single-process run.

    Example:
        >>> from jpr.distributed import exit_now_if_distributed
        >>> exit_now_if_distributed(2)  # single process: returns
    """
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() < 2:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if together:
        with contextlib.suppress(Exception):
            jax.distributed.shutdown()
    os._exit(code)


def peer_failure(e: BaseException) -> str | None:
    """One line for a JAX runtime error of a multi-process run (a peer is gone), else ``None``.

    When a process dies mid-run, its peers' next collective fails inside
    JAX's runtime (gloo: "Connection reset by peer"); that deserves one line,
    not a traceback. Outside a multi-process run, or for any other exception,
    this returns ``None`` and the error propagates as usual. The runtime's
    error may arrive as the cause or context of another exception (a save or a
    hash that read the failed step's arrays): the whole chain is searched
    (:func:`runtime_failure_in`).

    Example:
        >>> from jpr.distributed import peer_failure
        >>> peer_failure(RuntimeError("Gloo AllGather failed"))  # single process: None
    """
    jax = sys.modules.get("jax")
    try:
        if jax is None or not jax.distributed.is_initialized() or jax.process_count() < 2:
            return None
        index = jax.process_index()
    except Exception:  # a runtime too broken to answer: still not a traceback
        index = "?"
    found = runtime_failure_in(e)
    if found is None:
        return None
    first = (str(found).strip().splitlines() or [type(found).__name__])[0]
    return f"a collective failed on process {index} (is a peer process gone?): {first[:300]}"


#: Words of JAX's runtime when a peer process is gone (gloo, the coordination service).
_PEER_GONE = re.compile(
    r"Gloo \w+ failed|Connection reset by peer|Connection refused|Broken pipe|"
    r"coordination service|UNAVAILABLE|DEADLINE_EXCEEDED"
)


def runtime_failure_in(e: BaseException) -> BaseException | None:
    """The first exception in ``e``'s chain that JAX's runtime raised, or ``None``.

    Follows ``__cause__`` and ``__context__``. An exception counts when its
    class is JAX's (module ``jax…``/``jaxlib…``, name ``…Error``), or when it is
    a ``RuntimeError`` whose message has the runtime's words for a peer that is
    gone (a library may re-raise the runtime's error as a plain one).

    Example:
        >>> from jpr.distributed import runtime_failure_in
        >>> try:
        ...     try:
        ...         raise RuntimeError("Gloo AllGather failed: Connection reset by peer")
        ...     except RuntimeError as inner:
        ...         raise ValueError("cannot save") from inner
        ... except ValueError as outer:
        ...     print(runtime_failure_in(outer))
        Gloo AllGather failed: Connection reset by peer
        >>> runtime_failure_in(ValueError("bad input")) is None
        True
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        kind = type(cur)
        if kind.__module__.startswith(("jax", "jaxlib")) and kind.__name__.endswith("Error"):
            return cur
        if isinstance(cur, RuntimeError) and _PEER_GONE.search(str(cur)):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def collective_error(message: str) -> JprError:
    """A :class:`JprError` that every process raises together.

    All processes fail with the same message (say, a cross-process check that
    they all evaluated); only process 0 prints it, so the log says it once.

    Example:
        >>> from jpr.distributed import collective_error, reported_elsewhere
        >>> e = collective_error("params differ")
        >>> str(e), reported_elsewhere(e)  # single process: this one reports it
        ('params differ', False)
    """
    e = JprError(message)
    e.collective = True  # type: ignore[attr-defined]
    return e


def reported_elsewhere(e: BaseException) -> bool:
    """Whether process 0 reports this error, so this process should stay quiet.

    Example:
        >>> from jpr.distributed import reported_elsewhere
        >>> from jpr.errors import JprError
        >>> reported_elsewhere(JprError("bad flag"))
        False
    """
    if not getattr(e, "collective", False):
        return False
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized() and jax.process_index() != 0


def stop_requested_anywhere(signum: int | None) -> tuple[int, int] | None:
    """Whether any process was asked to stop: ``(signal, process index)`` or ``None``.

    Each process passes the signal it received (``None``: none); the one-byte
    flags are all-gathered (:func:`allgather_bytes`), so every process gets the
    same answer and a run stops at the same step on all of them, or on none.
    The first process (by index) that received a signal names it. All processes
    must call it at the same point of the run. Cost: one small all-gather, the
    same compiled program as every other check, once per chunk of up to 256
    steps; ``benchmarks/bench_preempt.py`` measures it against the chunk
    (the Performance page shows its latest figures).

    Why not ``jax.experimental.multihost_utils.reached_preemption_sync_point``:
    it does work on CPU with the coordination service (JAX 0.10.2), but its
    notifier catches SIGTERM only (not SIGINT), replaces Python's SIGTERM
    handler (so a second signal no longer stops at once), and agrees on a sync
    step asynchronously, some unbounded number of calls later (100 calls of
    10 ms after the signal when measured here); this collective answers at the
    very next chunk boundary.

    Example:
        >>> from jpr.distributed import stop_requested_anywhere
        >>> stop_requested_anywhere(None), stop_requested_anywhere(15)  # one process
        (None, (15, 0))
    """
    rows = allgather_bytes(bytes([int(signum or 0) & 0xFF]))
    for p, row in enumerate(rows):
        if row and row[0]:
            return row[0], p
    return None


#: Payloads up to this size are gathered in one collective of one fixed shape.
GATHER_BYTES = 1 << 16


def allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's ``payload`` (any length); item ``p`` is process ``p``'s.

    Gathers one ``uint8`` buffer of a fixed size (:data:`GATHER_BYTES`, the
    length in its first 8 bytes) from every process, so that one compiled
    program serves the whole run: only process 0 writes JAX's persistent
    compilation cache, so every other process compiles each new program anew
    in every run. Larger payloads take a second, size-agreed round. All
    processes must call it. In a single-process run it returns ``[payload]``
    without any collective.

    Example:
        >>> from jpr.distributed import allgather_bytes
        >>> allgather_bytes(b"host data")
        [b'host data']
    """
    import jax

    if jax.process_count() == 1:
        return [bytes(payload)]
    head = np.frombuffer(np.int64(len(payload)).tobytes(), np.uint8)
    buf = np.zeros(GATHER_BYTES, np.uint8)
    buf[:8] = head
    fits = len(payload) <= GATHER_BYTES - 8
    if fits:
        buf[8 : 8 + len(payload)] = np.frombuffer(payload, np.uint8)
    rows = _allgather(buf)
    lengths = [int(np.frombuffer(row[:8].tobytes(), np.int64)[0]) for row in rows]
    if max(lengths) <= GATHER_BYTES - 8:
        return [row[8 : 8 + n].tobytes() for row, n in zip(rows, lengths, strict=True)]
    big = np.zeros(1 << (max(lengths) - 1).bit_length(), np.uint8)
    big[: len(payload)] = np.frombuffer(payload, np.uint8)
    rows = _allgather(big)
    return [row[:n].tobytes() for row, n in zip(rows, lengths, strict=True)]


def _allgather(arr: np.ndarray) -> np.ndarray:
    """``arr`` from every process, stacked along a new axis 0.

    The recipe of ``jax.experimental.multihost_utils.process_allgather`` (a
    global array from process-local data, then a jitted identity with a
    replicated output), with one jitted function kept for the whole run:
    ``process_allgather`` builds a new one per call, and on processes other than
    0 calls with alternating shapes compiled again (5 compiles for 10 calls).
    """
    import jax

    gather, sharding = _gatherer()
    local = np.expand_dims(arr, 0)
    shape = (jax.process_count(), *arr.shape)
    out = gather(jax.make_array_from_process_local_data(sharding, local, shape))
    return np.asarray(out.addressable_data(0))


@functools.cache
def _gatherer():
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.asarray(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
    mesh = jax.sharding.Mesh(devices, ("processes", "local"))
    replicated = NamedSharding(mesh, P())
    return jax.jit(lambda x: x, out_shardings=replicated), NamedSharding(mesh, P("processes"))


def allgather_hex(values: list[str]) -> list[list[str]]:
    """Gather hex strings from every process; row ``p`` is process ``p``'s.

    All processes must call it with the same number of strings of the same
    lengths (a mismatch is an error on every process).

    Example:
        >>> from jpr.distributed import allgather_hex
        >>> allgather_hex(["0a1b", "ffff"])
        [['0a1b', 'ffff']]
    """
    lengths = [len(v) for v in values]
    rows = allgather_bytes(bytes.fromhex("".join(values)))
    out = []
    for p, row in enumerate(rows):
        if len(row) * 2 != sum(lengths):
            raise collective_error(f"process {p} sent fingerprints of another size")
        text, pos, mine = row.hex(), 0, []
        for n in lengths:
            mine.append(text[pos : pos + n])
            pos += n
        out.append(mine)
    return out


def verify_cpu_targets() -> dict:
    """Refuse a run whose processes generate different CPU code; returns this one's.

    Every process sends its :mod:`jpr.platform` target and probe fingerprint.
    Processes compiled for different instruction sets round differently, so
    their parameters would disagree from the first matmul of the init on: the
    run stops before step 0 with one line naming each process's target. All
    processes must call it; a single process only measures its own.

    Example:
        >>> from jpr.distributed import verify_cpu_targets
        >>> sorted(verify_cpu_targets())
        ['effective', 'probe']
    """
    import json

    from jpr import platform

    target = platform.current_target()
    mine = {"effective": f"{target.arch} {target.effective}", "probe": platform.probe()}
    rows = [json.loads(b) for b in allgather_bytes(json.dumps(mine, sort_keys=True).encode())]
    if any(row != rows[0] for row in rows):
        each = ", ".join(
            f"process {p}: {r['effective']} (probe {r['probe']})" for p, r in enumerate(rows)
        )
        raise collective_error(
            f"the processes generate different CPU code ({each}): their float results would "
            "differ from the init on; start every process with the same XLA_FLAGS and "
            "JPR_CPU_TARGET (or on CPUs of the same level)"
        )
    return mine


def verify_identical(
    tree: Any, *, what: str = "state", step: int | None = None, hint: str = ""
) -> str:
    """Check that every process holds bitwise the same ``tree``; return its hash.

    Each process hashes its leaves; the 32-byte digests (a few bytes per leaf,
    whatever the size of the arrays) are gathered from every process
    (:func:`allgather_bytes`) and compared with process 0's. All processes
    must call it (it is a collective), and all of them raise the same error,
    so none is left waiting.

    Args:
        tree: the pytree to check (e.g. params and optimizer state).
        what: what the tree is, for the error message.
        step: the training step, for the error message.
        hint: a sentence appended to the error message.

    Returns:
        The tree's :func:`jpr.hashing.hash_pytree`, equal on every process.

    Raises:
        JprError: a process holds a different structure or different bits; the
            message names the first such process and leaf.

    Example:
        >>> import numpy as np
        >>> from jpr.distributed import verify_identical
        >>> verify_identical({"w": np.zeros(3, np.float32)})[:16]  # one process
        'efbd2c79659ffa2a'
    """
    import jax

    from jpr import hashing

    combined, leaves = hashing.hash_pytree_and_leaves(tree)
    if jax.process_count() == 1:
        return combined
    where = f"{what} differs across processes" + ("" if step is None else f" at step {step}")
    paths = list(leaves)
    structure = hashlib.sha256("\n".join(paths).encode()).digest()
    rows = allgather_bytes(structure + b"".join(bytes.fromhex(h) for h in leaves.values()))
    for p, row in enumerate(rows):
        if row[:32] != rows[0][:32]:
            raise collective_error(
                f"{where}: process {p} has a different tree structure than process 0"
            )
    digests = [[row[32 + 32 * i : 64 + 32 * i] for i in range(len(paths))] for row in rows]
    for p in range(1, len(rows)):
        bad = [i for i in range(len(paths)) if digests[p][i] != digests[0][i]]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            i = bad[0]
            msg = (
                f"{where}: {paths[i]}{more} on process {p} does not match process 0 "
                f"(sha256 {digests[p][i].hex()[:12]} vs {digests[0][i].hex()[:12]})"
            )
            raise collective_error(msg + (f"; {hint}" if hint else ""))
    return combined


def buggy_init_state(cfg: Any) -> tuple[Any, Any]:
    """The classic multi-host bug, on purpose: the process index folded into the init key.

    Each process then starts from different parameters (``fold_in(params key,
    process_index)``), trains its own model and averages gradients that belong
    to other models. Only for demonstrating :func:`verify_identical`; ``jpr
    run`` exposes it as the hidden flag ``--bug-fold-process-into-init``.

    Returns:
        ``(graphdef, TrainState)`` like :func:`jpr.train.init_state`.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.distributed import buggy_init_state
        >>> from jpr.hashing import hash_pytree
        >>> from jpr.train import init_state
        >>> _, bad = buggy_init_state(RunConfig(seed=0))
        >>> _, good = init_state(RunConfig(seed=0))
        >>> hash_pytree(bad.params) == hash_pytree(good.params)  # even on process 0
        False
    """
    from jpr import model, rng, train

    key = rng.host_key(rng.stream_key(rng.root_key(cfg.seed), "params"))
    graphdef, params = model.init_params(cfg, key=key)
    state = train.TrainState(params=params, opt_state=train.optimizer(cfg).init(params), step=0)
    return graphdef, state


#: What a mismatch at the first step of a run most likely means.
INIT_HINT = (
    "every process must initialise the model from the same key "
    "(is the process index folded into the init key?)"
)


def verify_training_state(cfg: Any, state: Any, root: Any) -> str:
    """Check config, params, optimizer state, root key and step across processes.

    The config enters through its fingerprint, so processes started with
    different flags are caught as well. Returns the checked tree's hash.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.distributed import verify_training_state
        >>> from jpr.rng import root_key
        >>> from jpr.train import init_state
        >>> cfg = RunConfig(seed=0)
        >>> len(verify_training_state(cfg, init_state(cfg)[1], root_key(0)))
        64
    """
    from jpr import train

    config = np.frombuffer(bytes.fromhex(cfg.fingerprint()), np.uint8)
    tree = {"config": config, **train.state_tree(state, root)}
    first = state.step == 0
    return verify_identical(
        tree, what="training state", step=state.step, hint=INIT_HINT if first else ""
    )


class DataFingerprint:
    """A running SHA-256 of the examples one process fed to training, in step order.

    Chunking does not change it: the rows of consecutive steps are hashed in
    order however they were grouped.

    Example:
        >>> import numpy as np
        >>> from jpr.distributed import DataFingerprint
        >>> a, b = DataFingerprint(), DataFingerprint()
        >>> x, y = np.ones((2, 4, 3), np.float32), np.zeros((2, 4), np.int32)
        >>> a.update(x, y)
        >>> b.update(x[:1], y[:1]); b.update(x[1:], y[1:])
        >>> a.hexdigest() == b.hexdigest(), a.steps
        (True, 2)
    """

    def __init__(self) -> None:
        self._x = hashlib.sha256(b"jpr-data-x-v1")
        self._y = hashlib.sha256(b"jpr-data-y-v1")
        self.steps = 0

    def update(self, x: Any, y: Any) -> None:
        """Add the batches of ``len(x)`` consecutive steps (``x[i]`` is step ``i``'s)."""
        self._x.update(np.ascontiguousarray(x).tobytes())
        self._y.update(np.ascontiguousarray(y).tobytes())
        self.steps += len(x)

    def hexdigest(self) -> str:
        """64 hex digits covering every example added so far."""
        return hashlib.sha256(self._x.digest() + self._y.digest()).hexdigest()


def process_table(
    *, data_hash: str, params_hash: str, root: Any, first_step: int, last_step: int
) -> list[dict[str, Any]]:
    """One row per process: what it drew and what it holds, gathered from all of them.

    Each row has the process index, the fingerprint of its host key of the
    ``"data"`` stream (``fold_in(data key, process_index)``, the key a per-host
    pipeline would draw from), the SHA-256 of the examples it fed to training
    over ``[first_step, last_step)``, and its params hash.

    Example:
        >>> from jpr.distributed import process_table
        >>> from jpr.rng import root_key
        >>> rows = process_table(data_hash="ab" * 32, params_hash="cd" * 32,
        ...                      root=root_key(0), first_step=0, last_step=5)
        >>> rows[0]["process_index"], rows[0]["steps"], len(rows[0]["host_data_key"])
        (0, [0, 5], 16)
    """
    from jpr import rng

    host_key = rng.key_fingerprint(rng.host_key(rng.stream_key(root, "data")))
    rows = allgather_hex([host_key, data_hash, params_hash])
    return [
        {
            "process_index": p,
            "host_data_key": hk,
            "data_hash": dh,
            "params_hash": ph,
            "steps": [first_step, last_step],
        }
        for p, (hk, dh, ph) in enumerate(rows)
    ]
