"""A canonical hash of a pytree: the same bits give the same hash, anywhere.

    python snippets/recipes/pytree_hash.py

What goes in, for every leaf in pytree order: its path, dtype and shape, and
its bytes in little-endian order (so the hash does not depend on the
machine's byte order). A typed PRNG key hashes as its key data plus the name
of its implementation (threefry2x32 and rbg keys with the same data differ).
Copy the function; it needs JAX and NumPy only.
"""

import hashlib

import jax
import numpy as np


def tree_hash(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            impl = str(jax.random.key_impl(leaf))
            leaf, kind = jax.random.key_data(leaf), f"key<{impl}>"
        else:
            kind = None
        a = np.asarray(leaf)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)  # little-endian bytes
        for part in (jax.tree_util.keystr(path), kind or str(a.dtype), str(a.shape)):
            h.update(part.encode() + b"\0")
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    tree = {"w": np.arange(6, dtype=np.int32).reshape(2, 3), "key": jax.random.key(0)}
    print(f"hash: {tree_hash(tree)}")
    big_endian = {"w": tree["w"].astype(">i4"), "key": tree["key"]}
    print(f"same values, big-endian array: same hash: {tree_hash(big_endian) == tree_hash(tree)}")
    checks = {
        "value": {**tree, "w": tree["w"] + np.int32(1)},
        "dtype": {**tree, "w": tree["w"].astype(np.int64)},
        "shape": {**tree, "w": tree["w"].reshape(3, 2)},
        "path": {"v": tree["w"], "key": tree["key"]},
        "key data": {**tree, "key": jax.random.key(1)},
    }
    for what, other in checks.items():
        print(f"changing the {what} changes the hash: {tree_hash(other) != tree_hash(tree)}")
    rbg, unsafe = (jax.random.wrap_key_data(np.zeros(4, np.uint32), impl=i)
                   for i in ("rbg", "unsafe_rbg"))  # the same key data, two impls
    print(f"changing the key impl changes the hash: {tree_hash(rbg) != tree_hash(unsafe)}")


if __name__ == "__main__":
    main()
