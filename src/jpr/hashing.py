"""Canonical cryptographic hashes of pytrees.

Each leaf is hashed over a header (tree path, dtype *name*, shape) followed by
its little-endian, C-order bytes, so ``zeros((2, 3))`` and ``zeros((3, 2))``
hash differently although their bytes are equal. Typed PRNG keys are hashed
through ``jax.random.key_data`` plus the impl name. The leaf digests are then
combined Merkle-style into one root digest, which gives two things at once:
:func:`leaf_hashes` can name the leaf that differs between two runs, and leaves
can be hashed on several threads (``hashlib`` releases the GIL).

Hashes are bitwise: ``-0.0`` and ``0.0``, or two NaNs with different payloads,
are different values and hash differently.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["canonical_array", "hash_pytree", "leaf_hashes", "leaf_path"]

#: Bumped whenever the canonical form changes, so old and new digests never collide.
SCHEME = b"jpr-pytree-sha256-v1"

# Below this many bytes in total, threads cost more than they save.
_PARALLEL_MIN_BYTES = 1 << 20


def leaf_path(path: Iterable[Any]) -> str:
    """Render a JAX key path as ``a/b/0/c``.

    Example:
        >>> import jax
        >>> from jpr.hashing import leaf_path
        >>> [leaf_path(p) for p, _ in jax.tree_util.tree_leaves_with_path({"w": [1, 2]})]
        ['w/0', 'w/1']
    """
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    import jax

    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def canonical_array(x: Any) -> tuple[str, np.ndarray]:
    """The canonical ``(dtype name, little-endian C-contiguous array)`` of a leaf.

    Python scalars become NumPy scalars of NumPy's default dtype (``int64``,
    ``float64``, ``bool``, ``complex128``). Typed keys become
    ``"key<impl>"`` and their ``uint32`` key data.

    Example:
        >>> import numpy as np
        >>> from jpr.hashing import canonical_array
        >>> name, arr = canonical_array(np.arange(3, dtype=">i4"))
        >>> name, arr.dtype.str
        ('int32', '<i4')
    """
    if _is_key(x):
        import jax

        name = f"key<{jax.random.key_impl(x)}>"
        arr = np.asarray(jax.random.key_data(x))
    else:
        if type(x) is int and not -(2**63) <= x < 2**63:
            raise OverflowError(f"integer leaf {x} does not fit in int64")
        arr = np.asarray(x)
        if arr.dtype == object:
            raise TypeError(f"cannot hash a leaf of type {type(x).__name__}")
        name = arr.dtype.name
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # ascontiguousarray alone would turn a 0-d array into shape (1,).
    return name, np.ascontiguousarray(arr).reshape(arr.shape)


def _leaf_digest(path: str, x: Any) -> bytes:
    name, arr = canonical_array(x)
    h = hashlib.sha256()
    header = f"{path}\x00{name}\x00{','.join(map(str, arr.shape))}\x00".encode()
    h.update(len(header).to_bytes(8, "little"))
    h.update(header)
    # memoryview of a contiguous array: no copy, and hashlib drops the GIL.
    h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return h.digest()


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(leaf_path(p), x) for p, x in leaves]


def _digests(tree: Any, workers: int | None) -> list[tuple[str, bytes]]:
    leaves = _flatten(tree)
    total = sum(getattr(x, "nbytes", 8) for _, x in leaves)
    if workers is None:
        workers = min(len(leaves), os.cpu_count() or 1)
    if workers <= 1 or len(leaves) < 2 or total < _PARALLEL_MIN_BYTES:
        return [(p, _leaf_digest(p, x)) for p, x in leaves]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda item: _leaf_digest(*item), leaves)
        return [(p, d) for (p, _), d in zip(leaves, digests, strict=True)]


def leaf_hashes(tree: Any, *, workers: int | None = None) -> dict[str, str]:
    """SHA-256 of every leaf, keyed by its path, in tree order.

    Args:
        tree: any pytree of arrays, NumPy or Python scalars and typed keys.
        workers: threads to hash with; defaults to the number of CPUs.

    Example:
        >>> import numpy as np
        >>> from jpr.hashing import leaf_hashes
        >>> h = leaf_hashes({"a": np.zeros((2, 3)), "b": np.zeros((3, 2))})
        >>> list(h), h["a"] != h["b"]
        (['a', 'b'], True)
    """
    return {p: d.hex() for p, d in _digests(tree, workers)}


def hash_pytree(tree: Any, *, workers: int | None = None) -> str:
    """The canonical SHA-256 of a pytree, as 64 hex digits.

    The root digest covers the scheme version, every leaf's path and every
    leaf's digest, in tree order: renaming, reshaping, re-typing or changing one
    bit of any leaf changes it.

    Args:
        tree: any pytree of arrays, NumPy or Python scalars and typed keys.
        workers: threads to hash with; defaults to the number of CPUs.

    Example:
        >>> import numpy as np
        >>> from jpr.hashing import hash_pytree
        >>> hash_pytree({"w": np.float32(0.0)})[:16]
        'e6bbe86b9343ecdb'
        >>> hash_pytree({"w": np.float32(-0.0)}) == hash_pytree({"w": np.float32(0.0)})
        False
    """
    root = hashlib.sha256(SCHEME)
    for path, digest in _digests(tree, workers):
        p = path.encode()
        root.update(len(p).to_bytes(8, "little"))
        root.update(p)
        root.update(digest)
    return root.hexdigest()
