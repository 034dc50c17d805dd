"""The cost of ``jpr.Tracer`` on every step of a user's own MNIST-sized CNN loop.

The loop is what a Flax NNX user writes (``nnx.split`` state, one ``jax.jit``
step, Optax Adam): a CNN on 28x28x1 images, batch 128 (conv 32 and conv 64,
3x3, each with 2x2 average pooling, then dense 256 and 10; about 0.8 M params,
3.3 MB), with dropout. Both sides run the same jitted step on the same batches
(staged on the device beforehand, so that data loading is not measured):

* baseline: the loop with no tracing, one host sync at the end;
* jpr: the same loop calling ``tracer.step(t + 1, model_state, loss=loss)``
  every step (a hash of every leaf of the model's state and the loss), and
  waiting for the last hash at the end.

The tracer hands each step's arrays to a worker thread, which waits for the
device and hashes while the loop dispatches the next step.

Target: tracing every step costs <= 5% (ratio <= 1.05x).

    python benchmarks/bench_trace.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import _common as c
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jpr


class CNN(nnx.Module):
    """A small MNIST CNN with dropout."""

    def __init__(self, *, width: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.fc1 = nnx.Linear(7 * 7 * 2 * width, 256, rngs=rngs)
        self.fc2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        x = self.drop(x.reshape(x.shape[0], -1))
        return self.fc2(nnx.relu(self.fc1(x)))


def make_loop(*, width: int, batch: int, batches: int):
    """``(init, run)``: ``run(state, steps, tracer)`` trains ``steps`` steps."""
    root = jpr.root_key(0)

    def build():
        rngs = nnx.Rngs(
            params=jpr.stream_key(root, "params"), dropout=jpr.stream_key(root, "dropout")
        )
        model = CNN(width=width, rngs=rngs)
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    model_def, opt_def = (nnx.graphdef(n) for n in build())

    @jax.jit
    def train_step(ms, os_, x, y):
        model, opt = nnx.merge(model_def, ms), nnx.merge(opt_def, os_)

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state(model), nnx.state(opt), loss

    gen = np.random.default_rng(0)
    xs = [jnp.asarray(gen.normal(size=(batch, 28, 28, 1)), jnp.float32) for _ in range(batches)]
    ys = [jnp.asarray(gen.integers(0, 10, size=batch)) for _ in range(batches)]

    def init():
        model, opt = build()
        return nnx.state(model), nnx.state(opt)

    def run(state, steps: int, tracer=None):
        ms, os_ = state
        for t in range(steps):
            ms, os_, loss = train_step(ms, os_, xs[t % batches], ys[t % batches])
            if tracer is not None:
                tracer.step(t + 1, ms, loss=loss)
        if tracer is not None:
            tracer.entries()  # every hash done
        jax.block_until_ready((ms, os_))
        return ms, os_

    return init, run


def main(argv: list[str] | None = None) -> dict:
    p = c.parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    width, batch, steps = (4, 8, 10) if args.quick else (32, 128, 60)
    repeat = args.repeat or (1 if args.quick else 7)
    rep = c.Report("trace", args)
    init, run = make_loop(width=width, batch=batch, batches=8)
    state = init()
    traced_entries = []

    def untraced():
        run(state, steps)

    def traced():
        tracer = jpr.Tracer()
        run(state, steps, tracer)
        traced_entries.append(len(tracer.entries()))
        tracer.shutdown()

    traced()
    untraced()  # compile, warm up
    t = c.interleaved({"baseline": untraced, "jpr": traced}, repeat)
    b, j = c.best(t["baseline"]) / steps, c.best(t["jpr"]) / steps
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state[0]) if hasattr(x, "nbytes"))
    rep.figure("steps", steps)
    rep.figure("traced_bytes_per_step", n_bytes, f"{n_bytes / 2**20:.2f} MiB")
    rep.figure("baseline_step_ms", round(b * 1e3, 3), c.ms(b))
    rep.figure("jpr_step_ms", round(j * 1e3, 3), c.ms(j))
    assert traced_entries[-1] == steps
    rep.ratio(
        "trace.every_step",
        j / b,
        target="<= 1.05x",
        met=j / b <= 1.05 if not args.quick else None,
        baseline=c.ms(b),
        jpr=c.ms(j),
        what="jpr.Tracer on every step of an MNIST-sized NNX CNN loop vs the same loop untraced",
    )
    return rep.finish()


if __name__ == "__main__":
    main()
