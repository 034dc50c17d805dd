"""Is this machine's JAX bitwise deterministic, with and without XLA's GPU determinism flag?

Runs the same work in two fresh processes, one per mode:

* ``default``: ``XLA_FLAGS`` as found;
* ``deterministic``: ``XLA_FLAGS`` plus ``--xla_gpu_deterministic_ops=true``
  (XLA then switches scatter, GEMMs, convolutions and attention to
  deterministic, potentially slower implementations).

In each process it does three things and hashes every result with
``jpr.hashing.hash_pytree``:

1. two identical training runs of jpr's MLP (same seed, same batches): do the
   final parameters hash the same?
2. a scatter-add of many values into few bins, repeated: how many distinct
   results? (On a GPU this is where atomics make the order of the additions,
   and so the rounding, change from one execution to the next.)
3. a column reduction (``x.sum(axis=0)``), repeated: how many distinct results?

It prints the median time of a training step, a scatter-add and a reduction in
each mode, so the cost of the flag is measured in the same run as its effect.
XLA flags are read once, when the backend starts, hence one process per mode.

Needs only the JAX already installed plus jpr's own dependencies (flax, optax;
not orbax). From the repository root::

    PYTHONPATH=src python benchmarks/gpu_determinism.py            # a few minutes on a GPU
    PYTHONPATH=src python benchmarks/gpu_determinism.py --tiny     # seconds, any backend
    PYTHONPATH=src python benchmarks/gpu_determinism.py --json out.json

On CPU the flag changes nothing (it is a GPU flag, and the CPU backend runs
these operations in a fixed order anyway); the script says so and still runs
both modes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLAG = "--xla_gpu_deterministic_ops=true"
MODES = {"default": "", "deterministic": FLAG}
RESULT_PREFIX = "RESULT "

#: Work sizes: train steps and batch size; scatter-add values and bins; the
#: reduced matrix's rows and columns; repeats of the scatter-add and the sum.
FULL = {
    "steps": 200,
    "batch_size": 1024,
    "scatter_n": 1 << 22,
    "bins": 256,
    "rows": 1 << 16,
    "cols": 256,
    "repeats": 10,
}
TINY = {
    "steps": 3,
    "batch_size": 64,
    "scatter_n": 1 << 12,
    "bins": 16,
    "rows": 256,
    "cols": 16,
    "repeats": 2,
}


def _import_jpr() -> None:
    """Make ``import jpr`` work when run as a file without ``PYTHONPATH=src``."""
    try:
        import jpr  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 4)


def _train_twice(sizes: dict[str, int]) -> dict[str, Any]:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpr import hashing, rng, train
    from jpr.config import RunConfig

    b = sizes["batch_size"]
    cfg = RunConfig(seed=0, batch_size=b, dataset_size=max(4096, b))
    # Fixed batches, made once up front (any fixed data will do: the question is
    # whether the same inputs give the same bits); the timed loop is the step only.
    gen = np.random.default_rng(0)
    batches = [
        (
            gen.standard_normal((b, cfg.features), dtype=np.float32),
            gen.integers(0, cfg.classes, b, dtype=np.int32),
        )
        for _ in range(sizes["steps"])
    ]
    batches = [jax.device_put(xy) for xy in batches]
    mesh = train.make_mesh(jax.devices()[:1])
    root = rng.root_key(cfg.seed)
    graphdef, _ = train.init_state(cfg)
    step_fn = train.make_train_step(cfg, graphdef, mesh=mesh)
    hashes, times = [], []
    for run in range(2):
        _, state = train.init_state(cfg)
        # Replicated like the step's outputs, so one compilation serves every step.
        params, opt_state = jax.device_put(
            (state.params, state.opt_state), NamedSharding(mesh, P())
        )
        for step, (x, y) in enumerate(batches):
            t0 = time.perf_counter()
            params, opt_state, loss = step_fn(params, opt_state, root, x, y, np.uint32(step))
            jax.block_until_ready(loss)
            if run == 1 or step > 0:  # the first call compiles
                times.append(time.perf_counter() - t0)
        hashes.append(hashing.hash_pytree(params))
    return {
        "hashes": hashes,
        "equal": hashes[0] == hashes[1],
        "step_ms": _median_ms(times),
    }


def _repeat(fn, args, repeats: int) -> dict[str, Any]:
    import jax

    from jpr import hashing

    jax.block_until_ready(fn(*args))  # compile
    hashes, times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        hashes.append(hashing.hash_pytree(out))
    return {
        "hashes": hashes,
        "distinct": len(set(hashes)),
        "repeats": repeats,
        "ms": _median_ms(times),
    }


def _scatter_and_reduce(sizes: dict[str, int]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    gen = np.random.default_rng(1)
    n, bins = sizes["scatter_n"], sizes["bins"]
    values = jax.device_put(gen.standard_normal(n, dtype=np.float32))
    index = jax.device_put(gen.integers(0, bins, n, dtype=np.int32))
    matrix = jax.device_put(gen.standard_normal((sizes["rows"], sizes["cols"]), dtype=np.float32))

    @jax.jit
    def scatter_add(v, i):
        return jnp.zeros((bins,), jnp.float32).at[i].add(v)

    @jax.jit
    def column_sum(m):
        return m.sum(axis=0)

    return {
        "scatter_add": _repeat(scatter_add, (values, index), sizes["repeats"]),
        "column_sum": _repeat(column_sum, (matrix,), sizes["repeats"]),
    }


def run_child(mode: str, sizes: dict[str, int]) -> dict[str, Any]:
    """Everything one mode measures, in this process (XLA_FLAGS already set)."""
    _import_jpr()
    import jax

    from jpr.envinfo import environment

    env = environment()
    return {
        "mode": mode,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "env": {
            k: env.get(k)
            for k in (
                "python",
                "jax",
                "jaxlib",
                "flax",
                "optax",
                "numpy",
                "backend",
                "device_kind",
                "device_count",
                "jax_threefry_partitionable",
            )
        },
        "backend": jax.default_backend(),
        "train": _train_twice(sizes),
        **_scatter_and_reduce(sizes),
        "modules_loaded": {"orbax": any(m.startswith("orbax") for m in sys.modules)},
    }


def _child_env(mode: str) -> dict[str, str]:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_gpu_deterministic_ops")]
    if MODES[mode]:
        flags.append(MODES[mode])
    env["XLA_FLAGS"] = " ".join(flags)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), src) if p)
    return env


def _run_mode(mode: str, tiny: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode]
    if tiny:
        cmd.append("--tiny")
    proc = subprocess.run(cmd, env=_child_env(mode), capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    sys.stderr.write(proc.stdout + proc.stderr)
    raise SystemExit(f"error: the {mode!r} run failed (exit {proc.returncode})")


def _cell(r: dict[str, Any]) -> str:
    return f"{r['distinct']} of {r['repeats']} ({r['hashes'][0][:12]})"


def format_report(results: list[dict[str, Any]], sizes: dict[str, int]) -> str:
    """The Markdown report (header lines and one table row per mode)."""
    env = results[0]["env"]
    backend = results[0]["backend"]
    lines = [
        f"date: {datetime.date.today().isoformat()}",
        f"device: {env['device_kind']} ({backend}, {env['device_count']} device(s))",
        "versions: "
        + ", ".join(f"{k} {env[k]}" for k in ("python", "jax", "jaxlib", "flax", "optax", "numpy")),
        f"work: {sizes['steps']} train steps of batch {sizes['batch_size']} (twice); "
        f"scatter-add of {sizes['scatter_n']} values into {sizes['bins']} bins and "
        f"sum over axis 0 of a {sizes['rows']}x{sizes['cols']} matrix, "
        f"{sizes['repeats']} times each",
    ]
    if backend != "gpu":
        lines.append(
            f"note: backend is {backend}, not gpu: {FLAG} only affects XLA's GPU backend, "
            "so the flag is irrelevant here and both modes run the same code"
        )
    lines += [
        "",
        "| mode | train: run 1 vs run 2 | scatter-add: distinct results | "
        "column sum: distinct results | step ms | scatter-add ms | column sum ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["train"]
        train_cell = (
            ("equal" if t["equal"] else "DIFFERENT")
            + " ("
            + ", ".join(h[:12] for h in dict.fromkeys(t["hashes"]))
            + ")"
        )
        lines.append(
            f"| {r['mode']} | {train_cell} | {_cell(r['scatter_add'])} | "
            f"{_cell(r['column_sum'])} | {t['step_ms']} | {r['scatter_add']['ms']} | "
            f"{r['column_sum']['ms']} |"
        )
    base, det = results[0], results[-1]
    if base is not det:
        same = {
            "train": base["train"]["hashes"] == det["train"]["hashes"],
            "scatter-add": base["scatter_add"]["hashes"] == det["scatter_add"]["hashes"],
            "column sum": base["column_sum"]["hashes"] == det["column_sum"]["hashes"],
        }
        lines.append("")
        lines.append(
            "bits, default vs deterministic: "
            + ", ".join(f"{k} {'same' if v else 'different'}" for k, v in same.items())
        )
    if base is not det and base["train"]["step_ms"] and det["train"]["step_ms"]:
        lines.append(
            "cost of the flag (deterministic / default): "
            f"train step x{det['train']['step_ms'] / base['train']['step_ms']:.2f}, "
            f"scatter-add x{det['scatter_add']['ms'] / base['scatter_add']['ms']:.2f}, "
            f"column sum x{det['column_sum']['ms'] / base['column_sum']['ms']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes: seconds on any backend")
    p.add_argument("--json", type=Path, help="also write all results (with full hashes) here")
    p.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    if args.child:
        print(RESULT_PREFIX + json.dumps(run_child(args.child, sizes)), flush=True)
        return 0
    results = [_run_mode(mode, args.tiny) for mode in MODES]
    print(format_report(results, sizes))
    if args.json is not None:
        args.json.write_text(json.dumps({"sizes": sizes, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
