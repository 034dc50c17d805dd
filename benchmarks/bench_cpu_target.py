"""What pinning the CPU target costs per training step (jpr.platform).

The pin (``--xla_cpu_max_isa=AVX2`` on x86-64) can only cost anything on a host
*above* the target (AVX-512): there XLA gives up the wider vectors. Each side
runs in its own process (XLA reads ``XLA_FLAGS`` once), alternating, and times
``jpr run`` with its defaults in-process: per-step cost = (time of 2050 steps -
time of 50 steps) / 2000, so start-up cancels. Two workloads: jpr's MLP and an
MNIST-sized CNN step (28x28x1, two 3x3 convolutions, batch 128, Adam).

* baseline: ``JPR_CPU_TARGET=native`` (XLA targets the host as it is);
* jpr: the default pin.

Target: pinned <= 1.05x native. On a host at the target (AVX2 + FMA) both
sides compile the same code and the figure says only that the pin is free.

    python benchmarks/bench_cpu_target.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import json
import sys

import _common as c

CHILD = r"""
import json, sys, time
from jpr.platform import current_target, pin_cpu_target
pin_cpu_target()
import jax, jax.numpy as jnp, numpy as np, optax
from jpr.run_repro import build_parser, run

def mlp(steps):
    t = time.perf_counter()
    run(build_parser().parse_args(["--steps", str(steps), "--trace-every", str(steps)]),
        out=lambda *a: None)
    return time.perf_counter() - t

def cnn_loop():
    k = jax.random.key(0)
    ks = jax.random.split(k, 4)
    params = {
        "c1": jax.random.normal(ks[0], (3, 3, 1, 16)) * 0.3,
        "c2": jax.random.normal(ks[1], (3, 3, 16, 32)) * 0.1,
        "w": jax.random.normal(ks[2], (7 * 7 * 32, 10)) * 0.02,
    }
    opt = optax.adam(1e-3)
    state = opt.init(params)
    x = jax.random.normal(ks[3], (128, 28, 28, 1))
    y = jnp.arange(128) % 10

    def loss(p, x, y):
        conv = lambda h, w: jax.lax.conv_general_dilated(
            h, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(conv(jax.nn.relu(conv(x, p["c1"])), p["c2"]))
        logits = h.reshape(len(x), -1) @ p["w"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    def train(n):
        p, s = params, state
        t = time.perf_counter()
        for _ in range(n):
            p, s = step(p, s)
        jax.block_until_ready(p)
        return time.perf_counter() - t
    train(3)
    return train

steps, cnn_steps = int(sys.argv[1]), int(sys.argv[2])
mlp(50)  # compile and warm
per_mlp = (mlp(steps + 50) - mlp(50)) / steps
train = cnn_loop()
per_cnn = train(cnn_steps) / cnn_steps
print(json.dumps({"mlp": per_mlp, "cnn": per_cnn, "target": current_target().describe()}))
"""


def main(argv: list[str] | None = None) -> dict:
    args = c.parser(__doc__.split("\n")[0]).parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)
    steps, cnn_steps = (200, 3) if args.quick else (2000, 40)
    report = c.Report("cpu_target", args)
    sides = {"native": c.child_env(JPR_CPU_TARGET="native", XLA_FLAGS=None),
             "pinned": c.child_env(XLA_FLAGS=None, _JPR_PINNED_FLAGS=None)}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(repeat):
        for name, env in sides.items():
            _, proc = c.run_child([sys.executable, "-c", CHILD, str(steps), str(cnn_steps)],
                                  env=env)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report.figure("host", runs["native"][0]["target"])
    report.figure("pinned", runs["pinned"][0]["target"])
    for work, what in (("mlp", "jpr run per step (MLP)"), ("cnn", "CNN step, 28x28, batch 128")):
        native = c.best([r[work] for r in runs["native"]])
        pinned = c.best([r[work] for r in runs["pinned"]])
        report.figure(f"{work}_native_s", native, c.us(native))
        report.figure(f"{work}_pinned_s", pinned, c.us(pinned))
        ratio = pinned / native
        report.ratio(f"cpu_target.{work}", ratio, target="<= 1.05x",
                     met=None if args.quick else ratio <= 1.05, baseline=c.us(native),
                     jpr=c.us(pinned), what=what)
    return report.finish()


if __name__ == "__main__":
    main()
