"""Canonical pytree hashing: what counts as the same value and what does not."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jpr.hashing import canonical_array, hash_pytree, leaf_hashes, leaf_path


def h(x) -> str:
    return hash_pytree({"x": x})


def f32_from_bits(*words: int) -> np.ndarray:
    return np.asarray(words, dtype=np.uint32).view(np.float32)


# ---------------------------------------------------------------- known answer


def _expected_root(leaves: list[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """The documented canonical form, written out independently of jpr.hashing.

    leaf digest = sha256(u64le(len(header)) || header || data), where
    header = path NUL dtype-name NUL comma-joined-shape NUL and data is the
    little-endian C-order bytes; root = sha256("jpr-pytree-sha256-v1" ||
    for each leaf in tree order: u64le(len(path)) || path || leaf digest).
    """
    root = hashlib.sha256(b"jpr-pytree-sha256-v1")
    for path, dtype_name, shape, data in leaves:
        header = f"{path}\0{dtype_name}\0{','.join(str(n) for n in shape)}\0".encode()
        leaf = hashlib.sha256(len(header).to_bytes(8, "little") + header + data).digest()
        root.update(len(path.encode()).to_bytes(8, "little") + path.encode() + leaf)
    return root.hexdigest()


def test_known_answer_scalar():
    assert hash_pytree({"w": np.float32(0.0)}) == _expected_root(
        [("w", "float32", (), b"\x00\x00\x00\x00")]
    )


def test_known_answer_nested_tree_with_key_and_bigendian_leaf():
    tree = {
        "b": [np.arange(6, dtype=">i2").reshape(2, 3), 1.5],
        "a": {"k": jax.random.key(7, impl="threefry2x32")},
    }
    import struct

    int16_le = b"".join(struct.pack("<h", i) for i in range(6))
    expected = _expected_root(
        [  # dict keys are visited in sorted order, list items in order
            ("a/k", "key<threefry2x32>", (2,), struct.pack("<2I", 0, 7)),
            ("b/0", "int16", (2, 3), int16_le),
            ("b/1", "float64", (), struct.pack("<d", 1.5)),
        ]
    )
    assert hash_pytree(tree) == expected


def test_leaf_hashes_are_the_leaf_digests():
    x = np.arange(4, dtype=np.uint8)
    header = b"p/q\x00uint8\x004\x00"
    expected = hashlib.sha256(len(header).to_bytes(8, "little") + header + bytes(range(4)))
    assert leaf_hashes({"p": {"q": x}}) == {"p/q": expected.hexdigest()}


def test_hash_is_64_hex_digits():
    digest = hash_pytree({"a": np.zeros(3)})
    assert len(digest) == 64
    int(digest, 16)


# ---------------------------------------------------------------- what makes a difference


def test_shape_matters_even_with_equal_bytes():
    a, b = np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32)
    assert a.tobytes() == b.tobytes()
    assert h(a) != h(b)
    assert h(np.zeros((6,), np.float32)) not in (h(a), h(b))


def test_dtype_matters_even_with_equal_bytes():
    a = np.zeros(4, np.float32)
    assert h(a) != h(a.view(np.int32))
    assert h(a) != h(a.view(np.uint32))
    assert h(np.float32(1.5)) != h(np.float64(1.5))


def test_path_matters():
    x = np.ones(3)
    assert hash_pytree({"a": x}) != hash_pytree({"b": x})
    assert hash_pytree({"a": x, "b": 2 * x}) != hash_pytree({"a": 2 * x, "b": x})
    assert hash_pytree([x, 2 * x]) != hash_pytree([2 * x, x])
    assert hash_pytree({"a": x}) != hash_pytree({"a": x, "b": x})


def test_zero_d_arrays():
    assert h(np.array(1.0, np.float32)) == h(np.float32(1.0))
    assert h(np.array(1.0, np.float32)) != h(np.array([1.0], np.float32))
    assert h(jnp.array(1.0, jnp.float32)) == h(np.float32(1.0))


def test_signed_zero_and_nan_payloads_are_different_values():
    assert h(np.float32(-0.0)) != h(np.float32(0.0))
    quiet, payload = f32_from_bits(0x7FC00000), f32_from_bits(0x7FC00001)
    assert np.isnan(quiet).all() and np.isnan(payload).all()
    assert h(quiet) != h(payload)
    assert h(quiet) == h(f32_from_bits(0x7FC00000))


def test_one_bit_changes_the_hash():
    a = np.linspace(0, 1, 1000, dtype=np.float32)
    b = a.copy()
    b.view(np.uint32)[500] ^= 1
    assert h(a) != h(b)


# ---------------------------------------------------------------- what does not


def test_non_contiguous_equals_contiguous():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[:, ::2]
    assert not view.flags.c_contiguous
    assert h(view) == h(np.ascontiguousarray(view))
    fortran = np.asfortranarray(base)
    assert not fortran.flags.c_contiguous
    assert h(fortran) == h(base)
    assert h(base.T) == h(np.ascontiguousarray(base.T))


@pytest.mark.parametrize("dtype", ["f4", "f8", "i2", "i4", "i8", "u4", "c8"])
def test_big_endian_equals_little_endian(dtype):
    little = np.arange(12, dtype="<" + dtype).reshape(3, 4)
    big = little.astype(">" + dtype)
    assert big.tobytes() != little.tobytes()
    assert h(big) == h(little)
    name, arr = canonical_array(big)
    assert name == little.dtype.name and arr.dtype == little.dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_jax_and_numpy_arrays_of_the_same_value_hash_equal(dtype):
    x = jnp.arange(12).reshape(3, 4).astype(dtype)
    assert h(x) == h(np.asarray(x))


def test_python_and_numpy_scalars():
    assert h(3) == h(np.int64(3))
    assert h(1.5) == h(np.float64(1.5))
    assert h(True) == h(np.bool_(True))
    assert h(1 + 2j) == h(np.complex128(1 + 2j))
    assert h(True) != h(1)
    assert h(1) != h(1.0)
    assert h(np.int32(3)) != h(3)


def test_python_ints_beyond_int64_are_refused():
    with pytest.raises(OverflowError, match="int64"):
        h(2**63)
    assert h(2**63 - 1) == h(np.int64(2**63 - 1))


def test_objects_are_refused():
    with pytest.raises(TypeError, match="cannot hash"):
        h(object())


# ---------------------------------------------------------------- bfloat16 and keys


def test_bfloat16_is_named_and_hashed_by_bits():
    x = jnp.asarray([1.0, -2.5, 0.0], jnp.bfloat16)
    name, arr = canonical_array(x)
    assert name == "bfloat16"
    assert arr.dtype.itemsize == 2
    assert h(x) == h(np.asarray([1.0, -2.5, 0.0], ml_dtypes.bfloat16))
    # Same 16-bit patterns read as float16 or uint16 are other values.
    assert h(x) != h(np.asarray(x).view(np.float16))
    assert h(x) != h(np.asarray(x).view(np.uint16))
    assert h(x) != h(x.astype(jnp.float32))


def test_typed_keys_hash_through_key_data_and_impl():
    k = jax.random.key(3)
    assert h(k) == h(jax.random.key(3))
    assert h(k) != h(jax.random.key(4))
    # The same words under another name would be another key: the impl is hashed.
    assert h(k) != h(jax.random.key_data(k))
    rbg_words = jax.random.key_data(jax.random.key(3, impl="rbg"))
    rbg = jax.random.wrap_key_data(rbg_words, impl="rbg")
    unsafe = jax.random.wrap_key_data(rbg_words, impl="unsafe_rbg")
    assert h(rbg) != h(unsafe)
    assert h(rbg) != h(k)
    name, _ = canonical_array(rbg)
    assert name == "key<rbg>"


def test_key_arrays_hash_all_their_keys():
    ks = jax.random.split(jax.random.key(0), 3)
    other = ks.at[2].set(jax.random.key(9))
    assert h(ks) != h(other)
    assert h(ks) == h(jax.random.split(jax.random.key(0), 3))


# ---------------------------------------------------------------- parallel and per-leaf


def test_parallel_hashing_equals_serial():
    rng = np.random.default_rng(0)
    tree = {f"w{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(8)}
    assert sum(x.nbytes for x in tree.values()) > 1 << 20  # above the threading threshold
    serial, parallel = hash_pytree(tree, workers=1), hash_pytree(tree, workers=2)
    assert serial == parallel == hash_pytree(tree)
    assert leaf_hashes(tree, workers=1) == leaf_hashes(tree, workers=2)
    assert list(leaf_hashes(tree, workers=2)) == sorted(tree)  # tree order kept


def test_leaf_hashes_name_the_leaf_that_differs():
    a = {"params": {"fc1": {"kernel": np.ones((4, 4)), "bias": np.zeros(4)},
                    "fc2": {"kernel": np.ones((4, 2)), "bias": np.zeros(2)}}}
    b = jax.tree.map(np.copy, a)
    b["params"]["fc2"]["bias"][1] = 1e-300
    ha, hb = leaf_hashes(a), leaf_hashes(b)
    assert list(ha) == list(hb) == [
        "params/fc1/bias", "params/fc1/kernel", "params/fc2/bias", "params/fc2/kernel"
    ]
    assert [p for p in ha if ha[p] != hb[p]] == ["params/fc2/bias"]
    assert hash_pytree(a) != hash_pytree(b)


def test_root_hash_combines_leaf_hashes():
    """Equal leaf hashes and paths give an equal root; the root follows the leaves."""
    a = {"x": np.arange(3), "y": (np.ones(2), 5)}
    b = {"x": np.arange(3).astype(np.int64), "y": (np.ones(2), 5)}
    assert leaf_hashes(a) == leaf_hashes(b)
    assert hash_pytree(a) == hash_pytree(b)


def test_leaf_path_renders_keys_indices_and_attributes():
    import dataclasses

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Box:
        inner: object

    tree = {"a": [1, {"b": 2}], "c": Box(inner=(3,))}
    paths = [leaf_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == ["a/0", "a/1/b", "c/inner/0"]


def test_empty_tree_has_a_hash():
    assert hash_pytree({}) == hashlib.sha256(b"jpr-pytree-sha256-v1").hexdigest()
    assert leaf_hashes({}) == {}


def test_a_slash_inside_a_key_is_not_a_level_of_nesting():
    x = np.arange(3, dtype=np.float32)
    nested, flat = {"a": {"b": x}}, {"a/b": x}
    assert hash_pytree(nested) != hash_pytree(flat)
    assert list(leaf_hashes(nested)) == ["a/b"]
    assert list(leaf_hashes(flat)) == ["a%2Fb"]
    assert hash_pytree({"a%2Fb": x}) != hash_pytree(flat)
