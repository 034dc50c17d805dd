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

Two schemes share that canonical form. :data:`SCHEME` (SHA-256) names states:
run records' hashes, checkpoints, ``jpr verify``. :data:`FINGERPRINT_SCHEME`
(XXH3-128 per leaf, combined by SHA-256) is for the per-step entries of a
trace (:class:`jpr.Tracer`), where a state is digested every step and must cost
next to nothing: XXH3 reads about 27 GB/s on one core here, SHA-256 about
1.3 GB/s. It is not a cryptographic hash, which a comparison of two runs of the
same program does not need; any one-bit change of a leaf changes it (tested on
every bit of several leaves in ``tests/test_hashing.py``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xxhash

__all__ = [
    "FINGERPRINT_SCHEME",
    "SCHEME",
    "canonical_array",
    "fingerprint_pairs",
    "hash_pairs",
    "hash_pytree",
    "hash_pytree_and_leaves",
    "hash_slices",
    "leaf_hashes",
    "leaf_path",
]

#: Bumped whenever the canonical form changes, so old and new digests never collide.
SCHEME = b"jpr-pytree-sha256-v1"
#: Per-step trace digests: XXH3-128 of each leaf's header and bytes, SHA-256 over those.
FINGERPRINT_SCHEME = b"jpr-pytree-xxh3-128-v1"

# The hasher each scheme starts every leaf with (both take bytes, copy and update).
_LEAF_HASHERS = {SCHEME: hashlib.sha256, FINGERPRINT_SCHEME: xxhash.xxh3_128}

# Below this many bytes in total, threads cost more than they save.
_PARALLEL_MIN_BYTES = 1 << 20


def leaf_path(path: Iterable[Any]) -> str:
    """Render a JAX key path as ``a/b/0/c``.

    A ``/`` or ``%`` inside one key is escaped (``%2F``, ``%25``), so the
    leaves of ``{"a": {"b": x}}`` and ``{"a/b": x}`` get different paths, and
    so different hashes. Paths name keys and indices, not container types: a
    tuple and a list holding the same leaves have the same paths.

    Example:
        >>> import jax
        >>> from jpr.hashing import leaf_path
        >>> [leaf_path(p) for p, _ in jax.tree_util.tree_leaves_with_path({"w": [1, 2]})]
        ['w/0', 'w/1']
        >>> [leaf_path(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a/b": 1})]
        ['a%2Fb']
    """
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                part = str(getattr(entry, attr))
                break
        else:
            part = str(entry)
        parts.append(part.replace("%", "%25").replace("/", "%2F"))
    return "/".join(parts)


def _is_key(x: Any) -> bool:
    if isinstance(x, np.ndarray | np.generic):  # NumPy has no key dtypes: skip importing JAX
        return False
    dtype = getattr(x, "dtype", None)
    if dtype is None or isinstance(dtype, np.dtype):  # a key's dtype is JAX's own, never NumPy's
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
    if arr.flags.c_contiguous:  # the common case, a JAX array read without a copy
        return name, arr
    # ascontiguousarray alone would turn a 0-d array into shape (1,).
    return name, np.ascontiguousarray(arr).reshape(arr.shape)


def _leaf_digest(path: str, x: Any, scheme: bytes = SCHEME) -> bytes:
    name, arr = canonical_array(x)
    header = _header(path, name, arr.shape)
    h = _LEAF_HASHERS[scheme](len(header).to_bytes(8, "little"))
    h.update(header)
    # memoryview of a contiguous array: no copy, and both hashers drop the GIL.
    h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return h.digest()


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(leaf_path(p), x) for p, x in leaves]


def _cpus() -> int:
    # The CPUs this process may run on (taskset, cgroups), not all of the machine's.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _digests(
    tree: Any, workers: int | None, *, pairs: list | None = None, scheme: bytes = SCHEME
) -> list[tuple[str, bytes]]:
    leaves = _flatten(tree) if pairs is None else pairs
    total = sum(getattr(x, "nbytes", 8) for _, x in leaves)
    if workers is None:
        workers = min(len(leaves), _cpus())
    if workers <= 1 or len(leaves) < 2 or total < _PARALLEL_MIN_BYTES:
        return [(p, _leaf_digest(p, x, scheme)) for p, x in leaves]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda item: _leaf_digest(*item, scheme), leaves)
        return [(p, d) for (p, _), d in zip(leaves, digests, strict=True)]


def hash_pairs(pairs: list[tuple[str, Any]], *, workers: int | None = 1) -> tuple[str, dict]:
    """:func:`hash_pytree_and_leaves` of leaves already flattened: ``[(path, leaf), ...]``.

    For a caller that took the leaves of a tree at one moment (a snapshot of
    a model updated in place, see :func:`jpr.trace.snapshot`) and hashes them
    later.

    Example:
        >>> import numpy as np
        >>> from jpr.hashing import hash_pairs, hash_pytree_and_leaves
        >>> tree = {"a": np.arange(3), "b": np.float32(1.5)}
        >>> hash_pairs([("a", tree["a"]), ("b", tree["b"])]) == hash_pytree_and_leaves(tree)
        True
    """
    digests = _digests(None, workers, pairs=pairs)
    return _root(digests), {p: d.hex() for p, d in digests}


