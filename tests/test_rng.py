"""The key contract of jpr.rng: keys are a pure function of (seed, stream, step)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpr import rng


def bits(key: jax.Array) -> np.ndarray:
    return np.asarray(jax.random.key_data(key))


def same(a: jax.Array, b: jax.Array) -> bool:
    return bits(a).shape == bits(b).shape and bool((bits(a) == bits(b)).all())


# ---------------------------------------------------------------- stable_id


def test_stable_id_is_the_documented_sha256_prefix():
    for name in ("params", "dropout", "data", "dataset", "ünïcode", "x" * 1000):
        digest = hashlib.sha256(name.encode("utf-8")).digest()
        expected = int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
        assert rng.stable_id(name) == expected
        assert 0 <= rng.stable_id(name) < 2**31


def test_stable_id_distinguishes_the_library_streams():
    names = ["params", "dropout", "data", "dataset"]
    assert len({rng.stable_id(n) for n in names}) == len(names)


@pytest.mark.parametrize("bad", ["", None, 3, b"dropout"])
def test_stable_id_rejects_non_names(bad):
    with pytest.raises(ValueError, match="non-empty string"):
        rng.stable_id(bad)


def test_stable_id_is_the_same_in_a_process_with_another_hash_seed():
    """Python's hash() is salted per process; stable_id is not."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    code = "from jpr.rng import stable_id; print(stable_id('dropout'), hash('dropout'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": seed},
    )
    assert out.returncode == 0, out.stderr
    sid, salted = map(int, out.stdout.split())
    assert salted != hash("dropout"), "hash() was not salted differently: the test proves nothing"
    assert sid == rng.stable_id("dropout")
    assert sid not in (salted, salted & 0x7FFFFFFF, hash("dropout"), hash("dropout") & 0x7FFFFFFF)


# ---------------------------------------------------------------- root / stream / step keys


def test_root_key_is_a_typed_threefry_key():
    k = rng.root_key(42)
    assert jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    assert k.shape == ()
    assert str(jax.random.key_impl(k)) == rng.IMPL == "threefry2x32"
    assert same(k, jax.random.key(42, impl="threefry2x32"))


def test_root_key_accepts_numpy_integers_and_the_full_range():
    assert same(rng.root_key(np.int64(7)), rng.root_key(7))
    assert not same(rng.root_key(0), rng.root_key(2**32 - 1))


@pytest.mark.parametrize(
    ("seed", "error"),
    [(True, TypeError), (1.0, TypeError), ("0", TypeError), (-1, ValueError), (2**32, ValueError)],
)
def test_root_key_rejects_bad_seeds(seed, error):
    with pytest.raises(error):
        rng.root_key(seed)


def test_stream_and_step_keys_follow_the_contract():
    root = rng.root_key(0)
    s = rng.stream_key(root, "dropout")
    assert same(s, jax.random.fold_in(root, rng.stable_id("dropout")))
    assert same(rng.step_key(root, "dropout", 7), jax.random.fold_in(s, 7))
    assert same(rng.microbatch_key(rng.step_key(root, "dropout", 7), 2),
                jax.random.fold_in(jax.random.fold_in(s, 7), 2))


def test_keys_differ_across_seeds_streams_steps_and_microbatches():
    root = rng.root_key(0)
    keys = [
        rng.step_key(root, "dropout", 0),
        rng.step_key(root, "dropout", 1),
        rng.step_key(root, "data", 0),
        rng.step_key(rng.root_key(1), "dropout", 0),
        rng.microbatch_key(rng.step_key(root, "dropout", 0), 0),
        rng.microbatch_key(rng.step_key(root, "dropout", 0), 1),
    ]
    datas = {bits(k).tobytes() for k in keys}
    assert len(datas) == len(keys)


