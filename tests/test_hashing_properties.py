"""Property-based tests of the canonical pytree hash (hypothesis).

Equal inputs hash equal, however they are laid out in memory (C or Fortran
order, strided or reversed views, either byte order, NumPy or JAX); any changed
bit, shape, dtype or path hashes different. The arrays are drawn as raw bytes
viewed as each dtype, so every bit pattern occurs: NaNs with any payload,
-0.0, infinities, subnormals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from jpr.hashing import canonical_array, hash_pytree, leaf_hashes

SETTINGS = settings(max_examples=60, deadline=None)

DTYPES = [
    np.dtype(t)
    for t in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
] + [np.dtype(ml_dtypes.bfloat16)]


@st.composite
def arrays(draw, dtypes=DTYPES, max_side=5):
    """Any array of any of ``dtypes``: every bit pattern of the dtype is possible."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=max_side))
    n = int(np.prod(shape))
    if dtype == np.bool_:  # only 0 and 1 are bools; other bytes are not values
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool).reshape(shape)
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def same_values_other_layouts(a: np.ndarray):
    """Views and copies of ``a`` that hold the same values in other memory layouts."""
    if a.ndim:  # asfortranarray makes a 0-d array 1-d
        yield "fortran", np.asfortranarray(a)
    yield "reversed twice", a[::-1][::-1] if a.ndim else a
    if a.ndim:
        spread = np.zeros((a.shape[0] * 2, *a.shape[1:]), a.dtype)
        spread[::2] = a
        yield "strided view", spread[::2]
        yield "negative strides", np.ascontiguousarray(a[::-1])[::-1]
    if a.dtype.byteorder != "|" and a.dtype != ml_dtypes.bfloat16:
        yield "other byte order", a.astype(a.dtype.newbyteorder("S"))
    yield "0-d or not", a.reshape(a.shape)


def _le_bytes(x: np.ndarray) -> bytes:
    if x.dtype.byteorder == ">":
        x = x.astype(x.dtype.newbyteorder("<"))
    return np.ascontiguousarray(x).tobytes()


@SETTINGS
@given(a=arrays())
def test_equal_values_in_any_layout_hash_equal(a):
    want = hash_pytree({"x": a})
    for how, b in same_values_other_layouts(a):
        assert b.shape == a.shape and _le_bytes(b) == _le_bytes(a), how  # same bits
        assert hash_pytree({"x": b}) == want, how


@SETTINGS
@given(a=arrays(), data=st.data())
def test_any_changed_bit_hashes_different(a, data):
    if a.size == 0:
        return
    bits = a.size * a.dtype.itemsize * 8
    if a.dtype == np.bool_:
        i = data.draw(st.integers(0, a.size - 1))
        b = a.copy().reshape(-1)
        b[i] = not b[i]
        b = b.reshape(a.shape)
    else:
        bit = data.draw(st.integers(0, bits - 1))
        raw = bytearray(a.tobytes())
        raw[bit // 8] ^= 1 << (bit % 8)
        b = np.frombuffer(bytes(raw), a.dtype).reshape(a.shape)
    assert hash_pytree({"x": b}) != hash_pytree({"x": a})
    assert leaf_hashes({"x": b})["x"] != leaf_hashes({"x": a})["x"]
    # ... and in a tree, only that leaf's hash moves.
    other = np.arange(3)
    ha, hb = leaf_hashes({"x": a, "y": other}), leaf_hashes({"x": b, "y": other})
    assert ha["y"] == hb["y"] and ha["x"] != hb["x"]


@SETTINGS
@given(a=arrays(max_side=4))
def test_same_bytes_other_shape_or_dtype_hash_different(a):
    h = hash_pytree({"x": a})
    if a.size:
        assert hash_pytree({"x": a.reshape(-1, 1)}) != h or a.shape == (a.size, 1)
        assert hash_pytree({"x": a.reshape(1, *a.shape)}) != h
    same_size = [d for d in DTYPES if d.itemsize == a.dtype.itemsize and d != a.dtype]
    for d in same_size:
        if d == np.bool_:
            continue  # not every byte is a bool
        assert hash_pytree({"x": a.view(d)}) != h, d


@SETTINGS
@given(a=arrays(), b=arrays(), names=st.lists(st.text(min_size=1, max_size=6), min_size=2,
                                            max_size=2, unique=True))
def test_paths_are_part_of_the_hash(a, b, names):
    k1, k2 = names
    assert hash_pytree({k1: a, k2: b}) == hash_pytree({k2: b, k1: a})  # insertion order: no
    assert hash_pytree({k1: a}) != hash_pytree({k2: a})
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
        assert hash_pytree({k1: a, k2: b}) != hash_pytree({k1: b, k2: a})


@pytest.mark.parametrize(
    "x, y",
    [
        (np.float32(0.0), np.float32(-0.0)),
        (np.float32("nan"), np.uint32(0x7FC00001).view(np.float32)),  # two NaN payloads
        (np.float64(1.0), np.float32(1.0)),
        (np.int32(1), np.uint32(1)),
        (np.zeros((2, 3)), np.zeros((3, 2))),
        (np.zeros(0, np.float32), np.zeros((0, 1), np.float32)),
        (np.complex64(1j), np.complex64(-1j)),
    ],
)
def test_special_values_are_told_apart(x, y):
    assert hash_pytree({"x": x}) != hash_pytree({"x": y})


@settings(max_examples=25, deadline=None)
@given(a=arrays(dtypes=[np.dtype(t) for t in ("float32", "int32", "uint32", "int8", "bool")]
                + [np.dtype(ml_dtypes.bfloat16), np.dtype("float16")]))
def test_numpy_and_jax_arrays_hash_alike(a):
    assert hash_pytree({"x": jnp.asarray(a)}) == hash_pytree({"x": a})


@SETTINGS
@given(v=st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(),
                   st.complex_numbers()))
def test_python_scalars_hash_as_numpy_default_dtypes(v):
    assert hash_pytree([v]) == hash_pytree([np.asarray(v)])
    name, arr = canonical_array(v)
    assert name == np.asarray(v).dtype.name and arr.dtype.byteorder in "<|="


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), other=st.integers(0, 2**32 - 1))
def test_typed_keys_hash_by_impl_and_data(seed, other):
    k = jax.random.key(seed)
    assert hash_pytree({"k": k}) == hash_pytree({"k": jax.random.key(seed)})
    assert (hash_pytree({"k": k}) == hash_pytree({"k": jax.random.key(other)})) == (seed == other)
    # The same words as plain uint32 are another leaf: the impl name is hashed too.
    assert hash_pytree({"k": k}) != hash_pytree({"k": jax.random.key_data(k)})
