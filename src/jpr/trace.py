"""A trace of any training loop: per-step digests that ``jpr compare`` reads.

A :class:`Tracer` is called once per step with whatever the loop wants
compared (the params, or the whole state) and the loss. It records
``(step, loss, digest, per-leaf digests)`` every ``every`` steps and, on
:meth:`Tracer.close`, writes a record of schema ``jpr.trace/1``: the same
family as ``jpr run``'s records, with the environment, so ``jpr compare`` on
two traces names the first step at which they part and the leaves that differ
there::

    tracer = jpr.Tracer("runs/a.json", config={"seed": 0, "lr": 1e-3})
    for t in range(steps):
        train_step(model, optimizer, batch)          # updates the model in place
        tracer.step(t + 1, nnx.state(model), loss=loss)
    tracer.close()

What is recorded is the state at the moment :meth:`Tracer.step` is called:
it takes the tree's leaves before it returns (:func:`snapshot`: JAX arrays are
immutable, so keeping them is enough; NumPy arrays are copied), so a model
updated in place afterwards (an ``nnx.state`` holds the model's live
``Variable`` objects) cannot leak a later step into an earlier entry. Only the
reading and digesting are deferred: one worker thread waits for the device and
digests while the loop dispatches the next step. A step that donates its
inputs (``donate_argnums``) deletes arrays the worker has yet to read: trace a
copy there (the worker says so if it meets a deleted array).

Per-step entries are digested with XXH3-128 (:data:`jpr.hashing.FINGERPRINT_SCHEME`,
about 20 times cheaper than SHA-256); the record's final hashes (``hash``,
``state_hash``, ``leaf_hashes``) are SHA-256, the same canonical hashes as
``jpr run`` records and checkpoints. ``Tracer(digest="sha256")`` makes every
entry SHA-256 too (what ``jpr run`` uses, so its checkpoints keep one kind).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jpr import hashing
from jpr.errors import JprError
from jpr.record import TRACE_SCHEMA

__all__ = ["DIGESTS", "TRACE_SCHEMA", "Tracer", "snapshot", "trace_entry"]

#: ``Tracer(digest=...)``: the scheme of each kind of per-step digest.
DIGESTS = {"xxh3": hashing.FINGERPRINT_SCHEME, "sha256": hashing.SCHEME}

Pairs = list[tuple[str, Any]]


def _loss_hex(loss: Any) -> str | None:
    return None if loss is None else float(np.asarray(loss)).hex()


def _frozen(x: Any) -> Any:
    """``x`` as it is now: a JAX array as is (immutable), anything else copied."""
    if type(x).__module__.startswith(("jax", "jaxlib")) and hasattr(x, "is_deleted"):
        return x
    if isinstance(x, np.generic | int | float | bool | complex):
        return x
    return np.array(x, copy=True)


def snapshot(tree: Any) -> Pairs:
    """The leaves of ``tree`` as they are at this call: ``[(path, leaf), ...]``.

    JAX arrays are immutable and kept as they are (no copy, no wait for the
    device); NumPy arrays and other array-likes are copied. A model updated in
    place later (an ``nnx.Variable`` gets a new array) does not change what
    was taken. Paths are those of :func:`jpr.hashing.leaf_path`.

    Example:
        >>> import numpy as np
        >>> from jpr.trace import snapshot
        >>> w = np.zeros(2)
        >>> taken = snapshot({"w": w})
        >>> w += 1  # changed in place after the snapshot
        >>> taken[0][0], taken[0][1].tolist()
        ('w', [0.0, 0.0])
    """
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    try:
        paths = _PATHS.get(treedef)
    except TypeError:  # a pytree whose static data cannot be hashed: name its leaves each time
        return [(p, _frozen(x)) for p, x in hashing._flatten(tree)]
    if paths is None:  # once per tree structure: naming the leaves costs more than taking them
        if len(_PATHS) >= _MAX_STRUCTURES:  # structures whose static data never compares equal
            _PATHS.clear()
        paths = _PATHS[treedef] = [p for p, _ in hashing._flatten(tree)]
    return [(p, _frozen(x)) for p, x in zip(paths, leaves, strict=True)]


# The leaf paths of each tree structure seen (a loop traces one or two).
_PATHS: dict[Any, list[str]] = {}
_MAX_STRUCTURES = 64


def _deleted(pairs: Pairs) -> str | None:
    for path, x in pairs:
        if getattr(x, "is_deleted", lambda: False)():
            return path
    return None


def _entry(step: int, pairs: Pairs, loss: Any, scheme: bytes) -> dict[str, Any]:
    gone = _deleted(pairs)
    if gone is not None:
        raise JprError(
            f"step {step}: leaf {gone} was deleted (donated to a later step) before it was "
            "read; trace a copy of what a step donates"
        )
    if scheme == hashing.SCHEME:
        digest, leaves = hashing.hash_pairs(pairs, workers=None)
    else:
        digest, leaves = hashing.fingerprint_pairs(pairs)
    return {"step": step, "loss": _loss_hex(loss), "params_hash": digest, "leaves": leaves}


def trace_entry(step: int, tree: Any, *, loss: Any = None, digest: str = "sha256") -> dict:
    """One trajectory entry: the step, the loss (exact, as a hex float), and digests.

    Args:
        step: the step after which ``tree`` was taken.
        tree: any pytree of arrays.
        loss: a scalar, or ``None``.
        digest: ``"sha256"`` (the default here, as in ``jpr run`` records) or
            ``"xxh3"`` (:class:`Tracer`'s default).

    Example:
        >>> import numpy as np
        >>> from jpr.trace import trace_entry
        >>> e = trace_entry(3, {"w": np.zeros(2, np.float32)}, loss=np.float32(0.5))
        >>> e["step"], e["loss"], list(e["leaves"])
        (3, '0x1.0000000000000p-1', ['w'])
    """
    return _entry(step, snapshot(tree), loss, _scheme(digest))


def _scheme(digest: str) -> bytes:
    if digest not in DIGESTS:
        raise JprError(f"digest must be one of {sorted(DIGESTS)}, got {digest!r}")
    return DIGESTS[digest]


def _sha256_of(taken: tuple[Pairs, int | None], what: str) -> tuple[str, dict[str, str]]:
    pairs, row = taken
    gone = _deleted(pairs)
    if gone is not None:
        raise JprError(
            f"{what} was deleted (leaf {gone}, donated to a later step): "
            "call Tracer.final(state) with the state after the loop"
        )
    if row is None:
        return hashing.hash_pairs(pairs, workers=None)
    return hashing.hash_slices(None, [row], pairs=pairs)[0]


def _stacked_entries(
    first: int, rows: list[int], pairs: Pairs, losses: Any, scheme: bytes
) -> list[dict]:
    losses = None if losses is None else np.asarray(losses)
    digests = hashing.hash_slices(None, rows, scheme=scheme, pairs=pairs)
    return [
        {
            "step": first + i,
            "loss": None if losses is None else float(losses[i]).hex(),
            "params_hash": h,
            "leaves": leaves,
        }
        for i, (h, leaves) in zip(rows, digests, strict=True)
    ]


class Tracer:
    """Records per-step digests of a training loop and writes a ``jpr.trace/1`` record.

    Usable as a context manager: leaving the block without an error writes the
    record (:meth:`close`); with an error, the worker is stopped and nothing
    is written.

    Args:
        path: where :meth:`close` writes the record (JSON); ``None``: nowhere
            (:meth:`entries` and :meth:`record` still work).
        config: any JSON-able dict that decides the run's bits; it is stored
            in the record and ``jpr compare`` names the fields that differ.
        every: record every ``every``-th step (and step 0, and ``last_step``).
        last_step: a step always recorded (the last one of the run).
        entries: trajectory entries recorded before (a resumed run's, from
            its checkpoint): kept up to the first step traced here.
        digest: the per-step digest, ``"xxh3"`` (XXH3-128 per leaf, the
            default) or ``"sha256"``; the record's final hashes are SHA-256
            either way. ``jpr compare`` compares per-step entries only between
            records of the same kind.

    Example:
        >>> import numpy as np, tempfile
        >>> from jpr.trace import Tracer
        >>> path = tempfile.mkdtemp() + "/trace.json"
        >>> with Tracer(path, config={"seed": 0}, every=2) as tracer:
        ...     for t in range(1, 6):
        ...         tracer.step(t, {"w": np.full(2, t, np.float32)}, loss=np.float32(1 / t))
        >>> [e["step"] for e in tracer.entries()]
        [2, 4]
        >>> from jpr.record import read_record
        >>> read_record(path)["schema"], read_record(path)["steps"]
        ('jpr.trace/1', 4)
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        config: dict[str, Any] | None = None,
        every: int = 1,
        last_step: int | None = None,
        entries: list[dict[str, Any]] | None = None,
        digest: str = "xxh3",
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise JprError(f"every must be a positive integer, got {every!r}")
        self.path = None if path is None else Path(path)
        self.config = dict(config or {})
        self.every, self.last_step = every, last_step
        self.digest, self._scheme = digest, _scheme(digest)
        self._done: list[dict[str, Any]] = list(entries or [])
        self._futures: list[Future] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpr-trace")
        # The newest traced state and final()'s, as (leaves, row of a stacked tree or None):
        # their SHA-256 is computed once, for the record.
        self._last: tuple[Pairs, int | None] | None = None
        self._final: tuple[Pairs, int | None] | None = None

    def wants(self, step: int) -> bool:
        """Whether ``step`` is recorded: a multiple of ``every``, or ``last_step``.

        Example:
            >>> from jpr.trace import Tracer
            >>> t = Tracer(every=5, last_step=12)
            >>> [s for s in range(13) if t.wants(s)]
            [0, 5, 10, 12]
        """
        return step % self.every == 0 or step == self.last_step

    def step(self, step: int, tree: Any, *, loss: Any = None) -> None:
        """Record ``tree`` (and ``loss``) as the state after ``step``, if :meth:`wants` it.

        The leaves are taken before this returns (:func:`snapshot`); reading
        them from the device and digesting happen on the worker thread.

        Example:
            >>> import numpy as np
            >>> from jpr.trace import Tracer
            >>> tracer, w = Tracer(), np.zeros(2)
            >>> for t in (1, 2):
            ...     w += 1  # updated in place, as an NNX model is
            ...     tracer.step(t, {"w": w})
            >>> a, b = tracer.entries()
            >>> a["params_hash"] != b["params_hash"]
            True
        """
        if self.wants(step):
            pairs, loss = snapshot(tree), _frozen(loss) if loss is not None else None
            self._last = (pairs, None)
            self._submit(lambda: [_entry(step, pairs, loss, self._scheme)])

    def stacked(self, first: int, trees: Any, *, losses: Any = None, count: int) -> None:
        """Record ``count`` steps whose trees are stacked along a leading axis.

        For a loop that fuses steps into one dispatch (``jax.lax.scan``): row
        ``i`` of every leaf of ``trees`` (and ``losses[i]``) is the state after
        step ``first + i``. Only the rows :meth:`wants` are read and digested;
        the digests are those of :meth:`step` on each row.

        Example:
            >>> import numpy as np
            >>> from jpr.trace import Tracer
            >>> a, b = Tracer(), Tracer()
            >>> rows = {"w": np.arange(6.0).reshape(3, 2)}
            >>> a.stacked(1, rows, losses=np.ones(3), count=3)
            >>> for i in range(3):
            ...     b.step(1 + i, {"w": rows["w"][i]}, loss=np.float64(1.0))
            >>> a.entries() == b.entries()
            True
        """
        rows = [i for i in range(count) if self.wants(first + i)]
        if rows:
            pairs = snapshot(trees)
            losses = None if losses is None else _frozen(losses)
            last = rows[-1]
            self._last = (pairs, last)
            self._submit(lambda: _stacked_entries(first, rows, pairs, losses, self._scheme))

    def final(self, tree: Any) -> None:
        """The final state, whose SHA-256 hash and leaves the record carries.

        Default: the state of the newest traced step. Taken at this call
        (:func:`snapshot`), hashed when the record is made.
        """
        self._final = (snapshot(tree), None)

    def _submit(self, job) -> None:
        self._futures.append(self._pool.submit(job))

    def entries(self) -> list[dict[str, Any]]:
        """The trajectory so far, in step order (waits for the hashing in flight)."""
        futures, self._futures = self._futures, []
        for f in futures:
            new = f.result()
            if new and self._done and self._done[-1]["step"] >= new[0]["step"]:
                # Steps traced again (a resumed run's, after its checkpoint): the new ones win.
                self._done = [e for e in self._done if e["step"] < new[0]["step"]]
            self._done.extend(new)
        return self._done

    def record(self, **fields: Any) -> dict[str, Any]:
        """The ``jpr.trace/1`` record of the trajectory so far (``fields`` are added).

        Example:
            >>> import numpy as np
            >>> from jpr.trace import Tracer
            >>> t = Tracer(config={"seed": 1})
            >>> t.step(0, {"w": np.zeros(1)})
            >>> r = t.record()
            >>> r["schema"], r["steps"], r["step_digest"]
            ('jpr.trace/1', 0, 'jpr-pytree-xxh3-128-v1')
            >>> from jpr.hashing import hash_pytree
            >>> r["hash"] == r["state_hash"] == hash_pytree({"w": np.zeros(1)})  # SHA-256
            True
        """
        from jpr.config import fingerprint
        from jpr.envinfo import environment

        trajectory = self.entries()
        last = trajectory[-1] if trajectory else {"step": 0, "loss": None}
        newest = final = None
        if self._last is not None:
            newest = _sha256_of(self._last, "the newest traced state")
        elif trajectory and self._scheme == hashing.SCHEME:  # entries given, already SHA-256
            newest = last["params_hash"], last["leaves"]
        if self._final is not None:
            final = _sha256_of(self._final, "the state given to final()")
        if newest is None and final is None:
            raise JprError("nothing was traced: call Tracer.step (or Tracer.final) at least once")
        (last_hash, _), (final_hash, final_leaves) = newest or final, final or newest
        return {
            "schema": TRACE_SCHEMA,
            "hash": last_hash,
            "state_hash": final_hash,
            "steps": last["step"],
            "final": {"train_loss_hex": last["loss"]},
            "config": self.config,
            "config_fingerprint": fingerprint(self.config),
            "leaf_hashes": final_leaves,
            "trace_every": self.every,
            "step_digest": self._scheme.decode(),
            "trajectory": trajectory,
            "env": environment(),
            **fields,
        }

    def shutdown(self) -> None:
        """Finish the hashing in flight and stop the worker; :meth:`entries` still works."""
        self.entries()
        self._pool.shutdown(wait=True)

    def close(self, **fields: Any) -> dict[str, Any]:
        """Wait for the hashing, write the record to ``path`` (if any) and return it."""
        from jpr.record import write_json_atomic

        try:
            record = self.record(**fields)
        finally:
            self._pool.shutdown(wait=True)
        if self.path is not None:
            write_json_atomic(self.path, record)
        return record

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)