def fingerprint_pairs(pairs: list[tuple[str, Any]]) -> tuple[str, dict[str, str]]:
    """The per-step digest of :data:`FINGERPRINT_SCHEME`: ``(root, {path: leaf digest})``.

    The same canonical form as :func:`hash_pairs` (path, dtype name, shape,
    little-endian bytes) through XXH3-128 instead of SHA-256: 20 times faster,
    for digesting a state after every step. The root covers the scheme name,
    so a fingerprint never equals a SHA-256 hash of the same tree.

    Example:
        >>> import numpy as np
        >>> from jpr.hashing import fingerprint_pairs
        >>> root, leaves = fingerprint_pairs([("w", np.float32(0.0))])
        >>> len(root), len(leaves["w"])
        (64, 32)
        >>> fingerprint_pairs([("w", np.float32(-0.0))])[0] == root
        False
    """
    digests = _digests(None, 1, pairs=pairs, scheme=FINGERPRINT_SCHEME)
    return _root(digests, FINGERPRINT_SCHEME), {p: d.hex() for p, d in digests}


def leaf_hashes(tree: Any, *, workers: int | None = None) -> dict[str, str]:
    """SHA-256 of every leaf, keyed by its path, in tree order.

    Args:
        tree: any pytree of arrays, NumPy or Python scalars and typed keys.
        workers: threads to hash with; defaults to the number of usable CPUs.

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
        workers: threads to hash with; defaults to the number of usable CPUs.

    Example:
        >>> import numpy as np
        >>> from jpr.hashing import hash_pytree
        >>> hash_pytree({"w": np.float32(0.0)})[:16]
        'e6bbe86b9343ecdb'
        >>> hash_pytree({"w": np.float32(-0.0)}) == hash_pytree({"w": np.float32(0.0)})
        False
    """
    return _root(_digests(tree, workers))


def _root(digests: list[tuple[str, bytes]], scheme: bytes = SCHEME) -> str:
    root = hashlib.sha256(scheme)
    for path, digest in digests:
        p = path.encode()
        root.update(len(p).to_bytes(8, "little"))
        root.update(p)
        root.update(digest)
    return root.hexdigest()


def hash_pytree_and_leaves(tree: Any, *, workers: int | None = None) -> tuple[str, dict[str, str]]:
    """``(hash_pytree(tree), leaf_hashes(tree))`` for the price of one pass over the bytes.

    Args:
        tree: any pytree of arrays, NumPy or Python scalars and typed keys.
        workers: threads to hash with; defaults to the number of usable CPUs.

    Example:
        >>> import numpy as np
        >>> from jpr.hashing import hash_pytree, hash_pytree_and_leaves, leaf_hashes
        >>> tree = {"a": np.arange(3), "b": np.float32(1.5)}
        >>> hash_pytree_and_leaves(tree) == (hash_pytree(tree), leaf_hashes(tree))
        True
    """
    digests = _digests(tree, workers)
    return _root(digests), {p: d.hex() for p, d in digests}


def _header(path: str, name: str, shape: tuple[int, ...]) -> bytes:
    return f"{path}\x00{name}\x00{','.join(map(str, shape))}\x00".encode()


def hash_slices(
    tree: Any, indices: Iterable[int], *, scheme: bytes = SCHEME, pairs: list | None = None
) -> list[tuple[str, dict[str, str]]]:
    """:func:`hash_pytree_and_leaves` of ``tree[i]`` (every leaf indexed at ``i``) for each ``i``.

    For a tree whose leaves are stacked along a leading axis (the params after
    each step of a fused training chunk): the same digests as slicing the tree
    and hashing each slice, without building the slices. Each leaf's header is
    hashed once and the hasher copied for every slice, so a small tree costs a
    few microseconds a slice instead of tens.

    Args:
        tree: a pytree of arrays that all have the same leading dimension.
        indices: positions along that dimension.
        scheme: :data:`SCHEME` (SHA-256) or :data:`FINGERPRINT_SCHEME`.
        pairs: the tree's leaves already flattened, ``[(path, leaf), ...]``
            (then ``tree`` is ignored).

    Returns:
        ``[(root_hash, {leaf path: leaf hash}), ...]``, one per index.

    Example:
        >>> import numpy as np
        >>> from jpr.hashing import hash_pytree_and_leaves, hash_slices
        >>> stacked = {"w": np.arange(12.0).reshape(3, 2, 2), "b": np.zeros((3,), np.int8)}
        >>> got = hash_slices(stacked, [0, 2])
        >>> got[1] == hash_pytree_and_leaves({"w": stacked["w"][2], "b": stacked["b"][2]})
        True
    """
    prepared = []
    count = None
    for path, x in _flatten(tree) if pairs is None else pairs:
        name, arr = canonical_array(x)
        if arr.ndim < 1 or (count is not None and arr.shape[0] != count):
            raise ValueError(f"leaf {path}: expected a shared leading axis, got shape {arr.shape}")
        count = arr.shape[0]
        header = _header(path, name, arr.shape[1:])
        base = _LEAF_HASHERS[scheme](len(header).to_bytes(8, "little"))
        base.update(header)
        # Each row: one slice's bytes, no copy.
        rows = arr.reshape(count, math.prod(arr.shape[1:])).view(np.uint8)
        encoded = path.encode()
        prefix = len(encoded).to_bytes(8, "little") + encoded
        prepared.append((path, prefix, base, rows))
    out = []
    for i in indices:
        root = hashlib.sha256(scheme)
        leaves = {}
        for path, prefix, base, rows in prepared:
            h = base.copy()
            h.update(memoryview(rows[i]))
            digest = h.digest()
            root.update(prefix)
            root.update(digest)
            leaves[path] = digest.hex()
        out.append((root.hexdigest(), leaves))
    return out
