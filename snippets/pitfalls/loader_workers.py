"""Augmentations in data-loader workers: global random state, or a seed per record.

Run it from the repository root::

    python snippets/pitfalls/loader_workers.py

Grain's `DataLoader` runs its transforms in worker processes when
`worker_count > 0`, and worker processes must be able to import the transform
classes, so this is a script of its own rather than a block of the page.
"""

import multiprocessing

import grain.python as grain
import numpy as np

RECORDS = 8


class GlobalNoise(grain.MapTransform):
    """Bad: the "augmentation" draws from NumPy's global state."""

    def map(self, x):
        return int(np.random.randint(1000))


class SeededNoise(grain.RandomMapTransform):
    """Good: Grain gives each record an rng derived from (seed, record index)."""

    def random_map(self, x, rng):
        return int(rng.integers(1000))


def load(transform, workers: int) -> list[int]:
    """One epoch of 8 records through `transform`, with NumPy's global seed set first."""
    np.random.seed(0)
    sampler = grain.IndexSampler(RECORDS, shuffle=False, num_epochs=1, seed=42,
                                 shard_options=grain.NoSharding())
    loader = grain.DataLoader(data_source=list(range(RECORDS)), sampler=sampler,
                              operations=[transform], worker_count=workers)
    return list(loader)


def forked_draws(n_workers: int) -> list[list[int]]:
    """What fork-started workers draw from NumPy's global state, seeded once in the parent."""
    np.random.seed(0)
    ctx = multiprocessing.get_context("fork")  # what PyTorch's DataLoader uses on Linux
    queue = ctx.Queue()
    workers = [ctx.Process(target=_draw_in_worker, args=(w, queue)) for w in range(n_workers)]
    for w in workers:
        w.start()
    draws = dict(queue.get() for _ in workers)
    for w in workers:
        w.join()
    return [draws[w] for w in range(n_workers)]


def _draw_in_worker(worker: int, queue) -> None:
    queue.put((worker, np.random.randint(1000, size=4).tolist()))


def main() -> None:
    g0, g2, again = load(GlobalNoise(), 0), load(GlobalNoise(), 2), load(GlobalNoise(), 2)
    print(f"global state, 0 workers, twice equal:   {g0 == load(GlobalNoise(), 0)}")
    print(f"global state, 2 workers, twice equal:   {g2 == again}")
    print(f"global state, 0 vs 2 workers equal:     {g0 == g2}")
    s0, s2 = load(SeededNoise(), 0), load(SeededNoise(), 2)
    print(f"seed per record, 0 vs 2 workers equal:  {s0 == s2}")
    first, second = forked_draws(2)
    print(f"forked workers' draws: {first} and {second}")


if __name__ == "__main__":
    from absl import flags  # Grain's worker threads read absl flags: parse them once

    flags.FLAGS.mark_as_parsed()
    main()
