"""Random numbers inside `jax.shard_map`: one key for every shard, or one per shard.

Run it from the repository root::

    python snippets/pitfalls/shard_map_keys.py

It simulates two CPU devices, which must be requested before JAX starts its
backend, so this is a script of its own rather than a block of the page. Every
value it prints is a random bit (a Bernoulli draw), so it is the same on any
machine.
"""

import os

# Before `import jax`: ask XLA for two simulated CPU devices.
flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=2"])
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

PER_SHARD = 8


def same_key(key):
    """Bad: every shard draws from the replicated key it was given."""
    return jax.random.bernoulli(key, 0.5, (PER_SHARD,)).astype(jnp.int32)


def own_key(key):
    """Good: each shard folds its index on the mesh axis into the key."""
    key = jax.random.fold_in(key, jax.lax.axis_index("data"))
    return jax.random.bernoulli(key, 0.5, (PER_SHARD,)).astype(jnp.int32)


def show(name: str, draws) -> None:
    rows = [" ".join(str(int(b)) for b in s.data) for s in draws.addressable_shards]
    print(f"{name:28} " + " | ".join(rows))


def main() -> None:
    mesh = jax.make_mesh((2,), ("data",))
    key = jax.random.key(0)
    print(f"devices: {jax.device_count()}, one shard of {PER_SHARD} draws each")
    bodies = (("same key in every shard:", same_key), ("fold_in(key, axis_index):", own_key))
    for name, body in bodies:
        sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P("data")))
        show(name, sharded(key))
    whole = jax.jit(lambda k: jax.random.bernoulli(k, 0.5, (2 * PER_SHARD,)).astype(jnp.int32),
                    out_shardings=NamedSharding(mesh, P("data")))(key)
    show("one global draw, sharded:", whole)
    alone = jax.random.bernoulli(key, 0.5, (2 * PER_SHARD,)).astype(jnp.int32)
    print(f"global draw == the same draw on one device: {bool((whole == alone).all())}")


if __name__ == "__main__":
    main()
