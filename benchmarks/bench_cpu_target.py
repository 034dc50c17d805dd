"""What the CPU pin costs per training step (jpr.platform, jpr.portable).

The pin (XLA's cap at AVX2, platform-dependent math off, reductions in XLA's
loops, oneDNN capped at AVX2) can only cost anything on a host *above* the
target (AVX-512): there the kernels give up the wider vectors. jpr.portable
routes every product and convolution to YNNPACK's kernels, which agree on
every CPU; whether that costs or saves is what this measures.

Both sides run in one process, alternating step for step (this host's noise
swamped the difference between two processes: the same program measured
1.0x to 1.5x across process pairs):

* baseline: the step as written, compiled for this host (the process runs
  with ``JPR_CPU_TARGET=native``);
* jpr: the step through ``jpr.portable`` (as jpr's own step is), compiled
  with the pin's XLA settings as compile options. XLA reads ``XLA_FLAGS``
  once per process, but a compile option sets the same field for one
  program. oneDNN's cap is an environment variable, read once: these
  programs never reach oneDNN (checked: no library product, no
  convolution), so it does not matter to them. A second process under the
  real pin (the environment, no options) computes the same steps, and the
  results must be equal bit for bit, or the script stops.

Three workloads: jpr's MLP (the chunk of 100 steps that ``jpr run``
compiles), an MNIST-sized CNN step (28x28x1, two 3x3 convolutions of stride
2, batch 128, Adam) and a matmul-heavy MLP (1024-wide, 3 layers, batch 256,
Adam); each time is the median over the rounds, per step, and each ratio
the median of the rounds' ratios (pinned over the native time measured next
to it). The CNN with its
convolutions left to the library (``portable(step, convolutions=False)``,
the ``cnn_lib`` row) needs oneDNN's cap, so it is timed in the pinned
process, against the baseline of the first: a ratio across two processes.
Target: pinned <= 1.05x native.

    python benchmarks/bench_cpu_target.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import json
import statistics
import sys

import _common as c

CHILD = r"""
import json, platform, sys, time
from jpr.platform import PIN as PIN_SETTINGS, current_target, pin_cpu_target
pin_cpu_target()
import jax, jax.numpy as jnp, numpy as np, optax
import jpr
from jpr.config import RunConfig
from jpr.data import get_batches, make_dataset
from jpr.portability import library_dots
from jpr.rng import root_key
from jpr.train import init_state, make_mesh, make_train_chunk

MODE, ROUNDS, STEPS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# The pin's XLA settings (jpr.platform.PIN) as compile options of one program.
# An option takes a value, not XLA_FLAGS' syntax: "false" is False, and
# "-reduce" (take reductions out of the default list) is the enum list [DOT].
OPTION = {"false": False, "true": True, "-reduce": "LIBRARY_FUSION_TYPE_DOT"}
PIN = {s.name.removeprefix("--"): OPTION.get(s.value, s.value)
       for s in PIN_SETTINGS[platform.machine()] if s.is_flag}

def compiled(fn, args, options, *, rewritten):
    exe = jax.jit(fn).lower(*args).compile(compiler_options=options)
    if rewritten:  # so oneDNN's cap, which options cannot set, cannot matter
        assert "convolution(" not in exe.as_text() and not library_dots(fn, *args), fn
    return exe

def mlp():
    cfg = RunConfig(seed=0)
    graphdef, s = init_state(cfg)
    chunk = make_train_chunk(cfg, graphdef, mesh=make_mesh(jax.devices()[:1]), width=100)
    xs, ys = get_batches(0, 100, ds=make_dataset(cfg), batch_size=cfg.batch_size, pad_to=100)
    args = (s.params, s.opt_state, root_key(0), jnp.asarray(xs), jnp.asarray(ys),
            np.arange(100, dtype=np.uint32), 100)
    low = chunk.lower(*args)
    def side(options):
        exe = low.compile(compiler_options=options)
        return (lambda carry: exe(*carry, *args[2:])[:2]), 100
    return side, (s.params, s.opt_state)

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

def adam(loss, params, x, y, **portable):
    opt = optax.adam(1e-3)
    def step(carry):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s
    carry = (params, opt.init(params))
    def side(options):
        fn = step if options is None and not portable else jpr.portable(step, **portable)
        exe = compiled(fn, (carry,), options, rewritten=fn is not step and not portable)
        return (lambda carry: exe(carry)), 1
    return side, carry

