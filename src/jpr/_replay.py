"""Replaying two run records for ``jpr explain``, each in a worker process of its own.

Each worker runs with its record's ``XLA_FLAGS``, device count and config, and
replays steps on request; :func:`explain_records` drives two of them to the
first step the records disagree on and diffs the probed step (:mod:`jpr._probe`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from jpr._probes import _locate, _probe
from jpr.errors import JprError

# --------------------------------------------------------------------------- replaying a record


def _leaf_names(args: tuple, names: tuple[str, ...]) -> list[str]:
    import jax

    from jpr.hashing import leaf_path

    out = []
    for name, a in zip(names, args, strict=True):
        for path, _ in jax.tree_util.tree_leaves_with_path(a):
            out.append("/".join(x for x in (name, leaf_path(path)) if x))
    return out


class _Replay:
    """One record's run, replayed in this process (which has the record's XLA flags)."""

    def __init__(self, record: dict[str, Any]):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from jpr import rng, train
        from jpr.config import RunConfig

        self.record = record
        self.cfg = RunConfig.from_dict(record["config"])
        self._ds = None  # built on first use: explaining step 0 needs no data
        self.mesh = train.make_mesh()
        # placed as the step returns its outputs: the step compiles once, not twice
        self.graphdef, state = train.init_state(self.cfg, mesh=self.mesh)
        self.root = rng.root_key(self.cfg.seed)
        self.multi = self.mesh.devices.size > 1
        self.batch_sharding = NamedSharding(self.mesh, P(train.AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.step_fn = train.make_train_step(self.cfg, self.graphdef, mesh=self.mesh)
        self.states = {0: (state.params, state.opt_state)}
        self.program_hash = {}
        self.perturb_at = record.get("perturb_at")
        self.devices = jax.device_count()

    @property
    def ds(self):
        from jpr import data

        if self._ds is None:
            self._ds = data.make_dataset(self.cfg)
        return self._ds

    def step_args(self, s: int) -> tuple:
        """The arguments of the step that produces trajectory entry ``s`` (``s >= 1``)."""
        import jax
        import numpy as np

        from jpr import data

        params, opt_state = self.states[s - 1]
        x, y = data.get_batch(s - 1, ds=self.ds, batch_size=self.cfg.batch_size)
        if self.multi:
            params, opt_state = jax.device_put(
                jax.tree_util.tree_map(np.asarray, (params, opt_state)), self.replicated
            )
            x, y = jax.device_put((x, y), self.batch_sharding)
        return params, opt_state, self.root, x, y, np.uint32(s - 1)

    def replay(self, until: int) -> dict[str, Any]:
        """Run steps up to ``until``; the params hash after each, against the record's."""
        import jax.numpy as jnp

        from jpr import hashing

        recorded = {e["step"]: e["params_hash"] for e in self.record["trajectory"]}
        rows = []
        for s in range(0, until + 1):
            if s not in self.states:
                params, opt_state, _ = self.step_fn(*self.step_args(s))
                self.program_hash[s] = hashing.hash_pytree(params)
                if self.perturb_at == s:
                    k = jnp.asarray(params["fc1"]["kernel"]).view(jnp.uint32)
                    k = k.at[0, 0].set(k[0, 0] ^ jnp.uint32(1)).view(jnp.float32)
                    params = {**params, "fc1": {**params["fc1"], "kernel": k}}
                self.states[s] = (params, opt_state)
            params, opt_state = self.states[s]
            h = hashing.hash_pytree(params)
            rows.append(
                {
                    "step": s,
                    "params_hash": h,
                    "program_hash": self.program_hash.get(s, h),
                    "state_hash": hashing.hash_pytree((params, opt_state)),
                    "leaves": hashing.leaf_hashes(params),
                    "recorded": recorded.get(s),
                }
            )
        return {"rows": rows}

    def probe(
        self, s: int, capture: int | None = None, which: str = "both", probes: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Probe the program of step ``s`` (0: the initialisation)."""
        import jax

        from jpr import hashing, model

        if s == 0:
            def fn():
                return model.init_params(self.cfg)[1]

            args, names = (), ()
            plain = fn()
            all_reduce = 0
        else:
            fn = self.step_fn
            args = self.step_args(s)
            names = ("params", "opt_state", "rng", "x", "y", "step")
            plain = fn(*args)
            text = fn.lower(*args).compile().as_text() or ""
            all_reduce = text.count(" all-reduce(") + text.count(" all-reduce-start(")
        outs, probe = _probe(fn, args, capture, which, probes)
        if not probes:
            return {}, {f"cap_{k}": v for k, v in probe.captured.items()}
        flat_plain = jax.tree_util.tree_leaves(plain)
        faithful = hashing.hash_pytree(list(outs)) == hashing.hash_pytree(flat_plain)
        meta = {
            "eqns": probe.eqns,
            "sites": probe.sites,
            "in_sites": probe.in_sites,
            "inputs": _leaf_names(args, names),
            "faithful": faithful,
            "all_reduce": all_reduce,
            "devices": self.devices,
        }
        arrays = {f"fp{i}": v for i, v in enumerate(probe.values)}
        arrays.update({f"cap_{k}": v for k, v in probe.captured.items()})
        return meta, arrays


def _worker(record_path: str, outdir: str) -> int:
    """``python -m jpr.explain --worker RECORD DIR``: answer requests on stdin."""
    import numpy as np

    from jpr.record import read_record
    from jpr.run_repro import enable_compilation_cache

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # only the protocol goes to the real stdout
    enable_compilation_cache()
    replay = _Replay(read_record(record_path))
    out = Path(outdir)
    for n, line in enumerate(sys.stdin):
        req = json.loads(line)
        try:
            if req["cmd"] == "replay":
                meta, arrays = replay.replay(req["until"]), {}
            else:
                meta, arrays = replay.probe(
                    req["step"], req.get("capture"), req.get("which", "both"),
                    req.get("probes", True),
                )
        except Exception as e:  # reported to the parent as one line
            proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
            continue
        (out / f"{n}.json").write_text(json.dumps(meta))
        np.savez(out / f"{n}.npz", **arrays)
        answer = {"json": str(out / f"{n}.json"), "npz": str(out / f"{n}.npz")}
        proto.write(json.dumps(answer) + "\n")
    return 0


def _xla_flags(record: dict[str, Any]) -> str:
    env = record.get("env", {})
    target = env.get("cpu_target")
    flags = None
    if isinstance(target, dict) and target.get("xla_flags"):
        flags = target["xla_flags"]
    flags = flags if flags is not None else env.get("XLA_FLAGS", "") or ""
    n = int(record.get("topology", {}).get("device_count") or env.get("device_count") or 1)
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    return flags


class _Worker:
    def __init__(self, path: str, record: dict[str, Any], tmp: Path, name: str):
        env = dict(os.environ)
        env["XLA_FLAGS"] = _xla_flags(record)
        if record.get("backend"):
            env["JAX_PLATFORMS"] = record["backend"]
        env.pop("JAX_NUM_CPU_DEVICES", None)
        folder = tmp / name
        folder.mkdir()
        # stderr to a file, never a pipe nobody reads while the worker runs
        self.log = (folder / "stderr.txt").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jpr.explain", "--worker", path, str(folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env,
        )
        self.name = name
        self.folder = folder

    def send(self, **req) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> tuple[dict[str, Any], dict[str, Any]]:
        import numpy as np

        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            err = (self.folder / "stderr.txt").read_text(errors="replace").strip().splitlines()
            raise JprError(f"the replay of record {self.name} failed: {err[-1] if err else '?'}")
        msg = json.loads(line)
        if "error" in msg:
            raise JprError(f"the replay of record {self.name} failed: {msg['error']}")
        meta = json.loads(Path(msg["json"]).read_text())
        with np.load(msg["npz"]) as z:
            arrays = {k: z[k] for k in z.files}
        return meta, arrays

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _both(workers, **req):
    for w in workers:
        w.send(**req)
    return [w.receive() for w in workers]


class _Stream:
    """A probe stream read back from a worker (what :func:`_candidates` needs)."""

    def __init__(self, meta, arrays):
        self.eqns, self.sites = meta["eqns"], meta["sites"]
        self.values = [arrays[f"fp{i}"] for i in range(len(self.sites))]
        self.captured = {k[4:]: v for k, v in arrays.items() if k.startswith("cap_")}
        self.meta = meta


def explain_records(path_a: str, path_b: str) -> dict[str, Any]:
    """Replay the first divergent step of two records and name its cause.

    Returns:
        A JSON-ready dict: ``cause`` is ``"op"`` (then ``op`` names the
        operation), ``"outside"`` (the program computes the same bits under
        both settings; the state was changed between steps), ``"inputs"`` (the
        step's inputs already differ) or ``"not_reproduced"``; ``step``,
        ``settings`` and ``replay`` give the evidence.

    Example:
        >>> from jpr.explain import explain_records
        >>> try:
        ...     explain_records("missing-a.json", "missing-b.json")
        ... except Exception as e:
        ...     print(e)
        missing-a.json: no such file
    """
    from jpr.compare import _first_divergence
    from jpr.record import read_record

    try:
        same = os.path.samefile(path_a, path_b)
    except OSError:
        same = False
    ra = read_record(path_a)
    rb = read_record(path_b)
    if same:
        raise JprError(f"{path_a} and {path_b} are the same file; explain two different runs")
    d = _first_divergence(ra["trajectory"], rb["trajectory"])
    if d is None:
        raise JprError(
            f"{path_a} and {path_b} do not diverge in their recorded trajectories: "
            "nothing to explain"
        )
    until, since = d["step"], d["last_equal_step"]
    settings = [
        {"record": str(p), "XLA_FLAGS": _xla_flags(r),
         "device_count": r.get("topology", {}).get("device_count"),
         "process_count": r.get("topology", {}).get("process_count"),
         "microbatches": r["config"].get("microbatches"),
         "perturb_at": r.get("perturb_at")}
        for p, r in ((path_a, ra), (path_b, rb))
    ]
    result: dict[str, Any] = {"settings": settings, "compare_step": until}
    with tempfile.TemporaryDirectory(prefix="jpr-explain-") as tmp:
        workers = [
            _Worker(str(path_a), ra, Path(tmp), "A"),
            _Worker(str(path_b), rb, Path(tmp), "B"),
        ]
        try:
            _explain(workers, until, since, result)
        finally:
            for w in workers:
                w.close()
    return result


def _explain(workers, until, since, result) -> None:
    (rep_a, _), (rep_b, _) = _both(workers, cmd="replay", until=until)
    rows_a, rows_b = rep_a["rows"], rep_b["rows"]
    result["timing"] = {}
    # the replay must reproduce each record where the record has a hash
    bad = [
        (name, r["step"]) for name, rows in (("A", rows_a), ("B", rows_b)) for r in rows
        if r["recorded"] is not None and r["recorded"] != r["params_hash"]
    ]
    result["replay"] = {"matches_records": not bad, "mismatch": bad[:1]}
    start = 0 if since is None else since
    step = next(
        (a["step"] for a, b in zip(rows_a, rows_b, strict=True)
         if a["step"] >= start and a["state_hash"] != b["state_hash"]),
        None,
    )
    result["step"] = step
    if bad or step is None:
        result["cause"] = "not_reproduced"
        return
    a, b = rows_a[step], rows_b[step]
    if step > 0 and a["program_hash"] == b["program_hash"]:
        # the step's program computed the same bits in both: the change came after it
        result["cause"] = "outside"
        result["leaves_differ"] = sorted(
            "params/" + k for k in set(a["leaves"]) | set(b["leaves"])
            if a["leaves"].get(k) != b["leaves"].get(k)
        )
        return
    (ma, fa), (mb, fb) = _both(workers, cmd="probe", step=step)
    sa, sb = _Stream(ma, fa), _Stream(mb, fb)
    result["faithful"] = [ma["faithful"], mb["faithful"]]
    result["all_reduce"] = [ma["all_reduce"], mb["all_reduce"]]
    result["eqns"] = len(ma["eqns"])
    differ = [
        name for name, ia, ib in zip(ma["inputs"], ma["in_sites"], mb["in_sites"], strict=False)
        if not (fa[f"fp{ia}"] == fb[f"fp{ib}"]).all()
    ]
    if differ:
        result["cause"] = "inputs"
        result["inputs_differ"] = differ
        return
    cache: dict[tuple[int, int], dict[str, Any]] = {}

    def capture(i: int, k: int) -> dict[str, Any]:
        # the plain step with one equation's inputs (then its outputs) captured,
        # asked of both workers at once; each answer is kept for the other side
        if (i, k) not in cache:
            got = _both(workers, cmd="probe", step=step, capture=k, which="both", probes=False)
            cache[(0, k)], cache[(1, k)] = (
                {n[4:]: v for n, v in arrays.items() if n.startswith("cap_")} for _, arrays in got
            )
        return cache[(i, k)]

    op = _locate(sa, sb, lambda k: capture(0, k), lambda k: capture(1, k))
    if op is not None:
        result["cause"] = "op"
        result["op"] = op
        op["cross_device"] = _cross_device(op, result)
        return
    result["cause"] = "not_reproduced"


_REDUCTIONS = {"dot_general", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "cumsum",
               "psum", "all_gather", "reduce_scatter"}


def _cross_device(op: dict[str, Any], result: dict[str, Any]) -> bool:
    """A reduction whose sum XLA splits across devices in one setting and not the other."""
    ar = result.get("all_reduce") or [0, 0]
    return op["primitive"] in _REDUCTIONS and ar[0] != ar[1]
