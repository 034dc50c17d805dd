"""What the CPU pin costs per training step (jpr.platform, jpr.portable).

The pin (XLA's cap at AVX2, platform-dependent math off, reductions in XLA's
loops, oneDNN capped at AVX2) can only cost anything on a host *above* the
target (AVX-512): there the kernels give up the wider vectors. jpr.portable
routes every product and convolution to YNNPACK's kernels, which agree on
every CPU; whether that costs or saves is what this measures. Each side runs
in its own process (XLA reads ``XLA_FLAGS`` once), alternating:

* baseline: ``JPR_CPU_TARGET=native`` and each step as written;
* jpr: the default pin and each step through ``jpr.portable`` (as jpr's own
  training step is); for the CNN also with ``convolutions=False``.

Three workloads, each the best of its repeats: jpr's MLP (``jpr run`` with its
defaults in-process, per-step cost = (time of N+50 steps - time of 50 steps) /
N, so start-up cancels), an MNIST-sized CNN step (28x28x1, two 3x3
convolutions, batch 128, Adam) and a matmul-heavy MLP (1024-wide, 3 layers,
batch 256, Adam). Target: pinned <= 1.05x native.

    python benchmarks/bench_cpu_target.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import json
import sys

import _common as c

CHILD = r"""
import json, os, sys, time
from jpr.platform import current_target, pin_cpu_target
pin_cpu_target()
import jax, jax.numpy as jnp, numpy as np, optax
import jpr
from jpr.run_repro import build_parser, run

PORTABLE = os.environ.get("JPR_CPU_TARGET") != "native"

def mlp(steps):
    t = time.perf_counter()
    run(build_parser().parse_args(["--steps", str(steps), "--trace-every", str(steps)]),
        out=lambda *a: None)
    return time.perf_counter() - t

def conv(h, w):
    return jax.lax.conv_general_dilated(
        h, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

def cnn_loss(p, x, y):
    h = jax.nn.relu(conv(jax.nn.relu(conv(x, p["c1"])), p["c2"]))
    logits = h.reshape(len(x), -1) @ p["w"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

def wide_loss(p, x, y):
    h = x
    for w in p["hidden"]:
        h = jax.nn.relu(h @ w)
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["out"], y).mean()

def loop(loss, params, x, y, convolutions=True):
    opt = optax.adam(1e-3)

    def step(p, s):
        g = jax.grad(loss)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(jpr.portable(step, convolutions=convolutions) if PORTABLE else step)

    def train(n):
        p, s = params, opt.init(params)
        t = time.perf_counter()
        for _ in range(n):
            p, s = step(p, s)
        jax.block_until_ready(p)
        return time.perf_counter() - t
    train(3)
    return train

ks = jax.random.split(jax.random.key(0), 8)
cnn_args = ({
    "c1": jax.random.normal(ks[0], (3, 3, 1, 16)) * 0.3,
    "c2": jax.random.normal(ks[1], (3, 3, 16, 32)) * 0.1,
    "w": jax.random.normal(ks[2], (7 * 7 * 32, 10)) * 0.02,
}, jax.random.normal(ks[3], (128, 28, 28, 1)), jnp.arange(128) % 10)
cnn = loop(cnn_loss, *cnn_args)
cnn_lib = loop(cnn_loss, *cnn_args, convolutions=False)
wide = loop(wide_loss, {
    "hidden": [jax.random.normal(ks[4], (784, 1024)) * 0.03,
               jax.random.normal(ks[5], (1024, 1024)) * 0.03,
               jax.random.normal(ks[6], (1024, 1024)) * 0.03],
    "out": jax.random.normal(ks[7], (1024, 10)) * 0.03,
}, jax.random.normal(ks[3], (256, 784)), jnp.arange(256) % 10)

steps, cnn_steps = int(sys.argv[1]), int(sys.argv[2])
mlp(50)  # compile and warm
per_mlp = (mlp(steps + 50) - mlp(50)) / steps
print(json.dumps({"mlp": per_mlp, "cnn": cnn(cnn_steps) / cnn_steps,
                  "cnn_lib": cnn_lib(cnn_steps) / cnn_steps,
                  "wide": wide(cnn_steps) / cnn_steps,
                  "target": current_target().describe()}))
"""

WORK = (
    ("mlp", "jpr run per step (MLP)"),
    ("cnn", "CNN step, 28x28, batch 128"),
    ("cnn_lib", "the same, convolutions left to the library (portable(step, convolutions=False))"),
    ("wide", "matmul-heavy MLP step, 1024 wide, batch 256"),
)


def main(argv: list[str] | None = None) -> dict:
    args = c.parser(__doc__.split("\n")[0]).parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)
    steps, cnn_steps = (200, 3) if args.quick else (2000, 40)
    report = c.Report("cpu_target", args)
    clean = {"XLA_FLAGS": None, "_JPR_PINNED_FLAGS": None, "ONEDNN_MAX_CPU_ISA": None}
    sides = {"native": c.child_env(**clean, JPR_CPU_TARGET="native"),
             "pinned": c.child_env(**clean, JPR_CPU_TARGET=None)}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(repeat):
        for name, env in sides.items():
            _, proc = c.run_child([sys.executable, "-c", CHILD, str(steps), str(cnn_steps)],
                                  env=env)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report.figure("host", runs["native"][0]["target"])
    report.figure("pinned", runs["pinned"][0]["target"])
    for work, what in WORK:
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