ks = jax.random.split(jax.random.key(0), 8)
cnn_args = ({
    "c1": jax.random.normal(ks[0], (3, 3, 1, 16)) * 0.3,
    "c2": jax.random.normal(ks[1], (3, 3, 16, 32)) * 0.1,
    "w": jax.random.normal(ks[2], (7 * 7 * 32, 10)) * 0.02,
}, jax.random.normal(ks[3], (128, 28, 28, 1)), jnp.arange(128) % 10)
wide_args = ({
    "hidden": [jax.random.normal(ks[4], (784, 1024)) * 0.03,
               jax.random.normal(ks[5], (1024, 1024)) * 0.03,
               jax.random.normal(ks[6], (1024, 1024)) * 0.03],
    "out": jax.random.normal(ks[7], (1024, 10)) * 0.03,
}, jax.random.normal(ks[3], (256, 784)), jnp.arange(256) % 10)
WORK = {"mlp": mlp, "cnn": lambda: adam(cnn_loss, *cnn_args),
        "wide": lambda: adam(wide_loss, *wide_args)}

def run(step, carry, n):
    for _ in range(n):
        carry = step(carry)
    return jax.block_until_ready(carry)

def timed(step, carry, n, per_call):
    t = time.perf_counter()
    run(step, carry, n)
    return (time.perf_counter() - t) / (n * per_call)

out = {"target": current_target().describe(), "digest": {}, "native": {}, "pinned": {}}
if MODE == "pinned":  # under the real pin: the steps' bits, and cnn_lib's time
    for name, make in WORK.items():
        side, carry = make()
        step, _ = side({})
        out["digest"][name] = jpr.hash_pytree(run(step, carry, 3))
    side, carry = adam(cnn_loss, *cnn_args, convolutions=False)
    step, per = side({})
    run(step, carry, 2)
    out["pinned"]["cnn_lib"] = [timed(step, carry, STEPS, per) for _ in range(ROUNDS)]
else:  # JPR_CPU_TARGET=native: both sides, alternating
    for name, make in WORK.items():
        side, carry = make()
        sides = {"native": side(None), "pinned": side(PIN)}
        out["digest"][name] = jpr.hash_pytree(run(sides["pinned"][0], carry, 3))
        for k, (step, per) in sides.items():
            run(step, carry, 2)
            out[k][name] = []
        for r in range(ROUNDS):
            for k in (("native", "pinned") if r % 2 else ("pinned", "native")):
                step, per = sides[k]
                out[k][name].append(timed(step, carry, STEPS, per))
print(json.dumps(out))
"""

WORK = (
    ("mlp", "jpr's training step (MLP), in its chunk of 100"),
    ("cnn", "CNN step, 28x28, batch 128"),
    ("cnn_lib", "the same, convolutions left to the library (portable(step, convolutions=False)),"
                " across two processes"),
    ("wide", "matmul-heavy MLP step, 1024 wide, batch 256"),
)


def _child(mode: str, rounds: int, steps: int) -> dict:
    clean = {"XLA_FLAGS": None, "_JPR_PINNED_FLAGS": None, "ONEDNN_MAX_CPU_ISA": None,
             "JPR_COMPILATION_CACHE": "0"}
    env = c.child_env(**clean, JPR_CPU_TARGET="native" if mode == "native" else None)
    _, proc = c.run_child([sys.executable, "-c", CHILD, mode, str(rounds), str(steps)], env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"bench_cpu_target: the {mode} process exited with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = c.parser(__doc__.split("\n")[0]).parse_args(argv)
    rounds = args.repeat or (2 if args.quick else 60)
    steps = 1 if args.quick else 5
    report = c.Report("cpu_target", args)
    native, pinned = _child("native", rounds, steps), _child("pinned", rounds, steps)
    if native["digest"] != pinned["digest"]:
        raise SystemExit("bench_cpu_target: the compile options did not compile what the pin "
                         f"compiles: {native['digest']} != {pinned['digest']}")
    report.figure("host", native["target"])
    report.figure("pinned", pinned["target"])
    native["native"]["cnn_lib"] = native["native"]["cnn"]
    native["pinned"]["cnn_lib"] = pinned["pinned"]["cnn_lib"]
    for work, what in WORK:
        base = statistics.median(native["native"][work])
        ours = statistics.median(native["pinned"][work])
        report.figure(f"{work}_native_s", base, c.us(base))
        report.figure(f"{work}_pinned_s", ours, c.us(ours))
        # each round's pinned time over the native one next to it, the median
        ratio = statistics.median(
            p / n for p, n in zip(native["pinned"][work], native["native"][work], strict=True))
        report.ratio(f"cpu_target.{work}", ratio, target="<= 1.05x",
                     met=None if args.quick else ratio <= 1.05, baseline=c.us(base),
                     jpr=c.us(ours), what=what)
    return report.finish()


if __name__ == "__main__":
    main()