def test_step_key_does_not_depend_on_history():
    """A step's key is the same fresh and after 1000 unrelated key operations."""
    root = rng.root_key(0)
    fresh = bits(rng.step_key(root, "dropout", 7)).copy()

    k = root
    for _ in range(500):  # chained splits, the usual stateful style
        k, _ = jax.random.split(k)
    for i in range(500):  # and many other step keys
        rng.step_key(root, "dropout", i)
    jax.random.normal(k, (10,))

    assert (bits(rng.step_key(root, "dropout", 7)) == fresh).all()
    # Rebuilding the root from the seed (a resumed process) gives it too.
    assert (bits(rng.step_key(rng.root_key(0), "dropout", 7)) == fresh).all()


def test_step_key_is_the_same_under_jit_with_a_traced_step():
    root = rng.root_key(3)
    jitted = jax.jit(lambda r, s: jax.random.key_data(rng.step_key(r, "dropout", s)))
    for step in (0, 7, 2**32 - 1):
        eager = bits(rng.step_key(root, "dropout", step))
        assert (np.asarray(jitted(root, jnp.uint32(step))) == eager).all()
        assert (np.asarray(jitted(root, np.uint32(step))) == eager).all()


# ---------------------------------------------------------------- host keys


def test_host_key_folds_the_given_index():
    k = rng.step_key(rng.root_key(0), "data", 3)
    assert same(rng.host_key(k, 1), jax.random.fold_in(k, 1))
    assert not same(rng.host_key(k, 0), rng.host_key(k, 1))


def test_host_key_defaults_to_jax_process_index(monkeypatch):
    k = rng.root_key(0)
    assert jax.process_index() == 0
    assert same(rng.host_key(k), rng.host_key(k, 0))
    # The default is read from jax.process_index() at call time, not frozen at import.
    monkeypatch.setattr(jax, "process_index", lambda *a, **kw: 3)
    assert same(rng.host_key(k), rng.host_key(k, 3))
    assert not same(rng.host_key(k), rng.host_key(k, 0))


# ---------------------------------------------------------------- serialisation


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
@pytest.mark.parametrize("shape", [(), (3,), (2, 2)])
def test_key_to_data_round_trips(impl, shape):
    k = jax.random.key(11, impl=impl)
    if shape:
        k = jax.random.split(k, int(np.prod(shape))).reshape(shape)
    d = rng.key_to_data(k)
    assert d["impl"] == impl
    assert d["shape"] == list(shape)
    assert all(isinstance(v, int) and 0 <= v < 2**32 for v in d["data"])
    back = rng.key_from_data(d)
    assert back.shape == k.shape
    assert str(jax.random.key_impl(back)) == impl
    assert same(back, k)
    # And the round-tripped key draws the same numbers.
    last = (-1,) * len(shape)
    assert (np.asarray(jax.random.bits(back[last], (4,)))
            == np.asarray(jax.random.bits(k[last], (4,)))).all()


def test_key_data_survives_json():
    import json

    k = jax.random.split(rng.root_key(5), 3)
    assert same(rng.key_from_data(json.loads(json.dumps(rng.key_to_data(k)))), k)


@pytest.mark.parametrize(
    "raw", [jax.random.PRNGKey(0), np.zeros(2, np.uint32), jnp.zeros((3,), jnp.float32)]
)
def test_key_to_data_rejects_raw_arrays(raw):
    with pytest.raises(TypeError, match="typed PRNG key"):
        rng.key_to_data(raw)


@pytest.mark.parametrize(
    "bad", [{}, {"impl": "threefry2x32", "shape": []}, {"impl": "threefry2x32", "data": [0, 1]},
            {"impl": "threefry2x32", "shape": [], "data": ["x", 1]}],
)
def test_key_from_data_rejects_malformed_input(bad):
    with pytest.raises(ValueError, match="not a serialised key"):
        rng.key_from_data(bad)


def test_key_fingerprint_is_short_stable_and_distinguishing():
    a, b = rng.root_key(0), rng.root_key(1)
    assert rng.key_fingerprint(a) == rng.key_fingerprint(rng.root_key(0))
    assert rng.key_fingerprint(a) != rng.key_fingerprint(b)
    assert len(rng.key_fingerprint(a)) == 16
    int(rng.key_fingerprint(a), 16)  # hex
    rbg = jax.random.key(0, impl="rbg")
    assert rng.key_fingerprint(rbg) != rng.key_fingerprint(a)
