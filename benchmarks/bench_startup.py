"""Start-up: ``jpr run --steps 50`` and ``jpr compare`` end to end, in fresh processes.

* ``jpr run --steps 50``: wall time with jpr's persistent XLA compilation cache
  warm (the usual case: every run after the first on a machine), cold (an
  empty cache folder, the first run), and off (``JPR_COMPILATION_CACHE=0``).
  The final hash must be the same in all three. The baseline is a minimal
  hand-written script that trains the same model for 50 steps in a fresh
  process, with no cache; the import floor (``import jax, flax.nnx, optax``)
  is reported as well. ``python -X importtime`` says how much of it is
  imports, and checks that Orbax is not imported by a run that does not
  checkpoint.
* ``jpr compare A B`` on two run records: never imports JAX. Its baseline is
  the interpreter's own start-up (``python -c pass``).

Targets: none beyond "as fast as possible"; the ratios say where the time goes.

    python benchmarks/bench_startup.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import _common as c

HAND_WRITTEN = """
import hashlib
import jax, numpy as np, optax
from jpr import data, model
from jpr.config import RunConfig
cfg = RunConfig()
ds = data.make_dataset(cfg)
graphdef, params = model.init_params(cfg)
tx = optax.adam(cfg.lr)
opt_state = tx.init(params)
dropout_key = jax.random.key(cfg.seed)

@jax.jit
def train_step(params, opt_state, x, y, step):
    def loss_fn(p):
        logits = model.apply(graphdef, p, x, dropout_key=jax.random.fold_in(dropout_key, step))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

perm = np.random.default_rng(0).permutation(ds.size)
for step in range(50):
    idx = perm[step * 64 % ds.size:][:64]
    params, opt_state, loss = train_step(params, opt_state, ds.x[idx], ds.y[idx], np.uint32(step))
