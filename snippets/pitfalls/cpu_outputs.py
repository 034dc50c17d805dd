"""Print a set of this site's outputs on this platform, as JSON (16 hex digits each).

Which printed values hold across CPU targets and architectures? Run this under
each target and compare the files (the pitfalls page, "Same seed, different
CPU", does it for two x86-64 targets)::

    python snippets/pitfalls/cpu_outputs.py > pinned.json
    XLA_FLAGS=--xla_cpu_max_isa=AVX python snippets/pitfalls/cpu_outputs.py > avx.json

``--quick`` leaves out the 50-step ``jpr run``. The script pins jpr's CPU target
first, as every training script should (a ``--xla_cpu_max_isa`` in
``XLA_FLAGS`` wins; ``JPR_CPU_TARGET=native`` turns the pin off).
"""

from __future__ import annotations

import json
import sys
import time


def outputs(*, quick: bool = False) -> dict[str, str]:
    from jpr.platform import pin_cpu_target

    pin_cpu_target()

    import jax
    import jax.numpy as jnp

    from jpr import data, hashing, platform, rng, train
    from jpr.config import RunConfig

    h = lambda x: hashing.hash_pytree(x)[:16]  # noqa: E731
    k = jax.random.key(0)
    out = {
        "PRNG bits (canary: bits, split, fold_in)": h(
            [jax.random.bits(k, (1024,), jnp.uint32), jax.random.split(k, 4),
             jax.random.fold_in(k, 7)]
        ),
        "uniform f32 (canary)": h(jax.random.uniform(jax.random.key(2), (256,))),
        "randint, permutation (canary)": h(
            [jax.random.randint(jax.random.key(3), (256,), 0, 1000),
             jax.random.permutation(jax.random.key(4), 64)]
        ),
        "normal f32 (canary)": h(jax.random.normal(jax.random.key(1), (256,))),
        "normal bf16 (canary)": h(jax.random.normal(jax.random.key(1), (256,), jnp.bfloat16)),
        "data batch of step 7 (integer labels, f32 features)": "",
    }
    cfg = RunConfig()
    ds = data.make_dataset(cfg)
    x, y = data.get_batch(7, ds=ds, batch_size=cfg.batch_size)
    out["data batch of step 7 (integer labels, f32 features)"] = h([x, y])
    a = jax.random.normal(jax.random.key(1), (128, 64))
    b = jax.random.normal(jax.random.key(2), (64, 32))
    out["matmul 128x64 . 64x32"] = h(jax.jit(jnp.matmul)(a, b))
    out["tanh, exp"] = h(jax.jit(lambda v: (jnp.tanh(v), jnp.exp(v)))(a))
    out["sum of 8192 floats"] = h(jax.jit(jnp.sum)(jax.random.normal(k, (8192,))))
    mesh = train.make_mesh(jax.devices()[:1])
    graphdef, state = train.init_state(cfg, mesh=mesh)  # placed as the step returns it
    out["MLP init params"] = h(state.params)
    root = rng.root_key(cfg.seed)
    step_fn = train.make_train_step(cfg, graphdef, mesh=mesh)
    for step in range(10):
        x, y = data.get_batch(step, ds=ds, batch_size=cfg.batch_size)
        state.params, state.opt_state, _ = step_fn(state.params, state.opt_state, root, x, y, step)
        state.step = step + 1
    out["10 training steps (home page, library)"] = h(train.state_tree(state, root))
    if not quick:
        from jpr.run_repro import build_parser, run

        args = build_parser().parse_args(["--steps", "50", "--seed", "0"])
        out["jpr run --steps 50 --seed 0"] = run(args, out=lambda *a: None)["hash"][:16]
    out["probe (jpr.platform.probe)"] = platform.probe()
    out["target"] = platform.current_target().describe()
    return out


if __name__ == "__main__":
    t0 = time.time()
    result = outputs(quick="--quick" in sys.argv)
    result["seconds"] = f"{time.time() - t0:.0f}"
    json.dump(result, sys.stdout, indent=1)
    print()
