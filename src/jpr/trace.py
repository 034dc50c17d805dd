"""A trace of any training loop: per-step hashes that ``jpr compare`` reads.

A :class:`Tracer` is called once per step with whatever the loop wants
compared (the params, or the whole state) and the loss. It records
``(step, loss, hash, per-leaf hashes)`` every ``every`` steps and, on
:meth:`Tracer.close`, writes a record of schema ``jpr.trace/1``: the same
family as ``jpr run``'s records, with the environment, so ``jpr compare`` on
two traces names the first step at which they part and the leaves that differ
there::

    tracer = jpr.Tracer("runs/a.json", config={"seed": 0, "lr": 1e-3})
    for t in range(steps):
        state, loss = train_step(state, t)
        tracer.step(t + 1, nnx.state(model, nnx.Param), loss=loss)
    tracer.close()

Hashing overlaps the device: :meth:`Tracer.step` only hands the arrays to one
worker thread, which reads them (waiting for the device there, not in the
loop) and hashes them (``hashlib`` releases the GIL) while the loop dispatches
the next step. Entries are recorded in the order they were given. The arrays
are read after :meth:`Tracer.step` returns: a step that donates its inputs
(``donate_argnums``) must be traced with a copy.
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

__all__ = ["TRACE_SCHEMA", "Tracer", "trace_entry"]


def _loss_hex(loss: Any) -> str | None:
    return None if loss is None else float(np.asarray(loss)).hex()


def trace_entry(step: int, tree: Any, *, loss: Any = None) -> dict[str, Any]:
    """One trajectory entry: the step, the loss (exact, as a hex float), and hashes.

    Example:
        >>> import numpy as np
        >>> from jpr.trace import trace_entry
        >>> e = trace_entry(3, {"w": np.zeros(2, np.float32)}, loss=np.float32(0.5))
        >>> e["step"], e["loss"], list(e["leaves"])
        (3, '0x1.0000000000000p-1', ['w'])
    """
    params_hash, leaves = hashing.hash_pytree_and_leaves(tree)
    return {"step": step, "loss": _loss_hex(loss), "params_hash": params_hash, "leaves": leaves}


def _stacked_entries(first: int, rows: list[int], trees: Any, losses: Any) -> list[dict]:
    import jax

    losses = None if losses is None else np.asarray(losses)
    digests = hashing.hash_slices(jax.tree_util.tree_map(np.asarray, trees), rows)
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
    """Records per-step hashes of a training loop and writes a ``jpr.trace/1`` record.

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
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise JprError(f"every must be a positive integer, got {every!r}")
        self.path = None if path is None else Path(path)
        self.config = dict(config or {})
        self.every, self.last_step = every, last_step
        self._done: list[dict[str, Any]] = list(entries or [])
        self._futures: list[Future] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpr-trace")
        self._final: Any = None

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

        Returns at once: the arrays are read and hashed on the worker thread.
        """
        if self.wants(step):
            self._submit(lambda: [trace_entry(step, tree, loss=loss)])

    def stacked(self, first: int, trees: Any, *, losses: Any = None, count: int) -> None:
        """Record ``count`` steps whose trees are stacked along a leading axis.

        For a loop that fuses steps into one dispatch (``jax.lax.scan``): row
        ``i`` of every leaf of ``trees`` (and ``losses[i]``) is the state after
        step ``first + i``. Only the rows :meth:`wants` are read and hashed;
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
            self._submit(lambda: _stacked_entries(first, rows, trees, losses))

    def final(self, tree: Any) -> None:
        """The final state, whose hash and leaves the record carries (default: the last entry's)."""
        self._final = tree

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
            >>> r["schema"], r["steps"], r["hash"] == r["trajectory"][-1]["params_hash"]
            ('jpr.trace/1', 0, True)
        """
        from jpr.config import fingerprint
        from jpr.envinfo import environment

        trajectory = self.entries()
        if not trajectory and self._final is None:
            raise JprError("nothing was traced: call Tracer.step at least once")
        last = trajectory[-1] if trajectory else {"step": 0, "loss": None}
        if self._final is not None:
            final_hash, final_leaves = hashing.hash_pytree_and_leaves(self._final)
        else:
            final_hash, final_leaves = last["params_hash"], last["leaves"]
        return {
            "schema": TRACE_SCHEMA,
            "hash": last.get("params_hash", final_hash),
            "state_hash": final_hash,
            "steps": last["step"],
            "final": {"train_loss_hex": last["loss"]},
            "config": self.config,
            "config_fingerprint": fingerprint(self.config),
            "leaf_hashes": final_leaves,
            "trace_every": self.every,
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
