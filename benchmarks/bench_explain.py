"""``jpr explain``'s probes: one training step with every intermediate fingerprinted.

``jpr explain`` compiles the step again with a 64-bit fingerprint of every
intermediate value of its jaxpr (about 190 values for jpr's MLP), and reads
the fingerprints back. The baseline is the plain jitted step on the same
inputs, timed in the same process, interleaved. Both are compiled before
timing; each timed call waits for its results, and the probed one also copies
every fingerprint to the host (what ``explain`` then diffs).

Target: probed step <= 10x the plain step.

    python benchmarks/bench_explain.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import _common as c
import jax
import numpy as np

from jpr import data, rng, train
from jpr._probes import _probed_program
from jpr.config import RunConfig


def main(argv: list[str] | None = None) -> dict:
    args = c.parser(__doc__.split("\n")[0]).parse_args(argv)
    repeat = args.repeat or (20 if args.quick else 200)
    rep = c.Report("explain", args)
    cfg = RunConfig()
    graphdef, state = train.init_state(cfg)
    step_fn = train.make_train_step(cfg, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    x, y = data.get_batch(0, ds=data.make_dataset(cfg), batch_size=cfg.batch_size)
    step_args = (state.params, state.opt_state, rng.root_key(cfg.seed), x, y, np.uint32(0))
    program, flat = _probed_program(step_fn, step_args)

    def plain():
        jax.block_until_ready(step_fn(*step_args))

    def probed():
        outs, fps = program(*flat)
        jax.block_until_ready(outs)
        return [np.asarray(f) for f in fps]

    plain()
    n_values = len(probed())
    times = c.interleaved({"plain": plain, "probed": probed}, repeat)
    t_plain, t_probed = c.best(times["plain"]), c.best(times["probed"])
    rep.figure("values_fingerprinted", n_values)
    rep.figure("plain_step_s", t_plain, f"{t_plain * 1e6:.0f} µs")
    rep.figure("probed_step_s", t_probed, f"{t_probed * 1e6:.0f} µs")
    ratio = t_probed / t_plain
    rep.ratio(
        "explain.probe_cost",
        ratio,
        target="<= 10x",
        met=ratio <= 10,
        baseline="the plain jitted training step",
        jpr="the same step with every intermediate fingerprinted, fingerprints on the host",
        what="cost of hashing every intermediate of one step",
    )
    return rep.finish()


if __name__ == "__main__":
    main()
