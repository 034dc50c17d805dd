"""Draw from a set of `jax.random` samplers and save the arrays, to compare CPU targets.

Run it from the repository root, once per target, and compare the files::

    python snippets/pitfalls/samplers.py pinned.npz
    XLA_FLAGS=--xla_cpu_max_isa=AVX python snippets/pitfalls/samplers.py avx.npz

A second argument draws that many values of each instead of a million.

The script pins jpr's CPU target first (a ``--xla_cpu_max_isa`` in ``XLA_FLAGS``
wins), so the two runs differ only in XLA's instruction set: with or without
fused multiply-adds. The Same seed, different hardware page compares them.
"""

from __future__ import annotations

import sys

N = 1_000_000


def draws(n: int = N) -> dict:
    from jpr.platform import pin_cpu_target

    pin_cpu_target()

    import jax
    import jax.numpy as jnp
    import numpy as np

    key = jax.random.key(0)
    p = jax.nn.softmax(jax.random.normal(jax.random.key(2), (1000,)))
    out = {
        "uniform [0, 1)": jax.random.uniform(key, (n,)),
        "uniform [-0.3, 0.45)": jax.random.uniform(key, (n,), minval=-0.3, maxval=0.45),
        "bernoulli(0.3)": jax.random.bernoulli(key, 0.3, (n,)),
        "normal": jax.random.normal(key, (n,)),
        "truncated_normal(-2, 2)": jax.random.truncated_normal(key, -2.0, 2.0, (n,)),
        "gamma(0.3)": jax.random.gamma(key, 0.3, (n,)),
        "gamma(5)": jax.random.gamma(key, 5.0, (n,)),
        "beta(0.5, 0.5)": jax.random.beta(key, 0.5, 0.5, (n,)),
        "choice(1000, p=p)": jax.random.choice(key, 1000, (n,), p=p),
        "categorical(100 logits)": jax.random.categorical(
            key, jax.random.normal(jax.random.key(1), (n // 10, 100))),
    }
    return {name: np.asarray(jnp.asarray(v)) for name, v in out.items()}


def main() -> None:
    import numpy as np

    arrays = draws(int(sys.argv[2]) if len(sys.argv) > 2 else N)
    np.savez(sys.argv[1], **arrays)
    print(f"{len(arrays)} samplers, saved to {sys.argv[1]}")


if __name__ == "__main__":
    main()
