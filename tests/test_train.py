"""The jitted train step: same inputs, same bits; dropout keyed by the step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jpr import data, rng, train
from jpr.config import RunConfig
from jpr.hashing import hash_pytree

CFG = RunConfig(seed=0)
STEPS = 4


def fresh_run(cfg: RunConfig, steps: int, *, start_step: int = 0):
    """A fresh state, a fresh jitted step function, ``steps`` steps from ``start_step``."""
    graphdef, state = train.init_state(cfg)
    ds = data.make_dataset(cfg)
    step_fn = train.make_train_step(cfg, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    root = rng.root_key(cfg.seed)
    params, opt_state, losses = state.params, state.opt_state, []
    for step in range(start_step, start_step + steps):
        x, y = data.get_batch(step, ds=ds, batch_size=cfg.batch_size)
        params, opt_state, loss = step_fn(params, opt_state, root, x, y, np.uint32(step))
        losses.append(np.asarray(loss))
    return params, opt_state, losses


@pytest.fixture(scope="module")
def run_a():
    return fresh_run(CFG, STEPS)


def test_train_step_is_deterministic(run_a):
    """Two fresh runs (fresh state, fresh jit) give the same bits."""
    params, opt_state, losses = run_a
    params2, opt_state2, losses2 = fresh_run(CFG, STEPS)
    assert hash_pytree(params2) == hash_pytree(params)
    assert hash_pytree(opt_state2) == hash_pytree(opt_state)
    assert [x.tobytes() for x in losses2] == [x.tobytes() for x in losses]


def test_training_changes_params_and_returns_scalar_losses(run_a):
    params, opt_state, losses = run_a
    _, init = train.init_state(CFG)
    assert hash_pytree(params) != hash_pytree(init.params)
    assert all(loss.shape == () and np.isfinite(loss) for loss in losses)
    assert jax.tree.structure(params) == jax.tree.structure(init.params)
    assert jax.tree.structure(opt_state) == jax.tree.structure(init.opt_state)


def test_the_step_index_selects_the_dropout_key():
    """Same state and batch, another step number: another dropout mask, other bits."""
    graphdef, state = train.init_state(CFG)
    ds = data.make_dataset(CFG)
    step_fn = train.make_train_step(CFG, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    x, y = data.get_batch(0, ds=ds, batch_size=CFG.batch_size)
    root = rng.root_key(0)
    p0, _, l0 = step_fn(state.params, state.opt_state, root, x, y, np.uint32(0))
    p0b, _, l0b = step_fn(state.params, state.opt_state, root, x, y, np.uint32(0))
    p1, _, l1 = step_fn(state.params, state.opt_state, root, x, y, np.uint32(1))
    assert hash_pytree(p0) == hash_pytree(p0b) and float(l0) == float(l0b)
    assert hash_pytree(p0) != hash_pytree(p1)
    assert float(l0) != float(l1)
    # Without dropout the step number is irrelevant.
    cfg = RunConfig(seed=0, dropout=0.0)
    graphdef, state = train.init_state(cfg)
    step_fn = train.make_train_step(cfg, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    q0, _, _ = step_fn(state.params, state.opt_state, root, x, y, np.uint32(0))
    q1, _, _ = step_fn(state.params, state.opt_state, root, x, y, np.uint32(1))
    assert hash_pytree(q0) == hash_pytree(q1)


def test_the_root_key_matters():
    graphdef, state = train.init_state(CFG)
    ds = data.make_dataset(CFG)
    step_fn = train.make_train_step(CFG, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    x, y = data.get_batch(0, ds=ds, batch_size=CFG.batch_size)
    a, _, _ = step_fn(state.params, state.opt_state, rng.root_key(0), x, y, np.uint32(0))
    b, _, _ = step_fn(state.params, state.opt_state, rng.root_key(1), x, y, np.uint32(0))
    assert hash_pytree(a) != hash_pytree(b)


def test_microbatched_step_is_deterministic():
    cfg = RunConfig(seed=0, microbatches=2)
    a = fresh_run(cfg, 2)
    b = fresh_run(cfg, 2)
    assert hash_pytree(a[0]) == hash_pytree(b[0])
    assert hash_pytree(a[1]) == hash_pytree(b[1])


def test_state_tree_covers_params_optimizer_rng_and_step(run_a):
    params, opt_state, _ = run_a
    state = train.TrainState(params=params, opt_state=opt_state, step=STEPS)
    tree = train.state_tree(state, rng.root_key(0))
    assert sorted(tree) == ["opt_state", "params", "rng", "step"]
    h = hash_pytree(tree)
    assert hash_pytree(train.state_tree(state, rng.root_key(1))) != h
    moved = train.TrainState(params=params, opt_state=opt_state, step=STEPS + 1)
    assert hash_pytree(train.state_tree(moved, rng.root_key(0))) != h


def test_init_state_is_step_zero_adam():
    _, state = train.init_state(CFG)
    assert state.step == 0
    expected = optax.adam(CFG.lr).init(state.params)
    assert hash_pytree(state.opt_state) == hash_pytree(expected)


def test_make_mesh_defaults_to_all_devices():
    mesh = train.make_mesh()
    assert mesh.axis_names == (train.AXIS,)
    assert mesh.devices.size == jax.device_count()


def test_evaluate_bounds_and_learning(run_a):
    graphdef, init = train.init_state(CFG)
    ds = data.make_dataset(CFG)
    loss0, acc0 = train.evaluate(graphdef, init.params, ds.eval_x, ds.eval_y)
    assert isinstance(loss0, float) and isinstance(acc0, float)
    assert loss0 > 0 and 0.0 <= acc0 <= 1.0
    # acc is a fraction of the eval set
    assert abs(acc0 * CFG.eval_size - round(acc0 * CFG.eval_size)) < 1e-3
    # evaluation is deterministic (no dropout)
    assert train.evaluate(graphdef, init.params, ds.eval_x, ds.eval_y) == (loss0, acc0)
    # all-zero params give uniform logits: the loss is exactly log(classes)
    logits_params = jax.tree.map(np.zeros_like, init.params)
    loss_flat, _ = train.evaluate(graphdef, logits_params, ds.eval_x, ds.eval_y)
    assert loss_flat == pytest.approx(np.log(CFG.classes), rel=1e-6)


def test_evaluate_after_training_beats_initialisation():
    cfg = CFG
    graphdef, init = train.init_state(cfg)
    ds = data.make_dataset(cfg)
    params, _, _ = fresh_run(cfg, 30)
    loss0, acc0 = train.evaluate(graphdef, init.params, ds.eval_x, ds.eval_y)
    loss1, acc1 = train.evaluate(graphdef, params, ds.eval_x, ds.eval_y)
    assert loss1 < loss0
    assert acc1 > acc0


def test_a_state_placed_on_the_mesh_compiles_the_step_once():
    # The step returns its outputs replicated on the mesh; a state fresh from
    # init_state is on no mesh, so its first step is another program (traced,
    # lowered and compiled again). init_state(mesh=) places it as the step will.
    cfg = RunConfig(seed=11)
    mesh = train.make_mesh(jax.devices()[:1])
    ds = data.make_dataset(cfg)
    root = rng.root_key(cfg.seed)
    compiled = {}
    for placed in (False, True):
        graphdef, state = train.init_state(cfg, mesh=mesh if placed else None)
        step_fn = train.make_train_step(cfg, graphdef, mesh=mesh)  # new: nothing compiled yet
        params, opt_state = state.params, state.opt_state
        for step in range(3):
            x, y = data.get_batch(step, ds=ds, batch_size=cfg.batch_size)
            params, opt_state, _ = step_fn(params, opt_state, root, x, y, np.uint32(step))
        compiled[placed] = (step_fn._cache_size(), hash_pytree(params))
    assert compiled[True][0] == 1
    assert compiled[False][0] == 2  # what init_state(mesh=) saves
    assert compiled[True][1] == compiled[False][1]  # and the bits are the same
