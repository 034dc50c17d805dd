"""Stateless epoch shuffling: the batch of any step, computed without iterating.

    python snippets/recipes/stateless_shuffle.py

Epoch e's order is ``permutation(fold_in(key, e), n)``: a pure function of
(seed, epoch), so step t's batch is a pure function of (seed, t). Resuming at
step t needs only t — no iterator state, no replaying earlier epochs (an O(1)
seek, up to the cost of one permutation).
"""

import jax
import numpy as np

N, BATCH = 50, 8  # 50 examples; the last partial batch of an epoch is dropped
STEPS_PER_EPOCH = N // BATCH
DATA = np.arange(N * 3, dtype=np.float32).reshape(N, 3)  # your in-memory dataset


def epoch_order(key, epoch: int) -> np.ndarray:
    """The order of the examples in `epoch`, the same in every process and run."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), N))


def batch_indices(key, step: int) -> np.ndarray:
    """Indices of the batch of global step `step`: O(1) in the number of steps before."""
    epoch, i = divmod(step, STEPS_PER_EPOCH)
    return epoch_order(key, epoch)[i * BATCH : (i + 1) * BATCH]


def iterate(key, epochs: int):
    """What a training loop would do: walk the epochs in order."""
    for epoch in range(epochs):
        order = epoch_order(key, epoch)
        for i in range(STEPS_PER_EPOCH):
            yield order[i * BATCH : (i + 1) * BATCH]


def main() -> None:
    key = jax.random.key(0)
    walked = list(iterate(key, epochs=3))
    seeked = [batch_indices(key, t) for t in range(len(walked))]
    print(f"steps per epoch: {STEPS_PER_EPOCH}, steps: {len(walked)}")
    print(f"seek(t) == t-th batch of the loop, every t: "
          f"{all(np.array_equal(a, b) for a, b in zip(walked, seeked, strict=True))}")
    print(f"step 13's batch: {batch_indices(key, 13).tolist()}")
    e0, e1 = epoch_order(key, 0), epoch_order(key, 1)
    print(f"epochs are different orders: {not np.array_equal(e0, e1)}")
    print(f"each epoch is a permutation: {sorted(e1.tolist()) == list(range(N))}")
    print(f"batch rows: {DATA[batch_indices(key, 13)].shape}")


if __name__ == "__main__":
    main()
