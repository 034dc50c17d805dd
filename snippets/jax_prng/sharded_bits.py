"""Sharded random numbers are the same bits as unsharded ones.

Run it from the repository root::

    python snippets/jax_prng/sharded_bits.py

It simulates four CPU devices, which must be requested before JAX starts its
backend, so this is a script of its own rather than a block of the page.
"""

import os

# Before `import jax`: ask XLA for four simulated CPU devices.
flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=4"])
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jpr.hashing import hash_pytree  # noqa: E402

SHAPE = (8, 1024)


def draw(key):
    return jax.random.normal(key, SHAPE)


def main() -> None:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))  # each device holds 2 of the 8 rows
    key = jax.random.key(0)
    print(f"devices: {jax.device_count()}")
    for partitionable in (True, False):
        with jax.threefry_partitionable(partitionable):
            whole = jax.jit(draw)(key)  # one device makes all 8 rows
            split = jax.jit(draw, out_shardings=rows)(key)  # four devices, 2 rows each
            shards = [s.data.shape for s in split.addressable_shards]
            same = hash_pytree(whole) == hash_pytree(split)
            print(f"jax_threefry_partitionable={partitionable}:")
            print(f"  one device   {hash_pytree(whole)[:16]}")
            print(f"  4 devices    {hash_pytree(split)[:16]}  shards {shards[0]} x {len(shards)}")
            print(f"  same bits:   {same}")


if __name__ == "__main__":
    main()
