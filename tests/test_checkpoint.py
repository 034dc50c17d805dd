"""Verified Orbax checkpoints: save, list, restore bit for bit, refuse mismatches.

Damaged and interrupted checkpoints are covered by tests/test_faults.py.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jpr import data, hashing, rng, train
from jpr.checkpoint import FORMAT, Checkpointer
from jpr.config import RunConfig
from jpr.errors import JprError

CFG = RunConfig(seed=4)


@pytest.fixture(scope="module")
def trained():
    """The state after 3 real training steps."""
    graphdef, state = train.init_state(CFG)
    ds = data.make_dataset(CFG)
    step_fn = train.make_train_step(CFG, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    root = rng.root_key(CFG.seed)
    params, opt_state = state.params, state.opt_state
    for step in range(3):
        x, y = data.get_batch(step, ds=ds, batch_size=CFG.batch_size)
        params, opt_state, _ = step_fn(params, opt_state, root, x, y, np.uint32(step))
    return train.TrainState(params=params, opt_state=opt_state, step=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained):
    d = tmp_path_factory.mktemp("ckpt") / "run"
    ckpt = Checkpointer(d)
    _, fresh = train.init_state(CFG)
    h0 = ckpt.save(fresh, root=rng.root_key(CFG.seed), cfg=CFG)
    h3 = ckpt.save(trained, root=rng.root_key(CFG.seed), cfg=CFG,
                   trajectory=[{"step": 0}, {"step": 3}], extra={"note": "hi"})
    ckpt.close()
    return d, h0, h3


def template() -> train.TrainState:
    return train.init_state(CFG)[1]


def state_hash(state: train.TrainState, root=None) -> str:
    return hashing.hash_pytree(train.state_tree(state, rng.root_key(CFG.seed) if root is None
                                                else root))


def test_save_returns_the_state_hash_and_lists_steps(saved, trained):
    d, h0, h3 = saved
    assert h3 == state_hash(trained)
    assert h0 != h3
    ckpt = Checkpointer(d, create=False)
    assert ckpt.steps() == [0, 3]
    assert ckpt.latest() == 3
    ckpt.close()


def test_restore_is_bit_exact(saved, trained):
    d, _, h3 = saved
    ckpt = Checkpointer(d, create=False)
    restored, meta = ckpt.restore(3, cfg=CFG, template=template())
    ckpt.close()
    assert restored.step == 3
    assert hashing.hash_pytree(restored.params) == hashing.hash_pytree(trained.params)
    assert hashing.hash_pytree(restored.opt_state) == hashing.hash_pytree(trained.opt_state)
    assert state_hash(restored) == h3 == meta["state_hash"]
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(trained.opt_state)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(trained.params),
                    strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape


def test_restored_state_trains_on_identically(saved, trained):
    """One more step from the restored state equals one more step from the original."""
    d, _, _ = saved
    ckpt = Checkpointer(d, create=False)
    restored, meta = ckpt.restore(3, cfg=CFG, template=template())
    ckpt.close()
    root = rng.key_from_data(meta["rng"])
    graphdef, _ = train.init_state(CFG)
    step_fn = train.make_train_step(CFG, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    x, y = data.get_batch(3, ds=data.make_dataset(CFG), batch_size=CFG.batch_size)
    a = step_fn(trained.params, trained.opt_state, rng.root_key(CFG.seed), x, y, np.uint32(3))
    b = step_fn(restored.params, restored.opt_state, root, x, y, np.uint32(3))
    assert hashing.hash_pytree(a) == hashing.hash_pytree(b)


def test_a_state_restored_over_a_placed_template_keeps_its_layout(saved, trained):
    """Restored over ``init_state(mesh=)``, the state is laid out as the step returns it.

    Otherwise the first step after a resume is a program of its own: the step
    would be compiled again for it, as docs/full-flow.md's loop once was.
    """
    d, _, _ = saved
    mesh = train.make_mesh(jax.devices()[:1])
    graphdef, placed = train.init_state(CFG, mesh=mesh)
    ckpt = Checkpointer(d, create=False)
    restored, meta = ckpt.restore(3, cfg=CFG, template=placed)
    ckpt.close()
    want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    assert all(leaf.sharding == want for leaf in jax.tree.leaves((restored.params,
                                                                 restored.opt_state)))
    step_fn = train.make_train_step(CFG, graphdef, mesh=mesh)  # new: nothing compiled yet
    params, opt_state = placed.params, placed.opt_state
    ds, root = data.make_dataset(CFG), rng.key_from_data(meta["rng"])
    for step in (0, 1):  # the fresh placed state, then what the step returned: one program
        x, y = data.get_batch(step, ds=ds, batch_size=CFG.batch_size)
        params, opt_state, _ = step_fn(params, opt_state, root, x, y, np.uint32(step))
    x, y = data.get_batch(3, ds=ds, batch_size=CFG.batch_size)
    after = step_fn(restored.params, restored.opt_state, root, x, y, np.uint32(3))
    assert step_fn._cache_size() == 1
    before = step_fn(trained.params, trained.opt_state, root, x, y, np.uint32(3))
    assert hashing.hash_pytree(after) == hashing.hash_pytree(before)


def test_meta_records_what_a_resume_needs(saved):
    d, _, h3 = saved
    ckpt = Checkpointer(d, create=False)
    meta = ckpt.read_meta(3)
    ckpt.close()
    assert meta["format"] == FORMAT
    assert meta["step"] == 3
    assert meta["config"] == CFG.to_dict()
    assert meta["config_fingerprint"] == CFG.fingerprint()
    assert meta["rng"] == rng.key_to_data(rng.root_key(CFG.seed))
    per_epoch = CFG.dataset_size // CFG.batch_size
    assert meta["data_position"] == {"next_step": 3, "epoch": 3 // per_epoch,
                                     "batch_in_epoch": 3 % per_epoch}
    assert meta["state_hash"] == h3
    assert set(meta["leaf_hashes"]) == set(meta["leaf_specs"])
    assert meta["leaf_specs"]["params/fc1/kernel"] == ["float32", [64, 32]]
    assert meta["leaf_specs"]["rng"] == ["uint32", [2]]  # the key's words, as stored
    assert meta["trajectory"] == [{"step": 0}, {"step": 3}]
    assert meta["note"] == "hi"


def test_restore_refuses_another_config_and_names_the_fields(saved):
    d, _, _ = saved
    ckpt = Checkpointer(d, create=False)
    other = dataclasses.replace(CFG, lr=0.01, dropout=0.2)
    with pytest.raises(JprError) as info:
        ckpt.restore(3, cfg=other, template=template())
    ckpt.close()
    text = str(info.value)
    assert "checkpoint step 3 was made with a different config" in text
    assert "dropout: 0.1 -> 0.2" in text and "lr: 0.001 -> 0.01" in text
    assert "\n" not in text


def test_restore_refuses_a_template_of_another_shape(saved):
    d, _, _ = saved
    ckpt = Checkpointer(d, create=False)
    _, wide = train.init_state(dataclasses.replace(CFG, hidden=16))
    with pytest.raises(JprError) as info:
        ckpt.restore(3, cfg=CFG, template=wide)
    ckpt.close()
    # The first differing leaf in sorted order is named with both shapes.
    assert str(info.value) == (
        "checkpoint step 3: leaf opt_state/0/mu/fc1/bias is float32[32], expected float32[16]"
    )


def test_missing_step_lists_the_available_ones(saved):
    d, _, _ = saved
    ckpt = Checkpointer(d, create=False)
    with pytest.raises(JprError, match=r"no checkpoint at step 7 in .* \(available: 0, 3\)"):
        ckpt.restore(7, cfg=CFG, template=template())
    with pytest.raises(JprError, match="no checkpoint at step 7"):
        ckpt.read_meta(7)
    ckpt.close()


def test_saving_a_step_twice_is_refused(saved, trained):
    d, _, _ = saved
    ckpt = Checkpointer(d)
    with pytest.raises(JprError, match="checkpoint step 3 already exists"):
        ckpt.save(trained, root=rng.root_key(CFG.seed), cfg=CFG)
    assert ckpt.steps() == [0, 3]
    ckpt.close()


def test_folder_errors(tmp_path):
    with pytest.raises(JprError, match="does not exist"):
        Checkpointer(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(JprError, match="is a file, not a folder"):
        Checkpointer(afile)


def test_empty_folder_has_no_latest(tmp_path):
    ckpt = Checkpointer(tmp_path / "new")
    assert ckpt.steps() == [] and ckpt.latest() is None
    ckpt.close()


def test_a_second_manager_sees_new_steps(tmp_path, trained):
    """steps() reloads from disk: a reader opened before a save still sees it."""
    writer = Checkpointer(tmp_path / "c")
    reader = Checkpointer(tmp_path / "c", read_only=True)  # a second writer would be refused
    writer.save(trained, root=rng.root_key(CFG.seed), cfg=CFG)
    assert reader.latest() == 3
    writer.close()
    reader.close()
