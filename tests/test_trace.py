"""jpr.Tracer: what it records is the state at the call, digested exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpr import hashing
from jpr.compare import compare_records, format_result
from jpr.errors import JprError
from jpr.trace import Tracer, snapshot


def _in_place_layer():
    model = nnx.Linear(256, 256, rngs=nnx.Rngs(0))

    @nnx.jit
    def update(m):  # updates the model in place, as the Flax MNIST tutorial's step does
        m.kernel[...] = m.kernel[...] * 0.999 + 0.001
        m.bias[...] = m.bias[...] + 1.0

    return model, update


def test_an_in_place_model_is_recorded_as_it_was_at_each_step():
    """The issue's measurement: 200 in-place updates of a 256x256 nnx.Linear,
    traced with the model's live ``nnx.State`` (as trace.py's example does) and
    with a detached copy. Before the snapshot, 138 of 200 live entries held
    another step's hash; now none may."""
    model, update = _in_place_layer()
    live, detached = Tracer(), Tracer()
    for t in range(1, 201):
        update(model)
        live.step(t, nnx.state(model))  # live Variable boxes
        detached.step(t, jax.tree.map(lambda x: x, nnx.state(model)))
    a, b = live.entries(), detached.entries()
    wrong = [x["step"] for x, y in zip(a, b, strict=True) if x["params_hash"] != y["params_hash"]]
    assert len(a) == 200 and wrong == []
    assert len({e["params_hash"] for e in a}) == 200  # every step's state is its own


def test_the_record_carries_sha256_of_the_newest_state_whatever_happened_after():
    model, update = _in_place_layer()
    tracer = Tracer()
    update(model)
    tracer.step(1, nnx.state(model))
    expected = hashing.hash_pytree_and_leaves(jax.tree.map(lambda x: x, nnx.state(model)))
    update(model)  # after the last traced step: not in the record
    record = tracer.record()
    assert (record["hash"], record["leaf_hashes"]) == expected
    assert record["state_hash"] == expected[0]
    assert record["step_digest"] == hashing.FINGERPRINT_SCHEME.decode()


def test_numpy_leaves_are_copied_at_the_call():
    w = np.zeros(4, np.float32)
    taken = snapshot({"w": w, "n": 3})
    w += 1
    assert taken[0] == ("n", 3) and taken[1][1].tolist() == [0.0] * 4


def _flips(x: np.ndarray):
    """Every one-bit change of ``x``: each bit of each byte flipped alone."""
    raw = x.reshape(-1).view(np.uint8)
    for i in range(raw.size):
        for bit in range(8):
            y = raw.copy()
            y[i] ^= np.uint8(1 << bit)
            yield y.view(x.dtype).reshape(x.shape)


@pytest.mark.parametrize(
    "leaf",
    [
        np.array([1.5, -2.25, 3.0], np.float32),
        np.array([0.5, -0.0], jnp.bfloat16),
        np.array([7, -8, 0, 1], np.int8),
        np.array([np.pi], np.float64),
        np.array([True, False, True]),
    ],
    ids=["float32", "bfloat16", "int8", "float64", "bool"],
)
def test_a_fingerprint_changes_on_every_one_bit_change(leaf):
    base = hashing.fingerprint_pairs([("w", leaf)])[0]
    seen = {base}
    for changed in _flips(leaf):
        seen.add(hashing.fingerprint_pairs([("w", changed)])[0])
    assert len(seen) == 1 + leaf.nbytes * 8  # all distinct: none collides with another


def test_a_fingerprint_tells_signed_zeros_and_nan_payloads_apart():
    f = lambda *v: hashing.fingerprint_pairs([("w", np.array(v, np.float32))])[0]  # noqa: E731
    nan_a = np.array([0x7FC00000], np.uint32).view(np.float32)[0]
    nan_b = np.array([0x7FC00001], np.uint32).view(np.float32)[0]
    assert f(0.0) != f(-0.0)
    assert f(nan_a) != f(nan_b)
    # And the tree: path, dtype and shape are part of it, as in the SHA-256 scheme.
    z = np.zeros(4, np.float32)
    digests = {
        hashing.fingerprint_pairs([("w", z)])[0],
        hashing.fingerprint_pairs([("v", z)])[0],
        hashing.fingerprint_pairs([("w", z.reshape(2, 2))])[0],
        hashing.fingerprint_pairs([("w", z.view(np.int32))])[0],
    }
    assert len(digests) == 4


def test_a_donated_leaf_is_named_not_misread():
    step = jax.jit(lambda x: x + 1, donate_argnums=0)
    tracer, x = Tracer(), jnp.zeros(1024)
    tracer._pool.submit(lambda: __import__("time").sleep(0.3))  # the worker is busy
    tracer.step(1, {"x": x})
    step(x)  # deletes x before the worker reads it
    with pytest.raises(JprError, match=r"leaf x was deleted .*trace a copy"):
        tracer.entries()


def test_compare_does_not_mix_digest_kinds():
    def traced(digest):
        tracer = Tracer(digest=digest)
        for t in (1, 2):
            tracer.step(t, {"w": np.full(2, t, np.float32)})
        return tracer.record()

    a, b = traced("xxh3"), traced("sha256")
    assert a["hash"] == b["hash"]  # the final hashes are SHA-256 either way
    assert compare_records(a, b)["first_divergence"] is None
    c = traced("sha256")
    c["hash"] = c["state_hash"] = "0" * 64
    text = format_result(compare_records(a, c))
    assert "first divergence: not compared (steps digested as jpr-pytree-xxh3" in text


def test_a_checkpoint_save_of_an_in_place_model_holds_the_saved_step(tmp_path):
    from jpr.checkpoint import Checkpointer

    model, update = _in_place_layer()
    update(model)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save_pytree(1, nnx.state(model))
        saved = hashing.hash_pytree(jax.tree.map(lambda x: x, nnx.state(model)))
        update(model)  # right after save returned
        restored, _ = ckpt.restore_pytree(1, template=nnx.state(model))
    assert hashing.hash_pytree(restored) == saved


def test_unknown_digest_is_one_clear_error():
    with pytest.raises(JprError, match="digest must be one of"):
        Tracer(digest="md5")


def test_snapshot_names_leaves_once_per_structure_and_stays_bounded():
    """Paths are cached per tree structure. A structure whose static data never
    compares equal (an object compared by identity) misses every time: it is
    named afresh, with the same paths, and the cache does not grow without end."""
    import jax.tree_util as jtu

    from jpr import trace

    class Box:
        def __init__(self, x):
            self.x, self.meta = x, object()  # a new, unequal static datum each time

    jtu.register_pytree_with_keys(
        Box, lambda b: (((jtu.GetAttrKey("x"), b.x),), b.meta), lambda meta, c: Box(c[0])
    )
    for _ in range(3 * trace._MAX_STRUCTURES):
        assert [p for p, _ in snapshot({"b": Box(np.ones(2))})] == ["b/x"]
    assert len(trace._PATHS) <= trace._MAX_STRUCTURES
    assert [p for p, _ in snapshot({"a": 1, "b": [2, 3]})] == ["a", "b/0", "b/1"]
