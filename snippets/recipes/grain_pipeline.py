"""A seeded, process-sharded Grain pipeline whose position is saved with Orbax.

    python snippets/recipes/grain_pipeline.py [CHECKPOINT_DIR]

Each process reads its own shard (``jax.process_index()`` of
``jax.process_count()``), shuffled by a seed (a new order every epoch). The
iterator's state (a few integers: where it is) goes into the same Orbax
checkpoint as the model through Grain's checkpoint handler, and a restored
iterator continues at the exact next batch. Grain seeds epoch e with
seed + e, so seeds S and S + 1 share orders: give runs seeds far apart.
"""

import sys
import tempfile
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

N, BATCH, EPOCHS, SEED = 40, 4, 2, 1234


def pipeline(process_index: int, process_count: int, seed: int = SEED) -> grain.MapDataset:
    return (
        grain.MapDataset.range(N)
        # This process's shard, before anything random. (With grain.DataLoader and an
        # IndexSampler: shard_options=grain.sharding.ShardByJaxProcess().)
        [process_index::process_count]
        .shuffle(seed=seed)  # deterministic; epoch e is shuffled with seed + e
        .repeat(EPOCHS)
        .map(lambda i: {"x": np.full(3, i, np.float32), "index": i})  # load example i
        .batch(BATCH, drop_remainder=True)
    )


def batches(iterator, n: int) -> list[list[int]]:
    return [next(iterator)["index"].tolist() for _ in range(n)]


def flat(batch_list) -> list[int]:
    return [i for batch in batch_list for i in batch]


def main(directory: Path) -> None:
    shard = pipeline(jax.process_index(), jax.process_count())
    print(f"process {jax.process_index()} of {jax.process_count()}: {len(shard)} batches")
    uninterrupted = batches(iter(shard.to_iter_dataset()), len(shard))

    it = iter(shard.to_iter_dataset())
    before = batches(it, 7)  # train 7 steps, then save (the model's state would go in too)
    with ocp.CheckpointManager(directory.absolute() / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        # As a new process would: build the pipeline again, then restore its position.
        fresh = iter(pipeline(jax.process_index(), jax.process_count()).to_iter_dataset())
        restored = mngr.restore(7, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
    after = batches(restored, len(shard) - 7)
    print(f"saved after batch 7, next batch after restore: {after[0]}")
    print(f"resumed == uninterrupted: {before + after == uninterrupted}")

    two = [flat(batches(iter(pipeline(p, 2).to_iter_dataset()), 5)) for p in (0, 1)]
    print(f"2 processes read disjoint shards: {not set(two[0]) & set(two[1])}")
    epoch = len(shard) // EPOCHS
    first, second = flat(uninterrupted[:epoch]), flat(uninterrupted[epoch:])
    print(f"epoch 2 is a new order of the same examples: "
          f"{first != second and sorted(first) == sorted(second)}")
    # Grain 0.2.18 seeds epoch e with seed + e: seeds S and S + 1 share orders.
    next_seed = pipeline(jax.process_index(), jax.process_count(), seed=SEED + 1)
    next_first = flat(batches(iter(next_seed.to_iter_dataset()), epoch))
    print(f"seed {SEED}'s epoch 2 == seed {SEED + 1}'s epoch 1: {second == next_first}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:  # deleted afterwards
            main(Path(tmp))
