"""Orbax checkpoints of any pytree, verified on restore; ``jpr run``'s are one kind.

:meth:`Checkpointer.save_pytree` and :meth:`Checkpointer.restore_pytree` take
any pytree: params, Optax state, typed PRNG keys, an ``nnx.State`` (its
``RngState`` included), a data loader's position as a dict of ints. Typed keys
are stored as their ``uint32`` words and their impl is kept in the metadata;
Python scalars come back as the Python type of the template's leaf. The
canonical hash of the tree (:func:`jpr.hashing.hash_pytree`) is stored with it
and checked on restore, and an optional config (any JSON-able dict) is
fingerprinted and checked too.

A ``jpr run`` checkpoint at step ``N`` (:meth:`Checkpointer.save`, a thin layer
over the same code) stores two Orbax items:

* ``state``: params, Adam state, the root key's raw ``uint32`` data and the step;
* ``meta`` (JSON): the config and its fingerprint, the key's impl, the data
  position, the ``state_hash`` and per-leaf hashes, the dtype and shape of
  every stored leaf, the typed-key leaves and their impls (``keys``; the same
  fields in a :meth:`~Checkpointer.save_pytree` checkpoint), the run's
  trajectory so far (so a resumed run's record is complete), and ``meta_digest``, a SHA-256
  of all of the above, so that damaged metadata is caught before its hashes
  are trusted.

Restoring re-hashes what was read and refuses anything that does not match:
a config that differs (the fields are named), a tree of another structure (the
path is named, nothing is partially restored), or bytes that changed on disk
(the step and the leaf are named, whether Orbax can still read the leaf or
not). :meth:`Checkpointer.verify` runs the same checks without a config or a
model (``jpr verify``).

Orbax writes each step into a temporary folder ``<step>.orbax-checkpoint-tmp``
and renames it when complete, so an interrupted save is never listed as a
step. The leftovers of interrupted saves found on opening
(:attr:`Checkpointer.discarded`) are removed just before the first save, so
that a run which stops before saving anything (bad input, another config)
changes nothing on disk; a read-only checkpointer never removes them.

A checkpointer that writes holds the folder's lock (:mod:`jpr.lock`) from
opening to :meth:`Checkpointer.close`: one writer per folder.

Retention (``keep``, ``keep_every``) has the meaning of Orbax's
``max_to_keep`` and ``keep_period`` (:func:`retained`), but is done here, not
by Orbax: Orbax removes old steps in place, file by file, right after the new
step is renamed, so a process killed during a removal leaves a half-deleted
folder that still looks like a complete step. Here a step is removed only once
the newest one is saved *and* read back and verified, and first renamed to
``<step>.jpr-deleting`` (atomically: from then on it is not a step), then
deleted. A removal cut short leaves such a folder, which is never listed and
is cleared away before the next save.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jpr import hashing, rng
from jpr.config import RunConfig, config_diff, fingerprint
from jpr.errors import JprError
from jpr.lock import FolderLock
from jpr.train import TrainState, state_tree

__all__ = [
    "FORMAT",
    "Checkpointer",
    "CorruptCheckpoint",
    "check_retention",
    "meta_digest",
    "retained",
]

FORMAT = "jpr.checkpoint/1"

_TMP = re.compile(r"(\d+)\.orbax-checkpoint-tmp.*")
#: A step being removed by retention: renamed first, so that it is no longer a step.
_DELETING = ".jpr-deleting"
_GONE = re.compile(r"(\d+)" + re.escape(_DELETING))


def check_retention(keep: int | None, keep_every: int | None) -> None:
    """Refuse retention settings that make no sense (one line, :class:`JprError`).

    Example:
        >>> from jpr.checkpoint import check_retention
        >>> check_retention(3, 50)
        >>> try:
        ...     check_retention(0, None)
        ... except Exception as e:
        ...     print(e)
        --keep must be at least 1, got 0
    """
    for name, value in (("--keep", keep), ("--keep-every", keep_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise JprError(f"{name} must be a whole number, got {value!r}")
        if value is not None and value < 1:
            raise JprError(f"{name} must be at least 1, got {value}")
    if keep_every is not None and keep is None:
        raise JprError("--keep-every needs --keep (without --keep every checkpoint is kept)")


def retained(steps: list[int], keep: int | None, keep_every: int | None = None) -> list[int]:
    """The steps that retention keeps: the newest ``keep``, and every multiple of ``keep_every``.

    The meaning of Orbax's ``CheckpointManagerOptions(max_to_keep=keep,
    keep_period=keep_every)`` (its ``LatestN`` and ``EveryNSteps`` policies,
    either one keeping a step): ``keep_every=K`` keeps the steps divisible by
    ``K`` (step 0 included), whether or not they are among the newest.
    ``keep=None`` keeps everything.

    Example:
        >>> from jpr.checkpoint import retained
        >>> steps = list(range(10, 101, 10))
        >>> retained(steps, 3)
        [80, 90, 100]
        >>> retained(steps, 3, 50)
        [50, 80, 90, 100]
        >>> retained(steps, None) == steps
        True
    """
    steps = sorted(steps)
    if keep is None:
        return steps
    newest = set(steps[-keep:]) if keep > 0 else set()
    return [s for s in steps if s in newest or (keep_every and s % keep_every == 0)]


def _leaf_specs(tree: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    # (dtype name, shape) of every leaf as stored on disk; works on arrays and on
    # jax.ShapeDtypeStruct alike, and reads no data.
    return {
        hashing.leaf_path(path): (np.dtype(x.dtype).name, tuple(x.shape))
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


class CorruptCheckpoint(JprError):
    """A complete checkpoint whose contents fail verification.

    Attributes:
        step: the step of the checkpoint.

    Example:
        >>> from jpr.checkpoint import CorruptCheckpoint
        >>> from jpr.errors import JprError
        >>> e = CorruptCheckpoint(8, "checkpoint step 8 is corrupt: step does not match")
        >>> e.step, isinstance(e, JprError)
        (8, True)
    """

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's metadata, its own ``meta_digest`` field left out.

    Example:
        >>> from jpr.checkpoint import meta_digest
        >>> m = {"step": 4, "state_hash": "ab"}
        >>> meta_digest(m) == meta_digest({**m, "meta_digest": "anything"})
        True
        >>> meta_digest(m) == meta_digest({**m, "step": 5})
        False
    """
    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _quiet_abandoned_reads() -> None:
    # When one array of a restore cannot be read, Orbax gives up on the others;
    # their reads finish later, on a closed event loop, and Python prints each
    # one as "Exception ignored in ...": dozens of tracebacks for one failure
    # that restore() already reports in one line. Drop exactly those echoes.
    prev = sys.unraisablehook
    if getattr(prev, "_jpr_quiet", False):
        return

    def hook(u):
        text = str(u.exc_value)
        if (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in text) or (
            "reading array index" in text
        ):
            return
        prev(u)

    hook._jpr_quiet = True
    sys.unraisablehook = hook
    # The same abandoned reads, when their coroutine objects are collected unstarted.
    warnings.filterwarnings(
        "ignore", "coroutine '_read_array_index_and_device_put' was never awaited", RuntimeWarning
    )


