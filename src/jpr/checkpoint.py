"""Orbax checkpoints that hold everything a run needs, verified on restore.

A checkpoint at step ``N`` stores two Orbax items:

* ``state``: params, Adam state, the root key's raw ``uint32`` data and the step;
* ``meta`` (JSON): the config and its fingerprint, the key's impl, the data
  position, the ``state_hash`` and per-leaf hashes, and the run's trajectory so
  far (so a resumed run's record is complete).

Restoring re-hashes what was read and refuses anything that does not match:
a config that differs (the fields are named), a tree of another structure (the
path is named, nothing is partially restored), or bytes that changed on disk
(the leaf is named). Orbax writes each step into a temporary folder and renames
it when complete, so an interrupted save is never listed as a step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jpr import hashing, rng
from jpr.config import RunConfig, config_diff
from jpr.errors import JprError
from jpr.train import TrainState, state_tree

__all__ = ["FORMAT", "Checkpointer"]

FORMAT = "jpr.checkpoint/1"


def _ocp():
    # Orbax takes a while to import: only runs that checkpoint pay for it.
    import orbax.checkpoint as ocp

    return ocp


def _stored_tree(state: TrainState, root: jax.Array) -> dict[str, Any]:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(root),
        "step": np.asarray(state.step, dtype=np.int64),
    }


def _leaf_specs(tree: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        name, arr = hashing.canonical_array(x)
        out[hashing.leaf_path(path)] = (name, tuple(arr.shape))
    return out


class Checkpointer:
    """Save and restore verified checkpoints in ``directory``.

    Args:
        directory: the checkpoint folder (one sub-folder per step).
        create: create the folder if missing (for saving); when ``False`` a
            missing folder is an error (for restoring).

    Example:
        >>> import tempfile
        >>> from jpr.checkpoint import Checkpointer
        >>> from jpr.config import RunConfig
        >>> from jpr.rng import root_key
        >>> from jpr.train import init_state
        >>> cfg = RunConfig(seed=0)
        >>> _, state = init_state(cfg)
        >>> ckpt = Checkpointer(tempfile.mkdtemp() + "/ckpt")
        >>> state_hash = ckpt.save(state, root=root_key(0), cfg=cfg)
        >>> ckpt.steps()
        [0]
        >>> restored, meta = ckpt.restore(0, cfg=cfg, template=state)
        >>> meta["state_hash"] == state_hash
        True
        >>> ckpt.close()
    """

    def __init__(self, directory: str | Path, *, create: bool = True):
        self.directory = Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise JprError(f"checkpoint dir {directory} does not exist")
        if self.directory.exists() and not self.directory.is_dir():
            raise JprError(f"checkpoint dir {directory} is a file, not a folder")
        ocp = _ocp()
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False, max_to_keep=None, create=create
        )
        try:
            self._mngr = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta")
            )
        except OSError as e:
            raise JprError(f"cannot use checkpoint dir {directory}: {e.strerror or e}") from None
        self.last_saved_hash: str | None = None

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest(self) -> int | None:
        """The newest complete step, or ``None`` if there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self,
        state: TrainState,
        *,
        root: jax.Array,
        cfg: RunConfig,
        trajectory: list | None = None,
        extra: dict | None = None,
    ) -> str:
        """Save ``state`` at ``state.step``; returns its ``state_hash``."""
        ocp = _ocp()
        tree = state_tree(state, root)
        leaf_hashes = hashing.leaf_hashes(tree)
        state_hash = hashing.hash_pytree(tree)
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
            "state_hash": state_hash,
            "leaf_hashes": leaf_hashes,
            "leaf_specs": {k: [n, list(s)] for k, (n, s) in _leaf_specs(tree).items()},
            "trajectory": trajectory or [],
            **(extra or {}),
        }
        if state.step in self.steps():
            raise JprError(f"checkpoint step {state.step} already exists in {self.directory}")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_stored_tree(state, root)),
            meta=ocp.args.JsonSave(meta),
        )
        self._mngr.save(state.step, args=args)
        self._mngr.wait_until_finished()
        self.last_saved_hash = state_hash
        return state_hash

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of ``step`` (no arrays are read)."""
        ocp = _ocp()
        self._check_step(step)
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax raises many types for unreadable files
            raise JprError(f"checkpoint step {step}: metadata unreadable ({_short(e)})") from None
        meta = dict(meta["meta"] or {})
        if meta.get("format") != FORMAT:
            raise JprError(f"checkpoint step {step}: not a {FORMAT} checkpoint")
        return meta

    def _check_step(self, step: int) -> None:
        steps = self.steps()
        if step not in steps:
            have = ", ".join(map(str, steps)) if steps else "none"
            raise JprError(
                f"no checkpoint at step {step} in {self.directory} (available: {have})"
            )

    def restore(
        self, step: int, *, cfg: RunConfig, template: TrainState
    ) -> tuple[TrainState, dict[str, Any]]:
        """Read ``step``, check it against ``cfg`` and ``template``, verify its hashes.

        Args:
            step: the step to restore.
            cfg: the config of the run that resumes; must match the stored one.
            template: a state with the expected structure (e.g. a fresh one).

        Returns:
            ``(state, meta)``.

        Raises:
            JprError: config or structure mismatch, unreadable or corrupt data.
        """
        ocp = _ocp()
        meta = self.read_meta(step)
        if meta.get("config_fingerprint") != cfg.fingerprint():
            diff = config_diff(meta.get("config", {}), cfg.to_dict())
            raise JprError(
                f"checkpoint step {step} was made with a different config: " + "; ".join(diff)
            )
        root = rng.key_from_data(meta["rng"])
        want = _leaf_specs(_stored_tree(template, root))
        have = {k: (n, tuple(s)) for k, (n, s) in meta.get("leaf_specs", {}).items()}
        have["rng"] = want["rng"]  # stored as key<impl>, read back as uint32 data
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
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, _stored_tree(template, root)
        )
        try:
            got = self._mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as e:
            raise JprError(f"checkpoint step {step}: arrays unreadable ({_short(e)})") from None
        root = jax.random.wrap_key_data(
            np.asarray(got["rng"]), impl=meta["rng"]["impl"]
        )
        state = TrainState(
            params=got["params"], opt_state=got["opt_state"], step=int(got["step"])
        )
        tree = state_tree(state, root)
        if hashing.hash_pytree(tree) != meta["state_hash"]:
            stored = meta.get("leaf_hashes", {})
            bad = [p for p, h in hashing.leaf_hashes(tree).items() if stored.get(p) != h]
            raise JprError(
                f"checkpoint step {step} is corrupt: {', '.join(bad) or 'state'} "
                "does not match the stored hash"
            )
        if state.step != step:
            raise JprError(f"checkpoint step {step} holds step {state.step}")
        return state, meta

    def close(self) -> None:
        """Release Orbax's resources."""
        self._mngr.close()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
