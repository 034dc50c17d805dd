"""A deterministic synthetic dataset that seeks to any step in O(1).

The data are Gaussian blobs, one per class, generated from the run's seed (no
downloads). The order is a fresh pseudo-random permutation every epoch, built
as a Feistel network over the example indices (the same idea as Grain's index
shuffle): the example at position ``i`` of epoch ``e`` is computed directly,
without materialising or replaying anything. So the batch for step ``t`` is a
pure function of (seed, t, process index, process count), and fetching the
batch of step ``10**9`` costs the same as fetching the batch of step ``10``.

Multi-host: the *global* batch of a step is the same whatever the number of
processes; process ``p`` of ``P`` takes rows ``[p*B/P, (p+1)*B/P)`` of it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpr import rng
from jpr.config import RunConfig

__all__ = [
    "Dataset",
    "batch_indices",
    "get_batch",
    "get_batches",
    "index_shuffle",
    "make_dataset",
]

#: Feistel rounds. Four rounds of a good round function give a pseudo-random
#: permutation (Luby-Rackoff); we use six for margin.
ROUNDS = 6


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Training and evaluation arrays plus the key that orders the epochs.

    Attributes:
        x: training features, ``float32[dataset_size, features]``.
        y: training labels, ``int32[dataset_size]``.
        eval_x: held-out features, ``float32[eval_size, features]``.
        eval_y: held-out labels, ``int32[eval_size]``.
        order_key: key of the ``"data"`` stream; epoch ``e`` is shuffled with
            ``fold_in(order_key, e)``.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.data import make_dataset
        >>> ds = make_dataset(RunConfig(seed=0))
        >>> ds.size, ds.round_keys(0).dtype
        (4096, dtype('uint32'))
    """

    x: np.ndarray
    y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    order_key: jax.Array
    _round_keys: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        """Number of training examples."""
        return int(self.x.shape[0])

    def round_keys(self, epoch: int) -> np.ndarray:
        """The Feistel round keys of ``epoch`` (cached: one JAX call per epoch)."""
        keys = self._round_keys.get(epoch)
        if keys is None:
            if len(self._round_keys) > 8:
                self._round_keys.clear()
            keys = _round_keys(self.order_key, epoch)
            self._round_keys[epoch] = keys
        return keys


def _round_keys(order_key: jax.Array, epoch: int) -> np.ndarray:
    # One compiled program instead of a handful of eager ones (integer ops only:
    # the same bits either way); it matters for start-up and the first fetch.
    return np.asarray(_round_keys_jit(order_key, np.uint32(epoch)))


@jax.jit
def _round_keys_jit(order_key: jax.Array, epoch: jax.Array) -> jax.Array:
    return jax.random.bits(jax.random.fold_in(order_key, epoch), (ROUNDS,), jnp.uint32)


def _mix32(x: np.ndarray) -> np.ndarray:
    # "lowbias32" integer hash (Chris Wellons): a strong, cheap 32-bit mixer.
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _feistel(i: np.ndarray, round_keys: np.ndarray, half_bits: int) -> np.ndarray:
    mask = np.uint32((1 << half_bits) - 1)
    left, right = i >> np.uint32(half_bits), i & mask
    for k in round_keys:
        left, right = right, left ^ (_mix32(right ^ k) & mask)
    return (left << np.uint32(half_bits)) | right


