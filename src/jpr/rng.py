"""Explicit, typed PRNG keys that are a pure function of (seed, stream, step).

The key contract of jpr::

    root       = jax.random.key(seed)                  # typed key, threefry2x32
    stream key = fold_in(root, stable_id(name))        # "params", "dropout", "data", ...
    step key   = fold_in(stream key, step)             # pure function of (seed, stream, step)
    microbatch = fold_in(step key, microbatch_index)   # never the device or process index
    host key   = fold_in(key, jax.process_index())     # ONLY for per-host quantities

Because a step's key depends only on (seed, stream, step) and never on how many
times a key was split before, resuming a run needs nothing but the step number.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

__all__ = [
    "IMPL",
    "host_key",
    "key_fingerprint",
    "key_from_data",
    "key_to_data",
    "microbatch_key",
    "root_key",
    "stable_id",
    "step_key",
    "stream_key",
]

#: The PRNG implementation jpr uses for every key it makes: JAX's default, whose
#: bits JAX documents as identical across CPU/GPU/TPU and across shardings (as
#: are Philox's). Not across JAX versions: JAX promises only the distributions
#: of ``jax.random``, so the values are a property of the pinned version.
IMPL = "threefry2x32"


def stable_id(name: str) -> int:
    """Map a stream name to a 31-bit integer that is the same in every process.

    Python's ``hash()`` is salted per process (``PYTHONHASHSEED``), so two hosts
    would fold different numbers into the "same" stream. A cryptographic digest
    is the same everywhere, forever.

    Args:
        name: the stream name, e.g. ``"dropout"``.

    Returns:
        The first four bytes of ``sha256(name)``, little-endian, with the top bit
        cleared so the value fits any int32 or uint32 argument.

    Example:
        >>> from jpr.rng import stable_id
        >>> stable_id("dropout")
        688540699
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"stream name must be a non-empty string, got {name!r}")
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def root_key(seed: int) -> jax.Array:
    """The typed root key of a run.

    Args:
        seed: a non-negative integer below ``2**32``.

    Returns:
        A typed key array (``key<fry>`` dtype) made by ``jax.random.key``.

    Example:
        >>> from jpr.rng import root_key
        >>> root_key(0).dtype
        key<fry>
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return jax.random.key(int(seed), impl=IMPL)


def stream_key(root: jax.Array, name: str) -> jax.Array:
    """The key of a named stream: ``fold_in(root, stable_id(name))``.

    Args:
        root: the run's root key.
        name: the stream name, e.g. ``"params"``, ``"dropout"`` or ``"data"``.

    Example:
        >>> from jpr.rng import root_key, stream_key
        >>> a = stream_key(root_key(0), "dropout")
        >>> b = stream_key(root_key(0), "data")
        >>> bool((jax.random.key_data(a) != jax.random.key_data(b)).any())
        True
    """
    return jax.random.fold_in(root, stable_id(name))


def step_key(root: jax.Array, name: str, step: int | jax.Array) -> jax.Array:
    """The key of stream ``name`` at training step ``step``.

    It is a pure function of (seed, stream, step): it does not depend on how
    many steps ran before in this process, which is what makes resume exact.

    Args:
        root: the run's root key.
        name: the stream name.
        step: the step number (a Python int or a traced integer), below ``2**32``.

    Example:
        >>> from jpr.rng import root_key, step_key
        >>> k = step_key(root_key(0), "dropout", 7)
        >>> k.shape, str(k.dtype)
        ((), 'key<fry>')
    """
    return jax.random.fold_in(stream_key(root, name), step)


def microbatch_key(key: jax.Array, index: int | jax.Array) -> jax.Array:
    """The key of microbatch ``index`` within a step: ``fold_in(key, index)``.

    The index is the microbatch's position in the global batch, never a device
    or process index, so the draws do not depend on how the work is spread.

    Example:
        >>> from jpr.rng import microbatch_key, root_key, step_key
        >>> k = microbatch_key(step_key(root_key(0), "dropout", 3), 1)
        >>> k.shape
        ()
    """
    return jax.random.fold_in(key, index)


def host_key(key: jax.Array, process_index: int | None = None) -> jax.Array:
    """A per-host key: ``fold_in(key, process_index)``.

    Use it only for quantities that *should* differ between hosts (for example
    per-host data augmentation). Never derive parameters from it: every host must
    initialise the model from the same key.

    Args:
        key: the key to specialise.
        process_index: defaults to ``jax.process_index()``.

    Example:
        >>> from jpr.rng import host_key, root_key
        >>> a, b = host_key(root_key(0), 0), host_key(root_key(0), 1)
        >>> bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
        False
    """
    if process_index is None:
        process_index = jax.process_index()
    return jax.random.fold_in(key, process_index)


def key_to_data(key: jax.Array) -> dict:
    """Serialise a typed key to plain data: ``{"impl": str, "data": [uint32, ...]}``.

    Typed keys cannot go through ``np.asarray``; ``jax.random.key_data`` gives
    their raw ``uint32`` words, and the impl name says how to read them back.

    Example:
        >>> from jpr.rng import key_to_data, root_key
        >>> key_to_data(root_key(42))
        {'impl': 'threefry2x32', 'shape': [], 'data': [0, 42]}
    """
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError(f"expected a typed PRNG key, got dtype {key.dtype}")
    data = np.asarray(jax.random.key_data(key))
    return {
        "impl": str(jax.random.key_impl(key)),
        "shape": list(key.shape),
        "data": [int(v) for v in data.reshape(-1)],
    }


def key_from_data(d: dict) -> jax.Array:
    """Rebuild a typed key from :func:`key_to_data`'s output.

    Example:
        >>> from jpr.rng import key_from_data, key_to_data, root_key
        >>> k = root_key(42)
        >>> k2 = key_from_data(key_to_data(k))
        >>> bool((jax.random.key_data(k) == jax.random.key_data(k2)).all())
        True
    """
    try:
        impl = d["impl"]
        shape = tuple(d["shape"])
        words = np.asarray(d["data"], dtype=np.uint32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a serialised key: {e}") from None
    probe = jax.random.key(0, impl=impl)
    word_shape = jax.random.key_data(probe).shape
    return jax.random.wrap_key_data(words.reshape(shape + word_shape), impl=impl)


def key_fingerprint(key: jax.Array) -> str:
    """A short, stable fingerprint of a key (16 hex digits of its SHA-256).

    Example:
        >>> from jpr.rng import key_fingerprint, root_key
        >>> len(key_fingerprint(root_key(0)))
        16
    """
    d = key_to_data(key)
    blob = f"{d['impl']}:{d['shape']}:{d['data']}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]
