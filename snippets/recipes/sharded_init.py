"""Initialise sharded parameters: each device makes its shard, same bits as unsharded.

    python snippets/recipes/sharded_init.py

`jax.jit(init, out_shardings=...)` lets every device generate only its own
slice of each parameter, with no gather and no host copy, and the values do
not depend on the sharding: the same key gives the same bits on 1 device or
on a 2 x 2 mesh. (`jax_threefry_partitionable`, on by default in current JAX,
is what lets each device draw just its slice; flipping it changes every
random number, so keep it fixed.) The demo simulates 4 CPU devices; in your
project, build the mesh from your own devices.
"""

import jax

# Before JAX starts its backend (the first computation): 4 simulated CPU devices.
# (Beats XLA_FLAGS=--xla_force_host_platform_device_count, which must be set before import.)
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")  # the demo's devices; drop this on GPU/TPU

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

init_w = jax.nn.initializers.lecun_normal()


def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k1, (64, 32)) * 0.02,
        "dense": {"w": init_w(k2, (32, 128)), "b": jax.random.uniform(k3, (128,))},
    }


def main() -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    specs = {"embed": P("data", "model"), "dense": {"w": P(None, "model"), "b": P("model")}}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    key = jax.random.key(0)

    unsharded = jax.jit(init)(key)  # one device makes everything
    sharded = jax.jit(init, out_shardings=shardings)(key)  # each device its shards

    print(f"devices: {jax.device_count()}, mesh: {dict(mesh.shape)}")
    print(f"jax_threefry_partitionable: {jax.config.jax_threefry_partitionable}")
    for path, leaf in jax.tree_util.tree_flatten_with_path(sharded)[0]:
        shard = leaf.addressable_shards[0].data.shape
        print(f"{jax.tree_util.keystr(path):18} {leaf.shape} -> shards {shard}")
    same = all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(unsharded), strict=True)
    )
    print(f"sharded init == unsharded init, every leaf: {same}")


if __name__ == "__main__":
    main()