def index_shuffle(
    positions: np.ndarray, *, size: int, round_keys: np.ndarray
) -> np.ndarray:
    """Map positions in ``[0, size)`` through a keyed pseudo-random permutation.

    A balanced Feistel network permutes ``[0, 4**h)`` for the smallest ``h``
    with ``4**h >= size``; positions that land outside ``[0, size)`` are walked
    through the network again until they land inside (cycle walking), which
    keeps it a permutation of ``[0, size)``. Cost: O(len(positions)), whatever
    the size or the epoch.

    Args:
        positions: integer positions in ``[0, size)``.
        size: the size of the permuted domain.
        round_keys: ``uint32[ROUNDS]`` round keys.

    Example:
        >>> import numpy as np
        >>> from jpr.data import index_shuffle
        >>> keys = np.arange(6, dtype=np.uint32)
        >>> out = index_shuffle(np.arange(10), size=10, round_keys=keys)
        >>> sorted(out.tolist()) == list(range(10))
        True
    """
    if size < 1 or size > 2**32:
        raise ValueError(f"size must be in [1, 2**32], got {size}")
    half_bits = max(1, (max(size - 1, 1).bit_length() + 1) // 2)
    out = np.asarray(positions, dtype=np.uint32)
    if out.size and (out.min() < 0 or int(out.max()) >= size):
        raise ValueError(f"positions must lie in [0, {size})")
    out = _feistel(out, round_keys, half_bits)
    outside = out >= size
    while outside.any():
        out[outside] = _feistel(out[outside], round_keys, half_bits)
        outside = out >= size
    return out.astype(np.int64)


def _batches_per_epoch(ds: Dataset, batch_size: int, process_index: int, process_count: int) -> int:
    """Check the batch layout; return the number of full batches in an epoch."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by the process count ({process_count})"
        )
    per_epoch = ds.size // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size ({batch_size}) exceeds the dataset size ({ds.size})")
    return per_epoch


def batch_indices(
    step: int,
    *,
    ds: Dataset,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Indices of the examples that process ``process_index`` uses at ``step``.

    The global batch of ``step`` is positions ``[pos*B, (pos+1)*B)`` of the
    epoch's permutation, where ``epoch, pos = divmod(step, size // B)``; the
    remainder of an epoch that does not fill a batch is dropped. A process takes
    its contiguous share of that global batch.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.data import batch_indices, make_dataset
        >>> ds = make_dataset(RunConfig(seed=0))
        >>> a = batch_indices(10**9, ds=ds, batch_size=64)
        >>> b = batch_indices(10**9, ds=ds, batch_size=64, process_index=1, process_count=2)
        >>> bool((a[32:] == b).all())
        True
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    per_epoch = _batches_per_epoch(ds, batch_size, process_index, process_count)
    epoch, pos = divmod(int(step), per_epoch)
    local = batch_size // process_count
    start = pos * batch_size + process_index * local
    positions = np.arange(start, start + local, dtype=np.uint32)
    return index_shuffle(positions, size=ds.size, round_keys=ds.round_keys(epoch))


def get_batch(
    step: int,
    *,
    ds: Dataset,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``(x, y)`` batch of ``step`` for one process (see :func:`batch_indices`).

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.data import get_batch, make_dataset
        >>> x, y = get_batch(3, ds=make_dataset(RunConfig(seed=0)), batch_size=64)
        >>> x.shape, x.dtype, y.shape, y.dtype
        ((64, 64), dtype('float32'), (64,), dtype('int32'))
    """
    idx = batch_indices(
        step,
        ds=ds,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return ds.x[idx], ds.y[idx]


def get_batches(
    start: int,
    count: int,
    *,
    ds: Dataset,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The batches of steps ``start .. start+count-1``, stacked: ``x[i]`` is step ``start+i``.

    Row for row the same as calling :func:`get_batch` ``count`` times, but one
    Feistel pass per epoch touched instead of one per step, which is what the
    fused training loop feeds its ``lax.fori_loop`` with. With ``pad_to`` the
    leading axis is zero-padded to that length (the padding is never trained on).

    Example:
        >>> import numpy as np
        >>> from jpr.config import RunConfig
        >>> from jpr.data import get_batch, get_batches, make_dataset
        >>> ds = make_dataset(RunConfig(seed=0))
        >>> xs, ys = get_batches(62, 4, ds=ds, batch_size=64, pad_to=8)  # crosses an epoch
        >>> xs.shape, ys.shape
        ((8, 64, 64), (8, 64))
        >>> x, y = get_batch(64, ds=ds, batch_size=64)
        >>> bool((xs[2] == x).all() and (ys[2] == y).all() and (xs[4:] == 0).all())
        True
    """
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative integer, got {start!r}")
    if count < 0 or (pad_to is not None and pad_to < count):
        raise ValueError(f"count must be in [0, pad_to], got {count} (pad_to={pad_to})")
    per_epoch = _batches_per_epoch(ds, batch_size, process_index, process_count)
    local = batch_size // process_count
    rows = count if pad_to is None else pad_to
    idx = np.zeros((rows, local), dtype=np.int64)
    steps = np.arange(int(start), int(start) + count, dtype=np.int64)
    epochs, pos = np.divmod(steps, per_epoch)
    offsets = np.arange(local, dtype=np.int64) + process_index * local
    for epoch in np.unique(epochs).tolist():
        sel = epochs == epoch
        positions = (pos[sel, None] * batch_size + offsets).astype(np.uint32)
        idx[:count][sel] = index_shuffle(
            positions.reshape(-1), size=ds.size, round_keys=ds.round_keys(epoch)
        ).reshape(positions.shape)
    xs, ys = ds.x[idx], ds.y[idx]
    if rows > count:
        xs[count:] = 0
        ys[count:] = 0
    return xs, ys


def _blobs(key, centers, *, n, features, classes):
    k_label, k_noise = jax.random.split(key)
    y = jax.random.randint(k_label, (n,), 0, classes, dtype=jnp.int32)
    x = centers[y] + 1.5 * jax.random.normal(k_noise, (n, features), jnp.float32)
    return x, y


@functools.partial(jax.jit, static_argnames=("n", "eval_n", "features", "classes"))
def _both_sets(k, *, n, eval_n, features, classes):
    # One program for the centres and both sets: a process compiles (or looks up) one, not three.
    centers = jax.random.normal(jax.random.fold_in(k, 2), (classes, features))
    x, y = _blobs(jax.random.fold_in(k, 0), centers, n=n, features=features, classes=classes)
    ex, ey = _blobs(jax.random.fold_in(k, 1), centers, n=eval_n, features=features,
                    classes=classes)
    return x, y, ex, ey


def make_dataset(cfg: RunConfig) -> Dataset:
    """Generate the synthetic train and eval sets of a config (no downloads).

    Class centres come from the ``"dataset"`` stream, training examples from
    ``fold_in(dataset, 0)``, evaluation examples from ``fold_in(dataset, 1)``,
    and the per-epoch order from the ``"data"`` stream.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.data import make_dataset
        >>> ds = make_dataset(RunConfig(seed=0))
        >>> ds.x.shape, ds.eval_x.shape
        ((4096, 64), (1024, 64))
    """
    root = rng.root_key(cfg.seed)
    x, y, ex, ey = _both_sets(
        rng.stream_key(root, "dataset"), n=cfg.dataset_size, eval_n=cfg.eval_size,
        features=cfg.features, classes=cfg.classes,
    )
    return Dataset(
        x=np.asarray(x),
        y=np.asarray(y),
        eval_x=np.asarray(ex),
        eval_y=np.asarray(ey),
        order_key=rng.stream_key(root, "data"),
    )
