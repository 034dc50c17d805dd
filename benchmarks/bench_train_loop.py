"""The per-step cost of ``jpr run`` against a minimal hand-written JAX loop.

Both train the same model (jpr's Flax NNX MLP, 64 -> 32 -> 10 with dropout),
on the same data, batch size (64) and optimizer (Optax Adam, lr 1e-3):

* baseline: the loop anyone would write first: one ``jax.jit`` step (the
  dropout key folded in from the step number inside the jitted function), one
  dispatch per step, batches sliced from a per-epoch NumPy permutation, no
  hashing, no host sync until the end;
* jpr: ``jpr run`` as the CLI runs it (``jpr.run_repro.run``, in this process),
  with its defaults: O(1)-seekable batches, a trajectory hash every step
  (``--trace-every 1``), the final state hashed and the run record built. jpr
  runs up to 256 steps per dispatch in a ``lax.fori_loop`` (the bits do not
  depend on that width: tests/test_perf_invariants.py).

Per-step cost = (time of 2050 steps - time of 50 steps) / 2000, so that start-up
(compilation, data generation, evaluation, the record) cancels. The trajectory
overhead compares ``--trace-every K`` with ``--trace-every 2050`` (one hash, at
the end).

Targets: jpr <= 1.15x the baseline; tracing every K steps adds < 5%.

    python benchmarks/bench_train_loop.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import functools

import _common as c
import jax
import numpy as np
import optax

from jpr import data, model, run_repro
from jpr.config import RunConfig


def hand_written(cfg: RunConfig):
    """A minimal hand-written training loop: returns ``train(steps) -> final loss``."""
    ds = data.make_dataset(cfg)
    graphdef, params0 = model.init_params(cfg)
    tx = optax.adam(cfg.lr)
    opt0 = tx.init(params0)
    dropout_key = jax.random.key(cfg.seed)
    per_epoch = ds.size // cfg.batch_size

    @jax.jit
    def train_step(params, opt_state, x, y, step):
        key = jax.random.fold_in(dropout_key, step)

        def loss_fn(p):
            logits = model.apply(graphdef, p, x, dropout_key=key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def train(steps: int) -> float:
        params, opt_state, loss = params0, opt0, None
        rng = np.random.default_rng(cfg.seed)
        for step in range(steps):
            pos = step % per_epoch
            if pos == 0:
                perm = rng.permutation(ds.size)
            idx = perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
            params, opt_state, loss = train_step(
                params, opt_state, ds.x[idx], ds.y[idx], np.uint32(step)
            )
        return float(loss)

    return train


def jpr_run(steps: int, *extra: str) -> dict:
    args = run_repro.build_parser().parse_args(["--steps", str(steps), *extra])
    return run_repro.run(args, out=lambda *a, **k: None)


def main(argv: list[str] | None = None) -> dict:
    p = c.parser(__doc__.split("\n")[0])
    p.add_argument("--trace", default="1,10,100", help="trace intervals K to measure")
    args = p.parse_args(argv)
    long, short = (450, 50) if args.quick else (2050, 50)
    n = long - short
    repeat = args.repeat or (1 if args.quick else 15)
    rep = c.Report("train_loop", args)
    cfg = RunConfig()
    base = hand_written(cfg)
    ks = [int(k) for k in args.trace.split(",") if k]
    if args.quick:
        ks = ks[:1]

    fns = {"baseline_long": lambda: base(long), "baseline_short": lambda: base(short)}
    for k in {*ks, long}:
        fns[f"jpr{k}_long"] = functools.partial(jpr_run, long, "--trace-every", str(k))
        fns[f"jpr{k}_short"] = functools.partial(jpr_run, short, "--trace-every", str(k))
    for fn in fns.values():  # compile everything once
        fn()
    t = c.interleaved(fns, repeat)

    def per_step(name: str) -> float:
        diff = c.best(t[f"{name}_long"]) - c.best(t[f"{name}_short"])
        return diff / n if diff > 0 else float("nan")  # nan: noise swamped a --quick run

    b = per_step("baseline")
    untraced = per_step(f"jpr{long}")
    rep.figure("steps", f"{long} - {short}")
    rep.figure("baseline_step_us", round(b * 1e6, 1), c.us(b))
    rep.figure("jpr_untraced_step_us", round(untraced * 1e6, 1), c.us(untraced))
    for k in ks:
        j = per_step(f"jpr{k}")
        rep.figure(f"jpr_trace{k}_step_us", round(j * 1e6, 1), c.us(j))
    first = 1 if 1 in ks else ks[0]
    rep.figure("jpr_run_short_s", round(c.best(t[f"jpr{first}_short"]), 3))
    default = per_step(f"jpr{first}")
    rep.ratio(
        "train_loop.per_step",
        default / b,
        target="<= 1.15x",
        met=default / b <= 1.15 if not args.quick else None,
        baseline=c.us(b),
        jpr=c.us(default),
        what="jpr run (defaults: trace every step) vs a hand-written jit loop, per step",
    )
    for k in ks:
        j = per_step(f"jpr{k}")
        rep.ratio(
            f"train_loop.trace_every_{k}",
            j / untraced,
            target="< 1.05x",
            met=j / untraced < 1.05 if not args.quick else None,
            baseline=c.us(untraced),
            jpr=c.us(j),
            what=f"--trace-every {k} vs one hash at the end, per step",
        )
    return rep.finish()


if __name__ == "__main__":
    main()
