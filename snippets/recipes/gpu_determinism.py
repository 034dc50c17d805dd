"""GPU determinism settings: set them, print them, check that two runs agree.

    python snippets/recipes/gpu_determinism.py

On GPU, scatter-adds use atomics (their order varies run to run), XLA may
pick a matrix product's or a convolution's kernel that is not deterministic,
the autotuner may pick a different kernel per run or process, and
float32 matmuls may run in TF32 (Ampere and newer). The settings below remove
those sources. XLA:CPU is deterministic without them: on CPU the check
still runs, and the script says that the GPU flags changed nothing.
"""

import os

GPU_FLAGS = [
    "--xla_gpu_deterministic_ops=true",  # deterministic scatter, GEMM and convolution kernels
    "--xla_gpu_autotune_level=0",  # no timing-based kernel choice (or load saved results)
]
# XLA reads XLA_FLAGS once, when JAX starts its backend: set them before `import jax`.
kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
        if f.split("=")[0] not in {g.split("=")[0] for g in GPU_FLAGS}]
os.environ["XLA_FLAGS"] = " ".join([*kept, *GPU_FLAGS])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # full float32, no TF32


@jax.jit
def workload(key):
    """A matmul, a scatter-add (segment_sum) and a reduction: the usual suspects."""
    k1, k2, k3 = jax.random.split(key, 3)
    a, b = jax.random.normal(k1, (256, 256)), jax.random.normal(k2, (256, 256))
    ids = jax.random.randint(k3, (4096,), 0, 64)
    scattered = jax.ops.segment_sum(jnp.tile((a @ b).ravel()[:1024], 4), ids, 64)
    return scattered, jnp.sum(a * b, axis=0)


def run_twice(key) -> bool:
    first = jax.device_get(workload(key))
    jax.clear_caches()  # compile (and autotune) again, as a new process would
    second = jax.device_get(workload(key))
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True))


def main() -> None:
    backend = jax.default_backend()
    print(f"XLA_FLAGS: {os.environ['XLA_FLAGS']}")  # yours, with these flags in force
    print(f"jax_default_matmul_precision: {jax.config.jax_default_matmul_precision}")
    print(f"backend: {backend}")
    print(f"two runs, recompiled in between, identical: {run_twice(jax.random.key(0))}")
    if backend == "gpu":
        print("the GPU flags are in force for this process")
    else:
        print(f"on {backend} the GPU flags had no effect: XLA:{backend.upper()} "
              "is deterministic without them")


if __name__ == "__main__":
    main()
