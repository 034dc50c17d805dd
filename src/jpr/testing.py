"""Reproducibility checks for your own test suite (pytest, or any runner).

You give two functions:

* ``init()`` returns a fresh state at step 0: any pytree (arrays, Optax state,
  typed keys, an ``nnx.State``, a dict of ints for the data position);
* ``step(state, t)`` takes the state before step ``t`` and returns
  ``(state, loss)``.

:func:`assert_reproducible` runs the loop twice and requires the same hash
after every step. :func:`assert_resume_equivalent` runs it straight, then
again with a save after step ``at``, a restore into a fresh ``init()`` state
and the rest of the steps, through jpr's verified Orbax checkpoints (or your
own ``save``/``restore``), and requires the same hash after every step. A
failure is an ``AssertionError`` that names the first step that differs and
the leaves that differ there::

    def test_training_is_reproducible():
        jpr.testing.assert_reproducible(init, step, steps=4)

    def test_resume_is_exact(tmp_path):
        jpr.testing.assert_resume_equivalent(init, step, steps=6, at=3, directory=tmp_path)

A loop that updates NNX objects in place (the Flax tutorials' style:
``train_step(model, optimizer, metrics, rngs, batch)`` under ``nnx.jit``)
gets its ``init`` and ``step`` from :func:`in_place`.

A failed resume names the root cause first: the leaves in which the restored
state already differs from the straight run's, before any step is taken (a
forgotten ``nnx.Rngs`` count, a loader position), then the first step whose
state differs; leaves are listed in the order they first differ.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jpr.compare import _first_divergence
from jpr.trace import trace_entry

__all__ = ["assert_reproducible", "assert_resume_equivalent", "in_place", "trajectory"]

State = Any
Init = Callable[[], State]
Step = Callable[[State, int], tuple[State, Any]]


def trajectory(
    step: Step,
    state: State,
    *,
    start: int = 0,
    stop: int,
    tree: Callable[[State], Any] | None = None,
) -> tuple[State, list[dict[str, Any]]]:
    """Run steps ``start .. stop - 1``; returns the state and one trace entry per step.

    Entry ``t + 1`` holds the hash of ``tree(state)`` after step ``t`` (the whole
    state by default) and the loss.

    Example:
        >>> import numpy as np
        >>> from jpr.testing import trajectory
        >>> step = lambda s, t: ({"w": s["w"] + t}, np.float32(t))
        >>> state, entries = trajectory(step, {"w": np.zeros(2)}, stop=3)
        >>> state["w"].tolist(), [e["step"] for e in entries]
        ([3.0, 3.0], [1, 2, 3])
    """
    pick = tree or (lambda s: s)
    entries = []
    for t in range(start, stop):
        state, loss = step(state, t)
        entries.append(trace_entry(t + 1, pick(state), loss=loss))
    return state, entries


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Leaves whose digests differ between two entries, in tree order."""
    la, lb = a.get("leaves", {}), b.get("leaves", {})
    return [k for k in [*la, *(k for k in lb if k not in la)] if la.get(k) != lb.get(k)]


def _shown(leaves: list[str]) -> str:
    return ", ".join(leaves[:4]) + (f" and {len(leaves) - 4} more" if len(leaves) > 4 else "")


def _check_same(what: str, a: list[dict], b: list[dict], *, cause: list[str] = ()) -> None:
    d = _first_divergence(a, b, prefix="")
    if d is None:
        return
    by_step = {e["step"]: e for e in b}
    at_first = next(_differing(e, by_step[e["step"]]) for e in a if e["step"] == d["step"])
    # In the order they first differ: the restore's own differences, then the step's.
    leaves = [*cause, *(k for k in at_first if k not in cause)]
    last = d["last_equal_step"]
    agree = "no earlier step agrees" if last is None else f"they agree up to step {last}"
    text = f"{what}: "
    if cause:
        text += f"right after the restore, before any step, the state differs in {_shown(cause)}; "
    text += f"the runs first differ after step {d['step']} ({agree})"
    text += f" in {_shown(leaves)}" if leaves else " in the loss only"
    if d["loss_a"] != d["loss_b"]:
        text += "; the loss differs too"
    raise AssertionError(text)


def assert_reproducible(
    init: Init, step: Step, *, steps: int, tree: Callable[[State], Any] | None = None
) -> list[dict[str, Any]]:
    """Two runs of ``steps`` steps from ``init()`` have the same hash after every step.

    Args:
        init: returns a fresh state.
        step: ``step(state, t) -> (state, loss)``.
        steps: how many steps to run.
        tree: what to hash (default: the whole state).

    Returns:
        The trace entries of the first run.

    Raises:
        AssertionError: names the first step that differs and its leaves.

    Example:
        >>> import numpy as np
        >>> from jpr.testing import assert_reproducible
        >>> rng = np.random.default_rng(0)  # a stream shared by both runs: the bug
        >>> step = lambda s, t: ({"w": s["w"] + rng.normal()}, None)
        >>> assert_reproducible(lambda: {"w": np.zeros(1)}, step, steps=3)
        Traceback (most recent call last):
        AssertionError: not reproducible: the runs first differ after step 1 (...) in w
    """
    _, a = trajectory(step, init(), stop=steps, tree=tree)
    _, b = trajectory(step, init(), stop=steps, tree=tree)
    _check_same("not reproducible", a, b)
    return a


