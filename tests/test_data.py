"""The synthetic dataset: batches are a pure function of (seed, step, process)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpr.config import RunConfig
from jpr.data import ROUNDS, Dataset, batch_indices, get_batch, index_shuffle, make_dataset

CFG = RunConfig(seed=0)
B = CFG.batch_size


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return make_dataset(CFG)


def keys(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**32, ROUNDS, dtype=np.uint32)


# ---------------------------------------------------------------- the arrays


def test_dataset_shapes_dtypes_and_labels(ds):
    assert ds.x.shape == (CFG.dataset_size, CFG.features) and ds.x.dtype == np.float32
    assert ds.y.shape == (CFG.dataset_size,) and ds.y.dtype == np.int32
    assert ds.eval_x.shape == (CFG.eval_size, CFG.features)
    assert ds.eval_y.shape == (CFG.eval_size,)
    assert ds.size == CFG.dataset_size
    assert set(np.unique(ds.y)) == set(range(CFG.classes))
    assert np.isfinite(ds.x).all()


def test_dataset_is_a_function_of_the_seed(ds):
    again = make_dataset(RunConfig(seed=0))
    assert again is not ds
    for name in ("x", "y", "eval_x", "eval_y"):
        assert getattr(again, name).tobytes() == getattr(ds, name).tobytes()
    other = make_dataset(RunConfig(seed=1))
    assert other.x.tobytes() != ds.x.tobytes()


def test_train_and_eval_sets_differ(ds):
    assert ds.x[: CFG.eval_size].tobytes() != ds.eval_x.tobytes()


def test_classes_are_separable_enough_to_learn(ds):
    """Nearest class mean on the training set beats chance on the eval set."""
    means = np.stack([ds.x[ds.y == c].mean(0) for c in range(CFG.classes)])
    pred = np.argmin(((ds.eval_x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == ds.eval_y).mean() > 2.0 / CFG.classes


# ---------------------------------------------------------------- batches


def test_batch_of_a_step_is_a_pure_function(ds):
    x, y = get_batch(17, ds=ds, batch_size=B)
    # A fresh dataset object, with its own (empty) round-key cache, after other steps.
    fresh = make_dataset(CFG)
    for step in (500, 3, 10**6):
        get_batch(step, ds=fresh, batch_size=B)
    x2, y2 = get_batch(17, ds=fresh, batch_size=B)
    assert x.tobytes() == x2.tobytes() and y.tobytes() == y2.tobytes()


def test_round_key_cache_eviction_does_not_change_batches(ds):
    per_epoch = ds.size // B
    first = batch_indices(5, ds=ds, batch_size=B).copy()
    for epoch in range(1, 12):  # more epochs than the cache holds
        batch_indices(epoch * per_epoch, ds=ds, batch_size=B)
    assert (batch_indices(5, ds=ds, batch_size=B) == first).all()


def test_each_epoch_covers_the_dataset_exactly_once(ds):
    per_epoch = ds.size // B
    assert per_epoch * B == ds.size
    for epoch in (0, 1, 7):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        idx = np.concatenate([batch_indices(s, ds=ds, batch_size=B) for s in steps])
        assert np.array_equal(np.sort(idx), np.arange(ds.size))


def test_partial_last_batch_is_dropped_and_no_example_repeats():
    small = make_dataset(RunConfig(seed=0, dataset_size=100, batch_size=32))
    idx = np.concatenate([batch_indices(s, ds=small, batch_size=32) for s in range(3)])
    assert len(idx) == 96 and len(set(idx.tolist())) == 96
    assert idx.min() >= 0 and idx.max() < 100
    # Step 3 starts epoch 1.
    e1 = np.concatenate([batch_indices(s, ds=small, batch_size=32) for s in range(3, 6)])
    assert len(set(e1.tolist())) == 96 and not np.array_equal(e1, idx)


def test_different_epochs_have_different_orders(ds):
    per_epoch = ds.size // B
    orders = [
        np.concatenate([batch_indices(e * per_epoch + s, ds=ds, batch_size=B)
                        for s in range(per_epoch)])
        for e in range(3)
    ]
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    # Shuffled, not the identity.
    assert not np.array_equal(orders[0], np.arange(ds.size))


def test_different_seeds_have_different_orders(ds):
    other = make_dataset(RunConfig(seed=1))
    assert not np.array_equal(batch_indices(0, ds=ds, batch_size=B),
                              batch_indices(0, ds=other, batch_size=B))


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("step", [0, 63, 64, 12345])
def test_process_slices_concatenate_to_the_global_batch(ds, process_count, step):
    global_x, global_y = get_batch(step, ds=ds, batch_size=B)
    parts = [
        get_batch(step, ds=ds, batch_size=B, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    assert all(x.shape == (B // process_count, CFG.features) for x, _ in parts)
    assert np.concatenate([x for x, _ in parts]).tobytes() == global_x.tobytes()
    assert np.concatenate([y for _, y in parts]).tobytes() == global_y.tobytes()


def test_step_one_billion_is_a_normal_step(ds):
    x, _ = get_batch(10**9, ds=ds, batch_size=B)
    assert x.shape == (B, CFG.features)
    idx = batch_indices(10**9, ds=ds, batch_size=B)
    assert len(set(idx.tolist())) == B
    # Same epoch, same position: the same as recomputing it from scratch.
    again = batch_indices(10**9, ds=make_dataset(CFG), batch_size=B)
    assert np.array_equal(idx, again)
    assert not np.array_equal(idx, batch_indices(10**9 + 1, ds=ds, batch_size=B))


def test_numpy_integer_steps_are_accepted(ds):
    assert np.array_equal(batch_indices(np.int64(9), ds=ds, batch_size=B),
                          batch_indices(9, ds=ds, batch_size=B))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": -1}, "step must be a non-negative integer"),
        ({"step": True}, "step must be a non-negative integer"),
        ({"step": 1.0}, "step must be a non-negative integer"),
        ({"step": 0, "process_index": 2, "process_count": 2}, "process_index 2 not in [0, 2)"),
        ({"step": 0, "process_index": -1}, "process_index -1 not in [0, 1)"),
        ({"step": 0, "process_count": 3}, "must be divisible by the process count (3)"),
        ({"step": 0, "batch_size": 8192}, "exceeds the dataset size (4096)"),
    ],
)
def test_batch_indices_errors(ds, kwargs, message):
    kwargs = {"batch_size": B, **kwargs}
    with pytest.raises(ValueError) as info:
        batch_indices(kwargs.pop("step"), ds=ds, **kwargs)
    assert message in str(info.value)


# ---------------------------------------------------------------- index_shuffle


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100, 4096, 5000])
def test_index_shuffle_is_a_permutation(size):
    for seed in range(3):
        out = index_shuffle(np.arange(size), size=size, round_keys=keys(seed))
        assert out.dtype == np.int64
        assert np.array_equal(np.sort(out), np.arange(size))


@pytest.mark.parametrize("size", [100, 4096, 5000])
def test_index_shuffle_depends_on_the_keys_and_shuffles(size):
    a = index_shuffle(np.arange(size), size=size, round_keys=keys(0))
    b = index_shuffle(np.arange(size), size=size, round_keys=keys(1))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(size))
    # Few fixed points, as for a random permutation (expected about one).
    assert (a == np.arange(size)).sum() < 10


def test_index_shuffle_is_elementwise():
    """Any subset of positions maps as it does in the full permutation (O(1) seek)."""
    size = 5000
    full = index_shuffle(np.arange(size), size=size, round_keys=keys(2))
    picks = np.array([4999, 0, 1234, 17, 17])
    assert np.array_equal(index_shuffle(picks, size=size, round_keys=keys(2)), full[picks])
    assert index_shuffle(np.array([], dtype=np.int64), size=size, round_keys=keys(2)).size == 0


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_index_shuffle_is_a_permutation_property(size, seed):
    out = index_shuffle(np.arange(size), size=size, round_keys=keys(seed % 1000))
    assert np.array_equal(np.sort(out), np.arange(size))


@pytest.mark.parametrize(
    ("positions", "size", "message"),
    [
        ([0], 0, "size must be in [1, 2**32]"),
        ([0], 2**32 + 1, "size must be in [1, 2**32]"),
        ([10], 10, "positions must lie in [0, 10)"),
    ],
)
def test_index_shuffle_errors(positions, size, message):
    with pytest.raises(ValueError) as info:
        index_shuffle(np.asarray(positions), size=size, round_keys=keys(0))
    assert message in str(info.value)