leaves = jax.tree.leaves(params)
print(hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in leaves)).hexdigest())
"""

def _hash_of(proc) -> str:
    m = re.search(r"^hash\s+([0-9a-f]{64})$", proc.stdout, re.M)
    if not m:
        raise RuntimeError(f"no hash in jpr run output:\n{proc.stdout}\n{proc.stderr}")
    return m.group(1)


def _imports(stderr: str) -> dict[str, float]:
    """Cumulative import seconds of each top-level module, from ``-X importtime``."""
    out = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):
            out[m.group(2)] = int(m.group(1)) / 1e6
    return out


def main(argv: list[str] | None = None) -> dict:
    args = c.parser(__doc__.split("\n")[0]).parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    rep = c.Report("startup", args)
    py = sys.executable
    env = c.child_env(JAX_COMPILATION_CACHE_DIR=None)
    tmp = Path(tempfile.mkdtemp(prefix="jpr-bench-startup-"))
    try:
        # -- jpr compare ----------------------------------------------------------
        from jpr import run_repro
        from jpr.record import write_json_atomic

        rec = run_repro.run(
            run_repro.build_parser().parse_args(["--steps", "3"]), out=lambda *a, **k: None
        )
        write_json_atomic(tmp / "a.json", rec)
        write_json_atomic(tmp / "b.json", rec)
        compare = [py, "-m", "jpr", "compare", "a.json", "b.json"]
        t = c.interleaved(
            {
                "python": lambda: c.run_child([py, "-c", "pass"], cwd=tmp, env=env),
                "compare": lambda: c.run_child(compare, cwd=tmp, env=env),
            },
            repeat + 2,
        )
        _, proc = c.run_child([py, "-X", "importtime", *compare[1:]], cwd=tmp, env=env)
        imported = _imports(proc.stderr)
        jax_loaded = any(m == "jax" or m.startswith("jax.") for m in imported)
        p0, cmp_wall = c.best(t["python"]), c.best(t["compare"])
        rep.figure("python_startup_ms", round(p0 * 1e3, 1), c.ms(p0))
        rep.figure("compare_wall_ms", round(cmp_wall * 1e3, 1), c.ms(cmp_wall))
        rep.figure(
            "compare_import_ms", round(sum(imported.values()) * 1e3, 1),
            c.ms(sum(imported.values())),
        )
        rep.figure("compare_imports_jax", jax_loaded)
        rep.ratio(
            "startup.compare",
            cmp_wall / p0,
            target="as fast as possible, no JAX",
            met=not jax_loaded,
            baseline=f"python -c pass {c.ms(p0)}",
            jpr=c.ms(cmp_wall),
            what="jpr compare A B (two run records), fresh process",
        )
        if args.quick:
            return rep.finish()

        # -- jpr run --steps 50 ---------------------------------------------------
        run = [py, "-m", "jpr", "run", "--steps", "50"]
        warm_dir = tmp / "cache-warm"
        hashes = {}

        def jpr_warm():
            _, proc = c.run_child(run, cwd=tmp, env={**env, "JPR_COMPILATION_CACHE": str(warm_dir)})
            hashes["warm"] = _hash_of(proc)

        cold_dirs = iter(range(1000))

        def jpr_cold():
            where = tmp / f"cache-cold-{next(cold_dirs)}"
            _, proc = c.run_child(run, cwd=tmp, env={**env, "JPR_COMPILATION_CACHE": str(where)})
            hashes["cold"] = _hash_of(proc)
            shutil.rmtree(where, ignore_errors=True)

        def jpr_off():
            _, proc = c.run_child(run, cwd=tmp, env={**env, "JPR_COMPILATION_CACHE": "0"})
            hashes["off"] = _hash_of(proc)

        jpr_warm()  # fills the warm cache
        t = c.interleaved(
            {
                "floor": lambda: c.run_child([py, "-c", c.IMPORT_FLOOR], cwd=tmp, env=env),
                "hand": lambda: c.run_child([py, "-c", HAND_WRITTEN], cwd=tmp, env=env),
                "warm": jpr_warm,
                "cold": jpr_cold,
                "off": jpr_off,
            },
            repeat,
        )
        floor, hand = c.best(t["floor"]), c.best(t["hand"])
        warm, cold, off = c.best(t["warm"]), c.best(t["cold"]), c.best(t["off"])
        same = len(set(hashes.values())) == 1
        _, proc = c.run_child(
            [py, "-X", "importtime", *run[1:]],
            cwd=tmp,
            env={**env, "JPR_COMPILATION_CACHE": str(warm_dir)},
        )
        imported = _imports(proc.stderr)
        orbax = any(m.startswith("orbax") for m in imported)
        rep.figure("import_floor_s", round(floor, 3), f"{floor:.2f} s ({c.IMPORT_FLOOR})")
        rep.figure("hand_written_50_steps_s", round(hand, 3), f"{hand:.2f} s")
        rep.figure("jpr_run_50_warm_s", round(warm, 3), f"{warm:.2f} s")
        rep.figure("jpr_run_50_cold_s", round(cold, 3), f"{cold:.2f} s")
        rep.figure("jpr_run_50_no_cache_s", round(off, 3), f"{off:.2f} s")
        rep.figure("jpr_run_import_s", round(sum(imported.values()), 3))
        rep.figure(
            "jpr_run_top_imports_s",
            {k: round(v, 3) for k, v in sorted(imported.items(), key=lambda kv: -kv[1])[:5]},
        )
        rep.figure("jpr_run_imports_orbax", orbax)
        rep.figure("same_hash_warm_cold_off", same)
        rep.ratio(
            "startup.run_50",
            warm / hand,
            target="as fast as possible",
            met=same and not orbax,
            baseline=f"hand-written script {hand:.2f} s",
            jpr=f"{warm:.2f} s",
            what="jpr run --steps 50, fresh process, compilation cache warm",
        )
        rep.ratio(
            "startup.run_50_no_cache",
            off / hand,
            target="as fast as possible",
            met=None,
            baseline=f"hand-written script {hand:.2f} s",
            jpr=f"{off:.2f} s",
            what="jpr run --steps 50, JPR_COMPILATION_CACHE=0",
        )
        rep.ratio(
            "startup.run_50_vs_imports",
            warm / floor,
            target="as fast as possible",
            met=None,
            baseline=f"{c.IMPORT_FLOOR}: {floor:.2f} s",
            jpr=f"{warm:.2f} s",
            what="jpr run --steps 50 (cache warm) vs importing its stack",
        )
        return rep.finish()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
