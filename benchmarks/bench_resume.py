"""Resume is O(1): the batch of step 10**9 against step 10, and jpr's verified
restore against a plain Orbax restore of the same arrays.

* Data: ``jpr.data.get_batch`` computes a step's batch directly (a Feistel
  permutation of the example indices, keyed per epoch), so step ``10**9``
  costs what step 10 costs. Measured warm (the epoch's round keys cached) and
  cold (a fresh dataset object, so the first fetch also derives the keys).
* Checkpoints: ``Checkpointer.restore`` reads the metadata and the arrays,
  checks the config and the tree structure and re-hashes everything it read;
  the baseline is ``CheckpointManager.restore`` of the same arrays with
  ``StandardRestore`` and nothing else.

Targets: data <= 1.5x, restore <= 1.2x.

    python benchmarks/bench_resume.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c
import jax
import numpy as np

from jpr import data
from jpr.config import RunConfig
from jpr.rng import root_key
from jpr.train import init_state

FAR, NEAR = 10**9, 10


def bench_data(rep: c.Report, cfg: RunConfig, calls: int, repeat: int) -> None:
    ds = data.make_dataset(cfg)
    b = cfg.batch_size

    def loop(step):
        def fn():
            for _ in range(calls):
                data.get_batch(step, ds=ds, batch_size=b)

        return fn

    loop(FAR)(), loop(NEAR)()  # both epochs' round keys cached
    t = c.interleaved({"near": loop(NEAR), "far": loop(FAR)}, repeat)
    near, far = c.best(t["near"]) / calls, c.best(t["far"]) / calls
    rep.figure("batch_step_10_us", round(near * 1e6, 2), c.us(near))
    rep.figure("batch_step_1e9_us", round(far * 1e6, 2), c.us(far))
    rep.ratio(
        "resume.batch_seek",
        far / near,
        target="<= 1.5x",
        met=far / near <= 1.5 if not rep.args.quick else None,
        baseline=c.us(near),
        jpr=c.us(far),
        what="get_batch(10**9) vs get_batch(10), epoch keys cached",
    )

    # Cold: a fresh Dataset (same arrays, empty round-key cache) for each fetch.
    def cold(step):
        def fn():
            fresh = data.Dataset(ds.x, ds.y, ds.eval_x, ds.eval_y, ds.order_key)
            data.get_batch(step, ds=fresh, batch_size=b)

        return fn

    cold(FAR)(), cold(NEAR)()
    t = c.interleaved({"near": cold(NEAR), "far": cold(FAR)}, repeat * 5)
    near, far = c.median(t["near"]), c.median(t["far"])
    rep.figure("cold_batch_step_10_us", round(near * 1e6, 1), c.us(near))
    rep.figure("cold_batch_step_1e9_us", round(far * 1e6, 1), c.us(far))
    rep.ratio(
        "resume.batch_seek_cold",
        far / near,
        target="<= 1.5x",
        met=far / near <= 1.5 if not rep.args.quick else None,
        baseline=c.us(near),
        jpr=c.us(far),
        what="first fetch after a restart (derives the epoch's keys), median",
    )


def bench_restore(rep: c.Report, cfg: RunConfig, repeat: int, folder: Path) -> None:
    import orbax.checkpoint as ocp

    from jpr.checkpoint import Checkpointer, _stored_tree

    _, state = init_state(cfg)
    root = root_key(cfg.seed)
    ckpt = Checkpointer(folder / "ckpt")
    ckpt.save(state, root=root, cfg=cfg)
    step = state.step

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _stored_tree(state, root))
    plain_mngr = ocp.CheckpointManager(folder / "ckpt", item_names=("state", "meta"))

    def plain():
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        return plain_mngr.restore(step, args=args)["state"]

    def jpr():
        return ckpt.restore(step, cfg=cfg, template=state)

    got, _ = jpr()
    pairs = zip(jax.tree.leaves(plain()["params"]), jax.tree.leaves(got.params), strict=True)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
    t = c.interleaved({"plain": plain, "jpr": jpr}, repeat)
    p, j = c.median(t["plain"]), c.median(t["jpr"])
    n_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(_stored_tree(state, root)))
    rep.figure("checkpoint_bytes", n_bytes)
    rep.figure("restored_arrays_equal", same)
    rep.figure("plain_orbax_restore_ms", round(p * 1e3, 2), c.ms(p))
    rep.figure("jpr_restore_ms", round(j * 1e3, 2), c.ms(j))
    rep.ratio(
        "resume.restore",
        j / p,
        target="<= 1.2x",
        met=j / p <= 1.2 if not rep.args.quick else None,
        baseline=c.ms(p),
        jpr=c.ms(j),
        what="Checkpointer.restore (verified) vs CheckpointManager.restore, median",
    )
    plain_mngr.close()
    ckpt.close()


def main(argv: list[str] | None = None) -> dict:
    args = c.parser(__doc__.split("\n")[0]).parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 15)
    rep = c.Report("resume", args)
    cfg = RunConfig(seed=0)
    bench_data(rep, cfg, calls=20 if args.quick else 500, repeat=repeat)
    with tempfile.TemporaryDirectory() as tmp:
        bench_restore(rep, cfg, repeat, Path(tmp))
    return rep.finish()


if __name__ == "__main__":
    main()