def _save(state: State, directory: Path, at: int) -> None:
    from jpr.checkpoint import Checkpointer

    with Checkpointer(directory) as ckpt:
        ckpt.save_pytree(at, state)


def _restore(directory: Path, at: int, fresh: State) -> State:
    from jpr.checkpoint import Checkpointer

    with Checkpointer(directory, create=False) as ckpt:
        return ckpt.restore_pytree(at, template=fresh)[0]


def assert_resume_equivalent(
    init: Init,
    step: Step,
    *,
    steps: int,
    at: int,
    directory: str | Path | None = None,
    save: Callable[[State, Path, int], None] | None = None,
    restore: Callable[[Path, int, State], State] | None = None,
    tree: Callable[[State], Any] | None = None,
) -> list[dict[str, Any]]:
    """Stopping after step ``at`` and resuming gives the same hash after every step.

    The straight run takes ``steps`` steps. The resumed run takes ``at`` steps,
    saves, builds a fresh state with ``init()``, restores into it, and takes
    the rest; the hashes after steps ``at + 1 .. steps`` must equal the
    straight run's.

    Args:
        init: returns a fresh state (also the restore template).
        step: ``step(state, t) -> (state, loss)``.
        steps: steps in all.
        at: the step after which the run stops and resumes.
        directory: checkpoint folder (default: a temporary one, removed after).
        save: ``save(state, directory, at)``; default: a verified jpr checkpoint
            of the whole state (:meth:`jpr.Checkpointer.save_pytree`).
        restore: ``restore(directory, at, fresh_state) -> state``; default:
            :meth:`jpr.Checkpointer.restore_pytree` with the fresh state as template.
        tree: what to hash (default: the whole state).

    Returns:
        The straight run's trace entries.

    Raises:
        AssertionError: names the leaves in which the restored state differs
            from the straight run's at step ``at`` (the cause, before any step),
            then the first step that differs and its leaves.

    Example:
        >>> import numpy as np
        >>> from jpr.testing import assert_resume_equivalent
        >>> init = lambda: {"w": np.zeros(2, np.float32), "t": 0}
        >>> step = lambda s, t: ({"w": s["w"] + np.float32(t), "t": s["t"] + 1}, None)
        >>> len(assert_resume_equivalent(init, step, steps=4, at=2))
        4
    """
    if not 0 < at < steps:
        raise ValueError(f"at must be in (0, steps={steps}), got {at}")
    _, straight = trajectory(step, init(), stop=steps, tree=tree)
    state, resumed = trajectory(step, init(), stop=at, tree=tree)
    owned = directory is None
    folder = Path(tempfile.mkdtemp(prefix="jpr-resume-") if owned else directory)
    try:
        (save or _save)(state, folder, at)
        state = (restore or _restore)(folder, at, init())
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
    restored = trace_entry(at, (tree or (lambda s: s))(state))
    cause = _differing(straight[at - 1], restored)
    _, rest = trajectory(step, state, start=at, stop=steps, tree=tree)
    _check_same(f"resume after step {at} is not exact", straight, resumed + rest, cause=cause)
    return straight


def in_place(build: Callable[[], Any], step: Callable[[Any, int], Any]) -> tuple[Init, Step]:
    """``(init, step)`` for this module's checks, from a loop that updates NNX objects in place.

    The Flax NNX tutorials' loop keeps live objects (a model, an optimizer,
    metrics, a loose ``nnx.Rngs``) and an ``nnx.jit`` step that updates them
    in place. The checks here need a state they can hash, save and restore:
    ``init()`` returns ``nnx.state(build())``, and ``step(state, t)`` merges
    that state into fresh objects (no array is shared with the state passed
    in), runs your step on them and returns their new state and the loss.

    Args:
        build: returns your objects, best as a dict (``{"model": model,
            "optimizer": optimizer, "metrics": metrics, "rngs": rngs}``: its
            keys name the leaves in a failure's message).
        step: ``step(objects, t) -> loss``: step ``t`` in place, on the batch
            of step ``t`` (the batch must be a function of ``t``, or of a
            position kept in the objects, for a resume to be exact).

    Returns:
        ``(init, step)`` for :func:`assert_reproducible` and
        :func:`assert_resume_equivalent`.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> from jpr.testing import assert_resume_equivalent, in_place
        >>> def build():
        ...     return {"model": nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "rngs": nnx.Rngs(1)}
        >>> def train_step(objects, t):  # updates in place, draws from the loose rngs
        ...     model, rngs = objects["model"], objects["rngs"]
        ...     model.bias[...] += jax.random.uniform(rngs.default(), (2,))
        ...     return model.bias[...].sum()
        >>> init, step = in_place(build, train_step)
        >>> len(assert_resume_equivalent(init, step, steps=4, at=2))
        4
    """
    from flax import nnx  # only a loop written with NNX needs it

    graphdef = nnx.graphdef(build())

    def init() -> State:
        return nnx.state(build())

    def run(state: State, t: int) -> tuple[State, Any]:
        import jax

        objects = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
        loss = step(objects, t)
        return nnx.state(objects), loss

    return init, run

