"""Multi-host: which keys must agree across processes, and which must differ.

    python snippets/recipes/multihost_seeds.py                 # one process
    python snippets/recipes/multihost_seeds.py HOST:PORT N I   # process I of N

- The seed must be the same everywhere: process 0 picks it and
  `broadcast_one_to_all` hands it to the others (a seed from the clock or
  os.urandom on each host would differ).
- Init and dropout keys of replicated params come from that seed alone.
- Only per-host quantities (this host's slice of the data) fold in
  `jax.process_index()`; `make_array_from_process_local_data` assembles them.
"""

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

if len(sys.argv) == 4:  # on a cluster, jax.distributed.initialize() finds these itself
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only
    jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

PER_PROCESS = 4  # rows of the global batch that each process loads


def agreed_seed() -> int:
    mine = int.from_bytes(os.urandom(4), "little")  # differs on every host...
    return int(multihost_utils.broadcast_one_to_all(np.uint32(mine)))  # ...process 0's wins


def same_on_all_processes(x) -> bool:
    everyone = multihost_utils.process_allgather(np.asarray(x))  # shape (processes, ...)
    return all(np.array_equal(everyone[0], e) for e in everyone)


def main() -> None:
    pid, count = jax.process_index(), jax.process_count()
    seed = agreed_seed()
    root = jax.random.key(seed)
    init_key, data_root = jax.random.split(root)  # the same on every process
    local_data_key = jax.random.fold_in(data_root, pid)  # per host: its own rows

    local = np.asarray(jax.random.normal(local_data_key, (PER_PROCESS, 3)))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    mine = np.concatenate([np.asarray(s.data) for s in batch.addressable_shards])

    say = f"process {pid} of {count}:"
    print(f"{say} the seed is the same on all processes: {same_on_all_processes(seed)}")
    key_bits = jax.random.key_data(init_key)
    print(f"{say} the init key is the same on all processes: {same_on_all_processes(key_bits)}")
    data_keys = multihost_utils.process_allgather(jax.random.key_data(local_data_key))
    distinct = len({tuple(k) for k in np.asarray(data_keys).reshape(count, -1)}) == count
    print(f"{say} the data keys differ between processes: {distinct}")
    print(f"{say} global batch {batch.shape}, this process holds its own rows: "
          f"{np.array_equal(mine, local)}")


if __name__ == "__main__":
    main()