def _ocp():
    # Orbax takes a while to import: only runs that checkpoint pay for it.
    import orbax.checkpoint as ocp

    _quiet_abandoned_reads()
    return ocp


def _stored_tree(state: TrainState, root: jax.Array) -> dict[str, Any]:
    # What a `jpr run` checkpoint holds in Orbax (benchmarks/bench_resume.py reads it too).
    return _to_stored(state_tree(state, root))


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impls(tree: Any) -> dict[str, str]:
    """``{leaf path: impl}`` of the typed-key leaves of ``tree``."""
    return {
        hashing.leaf_path(p): str(jax.random.key_impl(x))
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if _is_key(x)
    }


def _to_stored(tree: Any) -> Any:
    """``tree`` as Orbax stores it: typed keys as their ``uint32`` words, scalars as arrays.

    NumPy copies for keys and scalars: a process-local ``jax.Array`` cannot be
    saved in a multi-process run. ``jax.Array`` leaves are saved as they are.
    """

    def stored(x):
        if _is_key(x):
            return np.asarray(jax.random.key_data(x))
        if isinstance(x, jax.Array):
            return x
        return np.asarray(x)

    return jax.tree.map(stored, tree)


def _from_stored(got: Any, template: Any, keys: dict[str, str]) -> Any:
    """Undo :func:`_to_stored`: rewrap keys, give Python scalars back their type."""

    def back(path, x, t):
        if hashing.leaf_path(path) in keys:
            return jax.random.wrap_key_data(np.asarray(x), impl=keys[hashing.leaf_path(path)])
        if type(t) in (bool, int, float):
            return type(t)(np.asarray(x).item())
        if isinstance(t, np.generic):
            return np.asarray(x)[()]
        return x

    return jax.tree_util.tree_map_with_path(back, got, template)


