"""The cost of ``jpr.Tracer`` on every step of a user's own MNIST-sized CNN loops.

Two loops, each timed untraced and traced in the same process, interleaved
(``--repeat`` rounds, 15 by default, in alternating order; the ratio is the
median of the rounds' traced/untraced ratios):

* **tutorial**: the Flax NNX MNIST tutorial's loop as its readers write it
  (``@nnx.jit def train_step(model, optimizer, metrics, rngs, batch)``
  updating everything in place, a loose ``nnx.Rngs`` for dropout, BatchNorm,
  ``nnx.MultiMetric``, AdamW), batch 32 of 28x28x1 images: a step of about
  13 ms on the host the issue was measured on (30-40 ms on this one). Traced
  as own-loop.md teaches: ``tracer.step(t + 1, {"model": model, "rngs": rngs},
  loss=loss)`` (the live objects: the model's params and batch statistics and
  the dropout count, about 0.8 M values; the tracer takes their arrays at the
  call).
* **functional**: the ``nnx.split`` style (one ``jax.jit`` step returning new
  states), conv 32/64 with average pooling, dense 256 and 10, Adam, batch 128;
  traced with ``tracer.step(t + 1, model_state, loss=loss)``.

Batches are staged on the device beforehand, so data loading is not measured.
The tracer takes the leaves at the call and digests them (XXH3-128) on one
worker thread while the loop dispatches the next step.

Target: tracing every step costs <= 2% (ratio <= 1.02x) on both.

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


class TutorialCNN(nnx.Module):
    """The Flax NNX MNIST tutorial's CNN (BatchNorm, dropout with a loose ``nnx.Rngs``)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        pool = lambda y: nnx.avg_pool(y, window_shape=(2, 2), strides=(2, 2))  # noqa: E731
        x = pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
        return self.linear2(x)


def make_tutorial_loop(*, batch: int, batches: int):
    """``run(steps, tracer)``: the tutorial's in-place loop on fresh objects."""

    def loss_fn(model, rngs, batch):
        logits = model(batch["image"], rngs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, logits

    @nnx.jit
    def train_step(model, optimizer, metrics, rngs, batch):
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(model, rngs, batch)
        metrics.update(loss=loss, logits=logits, labels=batch["label"])
        optimizer.update(model, grads)
        return loss

    gen = np.random.default_rng(0)
    data = [
        {"image": jnp.asarray(gen.normal(size=(batch, 28, 28, 1)), jnp.float32),
         "label": jnp.asarray(gen.integers(0, 10, size=batch), jnp.int32)}
        for _ in range(batches)
    ]
    model = TutorialCNN(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(0.005, 0.9), wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
    rngs = nnx.Rngs(0)

    def run(steps: int, tracer=None):
        for t in range(steps):
            loss = train_step(model, optimizer, metrics, rngs, data[t % batches])
            if tracer is not None:
                tracer.step(t + 1, {"model": model, "rngs": rngs}, loss=loss)
        if tracer is not None:
            tracer.entries()  # every digest done
        jax.block_until_ready(nnx.state(model))

    return run, model, rngs


def _measure(rep: c.Report, name: str, run, *, steps: int, repeat: int, quick: bool, what: str):
    """Time ``run(steps)`` untraced and traced in adjacent pairs; report the median pair ratio.

    Each round times both, in alternating order; the ratio of a round is the
    traced time over the untraced one next to it, so a machine that drifts
    (a noisy neighbour, the clock) slows both sides of a pair alike. The
    figure is the median of the rounds' ratios, with their quartiles.
    """
    counts = []

    def traced():
        tracer = jpr.Tracer()
        run(steps, tracer)
        counts.append(len(tracer.entries()))
        tracer.shutdown()

    traced()
    run(steps)  # compile, warm up
    t = c.interleaved({"baseline": lambda: run(steps), "jpr": traced}, repeat, alternate=True)
    ratios = sorted(j / b for b, j in zip(t["baseline"], t["jpr"], strict=True))
    b, j = c.median(t["baseline"]) / steps, c.median(t["jpr"]) / steps
    ratio = c.median(ratios)
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    assert counts[-1] == steps
    rep.figure(f"{name}_baseline_step_ms", round(b * 1e3, 3), c.ms(b))
    rep.figure(f"{name}_jpr_step_ms", round(j * 1e3, 3), c.ms(j))
    rep.figure(f"{name}_pair_ratio_quartiles", [round(q1, 3), round(q3, 3)],
               f"{q1:.3f}x to {q3:.3f}x over {len(ratios)} rounds")
    rep.ratio(
        f"trace.{name}", ratio, target="<= 1.02x", met=ratio <= 1.02 if not quick else None,
        baseline=c.ms(b), jpr=c.ms(j), what=what,
    )


def main(argv: list[str] | None = None) -> dict:
    p = c.parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    quick = args.quick
    steps = 10 if quick else 40
    repeat = args.repeat or (1 if quick else 15)
    rep = c.Report("trace", args)
    rep.figure("steps", steps)
    run, model, rngs = make_tutorial_loop(batch=8 if quick else 32, batches=8)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state({"model": model, "rngs": rngs})))
    rep.figure("tutorial_traced_bytes", n_bytes, f"{n_bytes / 2**20:.2f} MiB")
    _measure(rep, "tutorial", run, steps=steps, repeat=repeat, quick=quick,
             what="jpr.Tracer on every step of the Flax NNX MNIST tutorial's in-place loop")
    width, batch = (4, 8) if quick else (32, 128)
    init, run_f = make_loop(width=width, batch=batch, batches=8)
    state = init()
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state[0]) if hasattr(x, "nbytes"))
    rep.figure("functional_traced_bytes", n_bytes, f"{n_bytes / 2**20:.2f} MiB")
    _measure(rep, "functional", lambda n, tracer=None: run_f(state, n, tracer), steps=steps,
             repeat=repeat, quick=quick,
             what="jpr.Tracer on every step of an MNIST-sized functional NNX CNN loop")
    return rep.finish()


if __name__ == "__main__":
    main()