def _stored_keys(meta: dict[str, Any]) -> dict[str, str]:
    # Checkpoints written before "keys" existed held one key, the run's root.
    if "keys" in meta:
        return meta["keys"]
    return {"rng": meta["rng"]["impl"]} if isinstance(meta.get("rng"), dict) else {}


class Checkpointer:
    """Save, restore and verify checkpoints in ``directory``; a context manager.

    ``with Checkpointer(d) as ckpt:`` closes Orbax's resources on leaving the
    block, error or not. One checkpointer per folder and process: it is not
    thread-safe. In a multi-process run every process opens the folder and
    saves the same step (Orbax coordinates the writes).

    Args:
        directory: the checkpoint folder (one sub-folder per step).
        create: create the folder if missing (for saving); when ``False`` a
            missing folder is an error (for restoring).
        read_only: only read (``jpr verify``): the folder must exist, nothing
            in it is written or removed, and no lock is taken.
        lock: hold the folder's lock (:class:`jpr.lock.FolderLock`) until
            :meth:`close`; the default for a checkpointer that writes. Another
            writer holding it is refused (:class:`jpr.lock.FolderLocked`). In a
            multi-process run only process 0 holds it, and every process gets
            the same outcome.
        keep: after each save, keep only the newest ``keep`` complete
            checkpoints (``None``: keep all). See :func:`retained`.
        keep_every: with ``keep``, also keep every step divisible by this.

    Attributes:
        removed: the steps the last :meth:`save` removed (retention).
        lock: the :class:`jpr.lock.FolderLock` held, or ``None``.

    Example:
        >>> import tempfile
        >>> from jpr.checkpoint import Checkpointer
        >>> from jpr.config import RunConfig
        >>> from jpr.rng import root_key
        >>> from jpr.train import init_state
        >>> cfg = RunConfig(seed=0)
        >>> _, state = init_state(cfg)
        >>> with Checkpointer(tempfile.mkdtemp() + "/ckpt") as ckpt:
        ...     state_hash = ckpt.save(state, root=root_key(0), cfg=cfg)
        ...     restored, meta = ckpt.restore(0, cfg=cfg, template=state)
        ...     verified = ckpt.verify(0)["state_hash"]
        ...     steps = ckpt.steps()
        ...     held = ckpt.lock.held
        >>> steps, meta["state_hash"] == state_hash == verified, held, ckpt.lock.held
        ([0], True, True, False)
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        create: bool = True,
        read_only: bool = False,
        lock: bool | None = None,
        keep: int | None = None,
        keep_every: int | None = None,
    ):
        self.directory = Path(directory).absolute()
        #: The folder as the user named it (messages never show this machine's paths).
        self.shown = str(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise JprError(f"checkpoint dir {directory} is a file, not a folder")
        if (read_only or not create) and not self.directory.is_dir():
            raise JprError(f"checkpoint dir {directory} does not exist")
        check_retention(keep, keep_every)
        if read_only and keep is not None:
            raise JprError("a read-only checkpointer removes nothing: keep must be None")
        self.keep, self.keep_every = keep, keep_every
        self.removed: list[int] = []
        self._restored: int | None = None
        self._reader = None  # a plain PyTree reader for verify() and diagnosis
        self.last_saved_hash: str | None = None
        self.lock: FolderLock | None = None
        if (not read_only) if lock is None else (lock and not read_only):
            # Before anything in the folder is looked at: a writer's own
            # temporary folders are not this checkpointer's leftovers.
            self.lock = self._take_lock(create)
        try:
            self._open(create, read_only)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _take_lock(self, create: bool) -> FolderLock | None:
        held, error = None, None
        if jax.process_index() == 0:
            try:
                if create:
                    try:
                        self.directory.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise JprError(
                            f"cannot use checkpoint dir {self.shown}: {e.strerror or e}"
                        ) from None
                held = FolderLock(self.directory, shown=self.shown).acquire()
            except JprError as e:
                error = e
        if jax.process_count() > 1:  # every process learns process 0's outcome
            from jpr.distributed import allgather_bytes, collective_error

            text = allgather_bytes(str(error).encode() if error else b"")[0].decode()
            if text:
                if held is not None:
                    held.release()
                raise collective_error(text)
        if error is not None:
            raise error
        return held

    def _open(self, create: bool, read_only: bool) -> None:
        ocp = _ocp()
        #: Steps whose save was interrupted (an Orbax temporary folder was left):
        #: ignored, and their folders removed just before this checkpointer's first save.
        self.discarded: list[int] = [] if read_only else self.incomplete()
        #: Steps whose removal (retention) was interrupted: cleared before the first save.
        self.half_removed: list[int] = [] if read_only else self.removing()
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            max_to_keep=None,  # retention is done here: see apply_retention
            create=create and not read_only,
            read_only=read_only,
            cleanup_tmp_directories=False,  # see _remove_leftovers
        )
        try:
            self._mngr = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta")
            )
        except OSError as e:
            raise JprError(f"cannot use checkpoint dir {self.shown}: {e.strerror or e}") from None

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest(self) -> int | None:
        """The newest complete step, or ``None`` if there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def incomplete(self) -> list[int]:
        """Steps with an interrupted save: a temporary folder that was never renamed."""
        try:
            names = [p.name for p in self.directory.iterdir() if p.is_dir()]
        except OSError:
            return []
        return sorted({int(m.group(1)) for n in names if (m := _TMP.fullmatch(n))})

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save_pytree(
        self,
        step: int,
        tree: Any,
        *,
        config: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Save any pytree at ``step``; returns its canonical hash (``state_hash``).

        Args:
            step: the step number (one sub-folder per step; an existing step is an error).
            tree: arrays, NumPy or Python scalars and typed keys, in any pytree
                (dicts, tuples, Optax states, ``nnx.State``).
            config: any JSON-able dict; its fingerprint is stored, and
                :meth:`restore_pytree` given a config checks it.
            extra: JSON-able fields added to the metadata (e.g. a trace so far).

        Example:
            >>> import tempfile, jax, numpy as np
            >>> from jpr.checkpoint import Checkpointer
            >>> tree = {"w": np.ones(3, np.float32), "key": jax.random.key(0), "data": {"pos": 7}}
            >>> with Checkpointer(tempfile.mkdtemp() + "/ck") as ckpt:
            ...     h = ckpt.save_pytree(5, tree, config={"lr": 0.1})
            ...     back, meta = ckpt.restore_pytree(5, template=tree, config={"lr": 0.1})
            >>> back["data"], str(back["key"].dtype), meta["state_hash"] == h
            ({'pos': 7}, 'key<fry>', True)
        """
        meta: dict[str, Any] = {"format": FORMAT, "step": step}
        if config is not None:
            meta["config"] = config
            try:
                meta["config_fingerprint"] = fingerprint(config)
            except ValueError as e:
                raise JprError(f"cannot save step {step}: {e}") from None
        return self._save(step, tree, {**meta, **(extra or {})})

    def removing(self) -> list[int]:
        """Steps whose removal by retention was cut short (``<step>.jpr-deleting``).

        Such a folder is not a checkpoint any more (it was renamed before its
        files were deleted); the next save clears it away.
        """
        try:
            names = [p.name for p in self.directory.iterdir() if p.is_dir()]
        except OSError:
            return []
        return sorted({int(m.group(1)) for n in names if (m := _GONE.fullmatch(n))})

    def save(
        self,
        state: TrainState,
        *,
        root: jax.Array,
        cfg: RunConfig,
        trajectory: list | None = None,
        extra: dict | None = None,
    ) -> str:
        """Save a ``jpr run`` state at ``state.step``; returns its ``state_hash``.

        The step appears in :meth:`steps` only once every file is written
        (Orbax renames a temporary folder); a process killed before that leaves
        no trace but the temporary folder.
        """
        per_epoch = cfg.dataset_size // cfg.batch_size
        meta = {
            "format": FORMAT,
            "step": state.step,
            "config": cfg.to_dict(),
            "config_fingerprint": cfg.fingerprint(),
            "rng": rng.key_to_data(root),
            "data_position": {
                "next_step": state.step,
                "epoch": state.step // per_epoch,
                "batch_in_epoch": state.step % per_epoch,
            },
            "trajectory": trajectory or [],
            **(extra or {}),
        }
        return self._save(state.step, state_tree(state, root), meta)

    def _save(self, step: int, tree: Any, meta: dict[str, Any]) -> str:
        ocp = _ocp()
        state_hash, leaf_hashes = hashing.hash_pytree_and_leaves(tree)
        stored = _to_stored(tree)
        meta = {
            **meta,
            "state_hash": state_hash,
            "leaf_hashes": leaf_hashes,
            "leaf_specs": {k: [n, list(s)] for k, (n, s) in _leaf_specs(stored).items()},
            "keys": _key_impls(tree),
        }
        meta["meta_digest"] = meta_digest(meta)
        if step in self.steps():
            raise JprError(f"checkpoint step {step} already exists in {self.shown}")
        self._remove_leftovers()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(meta)
        )
        try:
            # force: Orbax would silently skip a step older than its newest one.
            done = self._mngr.save(step, args=args, force=True)
            self._mngr.wait_until_finished()
        except Exception as e:  # disk full, permissions, a folder that vanished
            raise JprError(f"cannot save step {step} to {self.shown}: {self._reason(e)}") from None
        if not done:  # pragma: no cover - Orbax declined: never report it as saved
            raise JprError(f"cannot save step {step} to {self.shown}: Orbax skipped it")
        self.last_saved_hash = state_hash
        self.removed = self.apply_retention(step)
        return state_hash

    def apply_retention(self, newest: int) -> list[int]:
        """Remove the checkpoints that ``keep``/``keep_every`` do not keep; returns them.

        Called by :meth:`save` once step ``newest`` is saved. Nothing is
        removed unless ``newest`` is first read back and verified (as
        :meth:`verify` does); ``newest`` itself, and the step this checkpointer
        restored if it is newer, are never removed. Each step is renamed to
        ``<step>.jpr-deleting`` (from then on it is not listed), then deleted:
        a process killed at any moment leaves every kept step complete.

        Raises:
            CorruptCheckpoint: ``newest`` does not read back as saved (nothing
                is removed).
        """
        if self.keep is None:
            return []
        steps = self.steps()
        keep = set(retained(steps, self.keep, self.keep_every)) | {newest}
        if self._restored is not None and self._restored > newest:
            keep.add(self._restored)
        doomed = [s for s in steps if s not in keep]
        if not doomed:
            return []
        self.verify(newest)  # on every process: Orbax's reads are collective
        if jax.process_index() == 0:
            for s in doomed:
                self._delete(s)
        if jax.process_count() > 1:  # every process sees the same steps from here on
            from jpr.distributed import allgather_bytes

            allgather_bytes(b"")
        return doomed

    def _delete(self, step: int) -> None:
        gone = self.directory / f"{step}{_DELETING}"
        if gone.exists():  # an earlier removal of a step of this number, cut short
            shutil.rmtree(gone, ignore_errors=True)
        try:
            os.rename(self.directory / str(step), gone)  # atomic: no longer a step
        except OSError as e:
            raise JprError(
                f"cannot remove step {step} from {self.shown} (--keep): {e.strerror or e}"
            ) from None
        shutil.rmtree(gone, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Remove the interrupted saves and removals found on opening (once, on process 0)."""
        leftovers, self.discarded = self.discarded, []
        halfway, self.half_removed = getattr(self, "half_removed", []), []
        if not (leftovers or halfway) or jax.process_index() != 0:
            return
        for p in self.directory.iterdir():
            m = _TMP.fullmatch(p.name)
            if m and int(m.group(1)) in leftovers and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            m = _GONE.fullmatch(p.name)
            if m and int(m.group(1)) in halfway and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of ``step`` (no arrays are read), checked against its digest.

        Raises:
            CorruptCheckpoint: unreadable, or not matching its ``meta_digest``.
            JprError: no such step, or not a jpr checkpoint.
        """
        ocp = _ocp()
        self._check_step(step)
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as e:  # Orbax raises many types for unreadable files
            raise CorruptCheckpoint(
                step, f"checkpoint step {step} is corrupt: metadata unreadable ({self._reason(e)})"
            ) from None
        self._check_meta(step, meta)
        return meta

    def _check_meta(self, step: int, meta: Any) -> None:
        if not isinstance(meta, dict):
            raise CorruptCheckpoint(step, f"checkpoint step {step} is corrupt: metadata is empty")
        if "meta_digest" not in meta and meta.get("format") != FORMAT:
            raise JprError(f"checkpoint step {step}: not a {FORMAT} checkpoint")
        if meta.get("meta_digest") != meta_digest(meta):
            raise CorruptCheckpoint(
                step,
                f"checkpoint step {step} is corrupt: its metadata does not match its "
                "meta_digest, so the hashes stored in it cannot be trusted",
            )
        if meta.get("format") != FORMAT:
            raise JprError(f"checkpoint step {step}: not a {FORMAT} checkpoint")

    def _check_step(self, step: int) -> None:
        steps = self.steps()
        if step not in steps:
            have = ", ".join(map(str, steps)) if steps else "none"
            raise JprError(f"no checkpoint at step {step} in {self.shown} (available: {have})")

    def restore_pytree(
        self, step: int, *, template: Any, config: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Read the pytree saved at ``step`` into the structure of ``template``, verified.

        Nothing is returned unless every check passes: the config (when one is
        given) has the stored fingerprint (the fields that differ are named),
        every leaf has the path, dtype and shape of the template's (the first
        that does not is named), and the tree read hashes to the stored hash
        (the changed or unreadable leaves are named).

        Args:
            step: the step to restore (see :meth:`latest`).
            template: a tree of the expected structure, e.g. a fresh state; its
                ``jax.Array`` leaves give the placement of what is read.
            config: the config of the run that resumes, checked when given.

        Returns:
            ``(tree, meta)``: the tree (typed keys rewrapped, Python scalars as
            the template's type) and the checkpoint's metadata.

        Raises:
            CorruptCheckpoint: unreadable or changed bytes (names the step and leaves).
            JprError: no such step, config or structure mismatch.
        """

        def check(meta: dict[str, Any]) -> None:
            if config is not None:
                _check_config(step, meta, config, fingerprint(config))

        return self._restore(step, template, check)

    def restore(
        self, step: int, *, cfg: RunConfig, template: TrainState
    ) -> tuple[TrainState, dict[str, Any]]:
        """Read ``step``, check it against ``cfg`` and ``template``, verify its hashes.

        Nothing is read into the returned state unless every check passes.

        Args:
            step: the step to restore.
            cfg: the config of the run that resumes; must match the stored one.
            template: a state with the expected structure (e.g. a fresh one).

        Returns:
            ``(state, meta)``.

        Raises:
            CorruptCheckpoint: unreadable or changed bytes (names the step and leaves).
            JprError: no such step, config or structure mismatch.
        """
        tree, meta = self._restore(
            step,
            state_tree(template, rng.root_key(cfg.seed)),
            lambda meta: _check_config(step, meta, cfg.to_dict(), cfg.fingerprint()),
        )
        params, opt_state = tree["params"], tree["opt_state"]
        state = TrainState(params=params, opt_state=opt_state, step=int(tree["step"]))
        if state.step != step:
            raise CorruptCheckpoint(step, f"checkpoint step {step} holds step {state.step}")
        return state, meta

    def _restore(self, step: int, template: Any, check) -> tuple[Any, dict[str, Any]]:
        fast = self._restore_in_one_read(step, template, check)
        if fast is None:
            # Step by step, so that whatever is wrong is named precisely.
            meta = self.read_meta(step)
            fast = self._checked_restore(step, meta, template, check)
        self._restored = step  # retention never removes it before a newer step exists
        return fast

    def _restore_in_one_read(self, step: int, template: Any, check) -> tuple[Any, dict] | None:
        """The metadata and the arrays in one Orbax call: the common case, a sound
        checkpoint, at the cost of a plain restore. Every check of the step-by-step
        path runs on what was read; ``None`` on any problem, and the caller takes
        the step-by-step path, which reports it."""
        ocp = _ocp()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_stored(template))
        # The NumPy leaves (key words, step) get the params' device placement: with
        # a sharding for every leaf, Orbax does not read its array metadata first.
        placed = [x.sharding for x in jax.tree.leaves(abstract) if x.sharding is not None]
        fill = placed[0] if placed else None
        if not isinstance(fill, jax.sharding.SingleDeviceSharding):
            fill = None
        target = jax.tree.map(
            lambda x: x if x.sharding is not None or fill is None
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=fill),
            abstract,
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        try:
            got = self._mngr.restore(step, args=args)
            meta = got["meta"]
            self._check_meta(step, meta)
            return self._checked_restore(
                step, meta, template, check, read=lambda _abstract: got["state"]
            )
        except Exception:  # anything at all: the step-by-step path says what
            return None

    def _checked_restore(
        self, step: int, meta: dict, template: Any, check, read=None
    ) -> tuple[Any, dict[str, Any]]:
        ocp = _ocp()
        check(meta)
        stored_template = _to_stored(template)
        want = _leaf_specs(stored_template)
        have = {k: (n, tuple(s)) for k, (n, s) in meta.get("leaf_specs", {}).items()}
        for path in sorted(set(want) | set(have)):
            if path not in have:
                raise JprError(f"checkpoint step {step} has no leaf {path}; refusing to restore")
            if path not in want:
                raise JprError(f"checkpoint step {step} has an unexpected leaf {path}")
            if want[path] != have[path]:
                raise JprError(
                    f"checkpoint step {step}: leaf {path} is {have[path][0]}{list(have[path][1])},"
                    f" expected {want[path][0]}{list(want[path][1])}"
                )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, stored_template)
        if read is None:
            got = self._read_state(
                step, meta, abstract, lambda: ocp.args.StandardRestore(abstract)
            )
        else:
            got = read(abstract)
        tree = _from_stored(got, template, _stored_keys(meta))
        if hashing.hash_pytree(tree) != meta["state_hash"]:
            stored = meta.get("leaf_hashes", {})
            bad = [p for p, h in hashing.leaf_hashes(tree).items() if stored.get(p) != h]
            raise self._corrupt(step, [f"{p} does not match the stored hash" for p in bad])
        return tree, meta

    def verify(self, step: int) -> dict[str, Any]:
        """Check checkpoint ``step`` against its stored hashes, without a config or a model.

        Reads the metadata (checked against its digest), the structure Orbax
        recorded, and every array; re-hashes each leaf.

        Returns:
            ``{"step", "state_hash", "leaves"}`` when everything matches.

        Raises:
            CorruptCheckpoint: names the step and what is wrong (leaves, files).
            JprError: no such step, or not a jpr checkpoint.
        """
        ocp = _ocp()
        meta = self.read_meta(step)
        handler = ocp.PyTreeCheckpointHandler()
        try:
            tree = handler.metadata(self.directory / str(step) / "state").tree
        except Exception as e:
            bad = self._bad_json_files(step)
            raise self._corrupt(
                step,
                [f"array metadata unreadable ({self._reason(e)})"],
                tail=bad and "damaged: " + ", ".join(bad),
            ) from None
        finally:
            handler.close()
        # Read onto one local device whatever topology saved it: without a
        # sharding, Orbax would ask for the saving run's devices (a checkpoint of
        # a multi-process run is "saved with a different topology").
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=one if getattr(x, "sharding", None) else None
            ),
            tree,
        )
        have = _leaf_specs(abstract)
        want = {k: (n, tuple(s)) for k, (n, s) in meta.get("leaf_specs", {}).items()}
        if have != want:
            odd = sorted(p for p in set(have) | set(want) if have.get(p) != want.get(p))
            raise self._corrupt(
                step, [f"{p} on disk does not match the metadata's leaf specs" for p in odd]
            )
        # The same Orbax reader as a resume, so that what fails here fails there.
        got = self._read_state(step, meta, abstract, lambda: ocp.args.StandardRestore(abstract))
        hashes = self._hashes(got, meta)
        stored = meta.get("leaf_hashes", {})
        bad = sorted(p for p in set(hashes) | set(stored) if hashes.get(p) != stored.get(p))
        if bad:
            raise self._corrupt(step, [f"{p} does not match the stored hash" for p in bad])
        return {"step": step, "state_hash": meta["state_hash"], "leaves": len(hashes)}

    def close(self) -> None:
        """Release Orbax's resources and the folder's lock."""
        try:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self._mngr.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    # -- reading and diagnosing ------------------------------------------------

    def _read_numpy(self, step: int, item: Any) -> Any:
        """Read the leaves of ``item`` (``PLACEHOLDER`` leaves are skipped) as NumPy arrays."""
        ocp = _ocp()
        restore_args = jax.tree.map(
            lambda x: x
            if x is ocp.PLACEHOLDER
            else ocp.ArrayRestoreArgs(restore_type=np.ndarray, dtype=x.dtype),
            item,
        )
        if self._reader is None:
            self._reader = ocp.PyTreeCheckpointer()
        return self._reader.restore(
            self.directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args),
        )

    def _read_state(self, step: int, meta: dict, abstract: Any, make_args) -> Any:
        ocp = _ocp()
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(state=make_args()))["state"]
        except Exception as e:
            raise self._diagnose(step, meta, abstract, e) from None

    def _hashes(self, tree: Any, meta: dict) -> dict[str, str]:
        keys = _stored_keys(meta)

        def rewrap(path, x):
            impl = keys.get(hashing.leaf_path(path))
            return x if impl is None else jax.random.wrap_key_data(np.asarray(x), impl=impl)

        return hashing.leaf_hashes(jax.tree_util.tree_map_with_path(rewrap, tree))

    def _diagnose(self, step: int, meta: dict, abstract: Any, error: Exception):
        """Read the leaves one by one to say which ones are unreadable or changed."""
        ocp = _ocp()
        leaves, treedef = jax.tree_util.tree_flatten(abstract)
        paths = list(_leaf_specs(abstract))
        values, unreadable = [], {}
        for i, path in enumerate(paths):
            only_i = [x if j == i else ocp.PLACEHOLDER for j, x in enumerate(leaves)]
            item = treedef.unflatten(only_i)
            try:
                got = self._read_numpy(step, item)
                values.append(np.asarray(jax.tree_util.tree_leaves(got)[i]))
            except Exception as e:
                unreadable[path] = self._reason(e)
                values.append(np.zeros(leaves[i].shape, leaves[i].dtype))
        problems = [f"{p} unreadable ({r})" for p, r in unreadable.items()]
        if len(unreadable) == len(paths):
            first = next(iter(unreadable.values()), self._reason(error))
            problems = [f"no leaf is readable ({first})"]
        else:
            try:
                hashes = self._hashes(treedef.unflatten(values), meta)
            except Exception:  # pragma: no cover - a tree that cannot be rebuilt
                hashes = {}
            stored = meta.get("leaf_hashes", {})
            problems += [
                f"{p} does not match the stored hash"
                for p in paths
                if p not in unreadable and hashes.get(p) != stored.get(p)
            ]
        if not problems:
            problems = [f"arrays unreadable ({self._reason(error)})"]
        bad_json = self._bad_json_files(step)
        return self._corrupt(step, problems, tail=bad_json and "damaged: " + ", ".join(bad_json))

    def _bad_json_files(self, step: int) -> list[str]:
        """Orbax's JSON files of ``step`` that no longer parse (relative names)."""
        bad = []
        root = self.directory / str(step)
        names = {"_METADATA", "_sharding", "_CHECKPOINT_METADATA", "metadata"}
        for p in sorted(root.rglob("*")):
            if p.is_file() and (p.name in names or p.parent.name == "array_metadatas"):
                try:
                    json.loads(p.read_bytes())
                except (ValueError, OSError):
                    bad.append(str(Path(self.shown) / p.relative_to(self.directory)))
        return bad

    def _corrupt(self, step: int, problems: list[str], tail: str = "") -> CorruptCheckpoint:
        shown = problems[:4] + ([f"and {len(problems) - 4} more"] if len(problems) > 4 else [])
        shown += [tail] if tail else []
        return CorruptCheckpoint(step, f"checkpoint step {step} is corrupt: " + "; ".join(shown))

    def _reason(self, e: BaseException) -> str:
        """A one-line cause: the TensorStore status and the damaged file, when known."""
        text = " ".join(str(e).split())
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
            "No space left on device" in text
        ):
            # Whichever writer hits it first (TensorStore's or Orbax's own), one wording.
            return "No space left on device"
        code = re.search(
            r"\b(DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|NOT_FOUND|INVALID_ARGUMENT"
            r"|PERMISSION_DENIED|RESOURCE_EXHAUSTED|INTERNAL|UNKNOWN)\b",
            text,
        )
        for f in reversed(re.findall(r'file "([^"]+)"', text)):
            if not Path(f).is_file():
                continue  # the OCDBT database folder, not the damaged file
            try:
                rel = Path(f).relative_to(self.directory)
            except ValueError:
                continue
            return f"{code.group(1) if code else type(e).__name__} reading {Path(self.shown) / rel}"
        if code:
            return f"{code.group(1)}: {text.rsplit(': ', 1)[-1][:160]}"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        return _short(e)


def _check_config(step: int, meta: dict[str, Any], config: dict[str, Any], fp: str) -> None:
    if meta.get("config_fingerprint") != fp:
        diff = config_diff(meta.get("config", {}), config)
        raise JprError(
            f"checkpoint step {step} was made with a different config: " + "; ".join(diff)
        )


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
