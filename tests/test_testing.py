"""jpr.testing on a loop written as the Flax NNX tutorials write it: in place, with a loose Rngs."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpr
import jpr.testing


class Net(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 8, rngs=rngs)
        self.batch_norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(rate=0.5)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x, rngs=None):
        x = self.dropout(nnx.relu(self.batch_norm(self.linear(x))), rngs=rngs)
        return self.out(x)


DATA = np.random.default_rng(0).normal(size=(6, 16, 4)).astype(np.float32)
LABELS = (DATA.sum(axis=2) > 0).astype(np.int32)


def build():
    model = Net(rngs=nnx.Rngs(0))
    return {
        "model": model,
        "optimizer": nnx.Optimizer(model, optax.adamw(0.01), wrt=nnx.Param),
        "metrics": nnx.MultiMetric(loss=nnx.metrics.Average("loss")),
        "rngs": nnx.Rngs(1),  # loose: dropout's count lives here, not in the model
    }


@nnx.jit
def train_step(model, optimizer, metrics, rngs, x, y):
    def loss_fn(m, rngs):  # rngs passed in, as the tutorial does (a closure cannot update it)
        return optax.softmax_cross_entropy_with_integer_labels(m(x, rngs), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model, rngs)
    metrics.update(loss=loss)
    optimizer.update(model, grads)
    return loss


def step(objects, t):
    return train_step(**objects, x=jnp.asarray(DATA[t]), y=jnp.asarray(LABELS[t]))


def test_an_in_place_loop_is_reproducible_and_resumes_exactly(tmp_path):
    init, run = jpr.testing.in_place(build, step)
    entries = jpr.testing.assert_reproducible(init, run, steps=4)
    assert "rngs/default/count/value" in entries[0]["leaves"]
    jpr.testing.assert_resume_equivalent(init, run, steps=5, at=2, directory=tmp_path / "ck")
    assert (tmp_path / "ck" / "2").is_dir()


def test_in_place_never_changes_the_state_it_was_given():
    init, run = jpr.testing.in_place(build, step)
    state = init()
    before = jpr.hash_pytree(state)
    after, _ = run(state, 0)
    assert jpr.hash_pytree(state) == before != jpr.hash_pytree(after)


def test_a_forgotten_rngs_count_is_named_first(tmp_path):
    """The issue's case: a restore that keeps the fresh Rngs. The only leaf that
    differs right after the restore is the count; it leads the message, before
    the dozens of leaves that differ one step later."""
    init, run = jpr.testing.in_place(build, step)

    def restore_all_but_rngs(directory, at, fresh):
        with jpr.Checkpointer(directory) as ckpt:
            back, _ = ckpt.restore_pytree(at, template=fresh)
        return nnx.State({**back, "rngs": fresh["rngs"]})

    with pytest.raises(AssertionError) as e:
        jpr.testing.assert_resume_equivalent(
            init, run, steps=5, at=3, directory=tmp_path, restore=restore_all_but_rngs
        )
    text = str(e.value)
    assert text.startswith(
        "resume after step 3 is not exact: right after the restore, before any step, the state "
        "differs in rngs/default/count/value; the runs first differ after step 4 (they agree "
        "up to step 3) in rngs/default/count/value, "
    ), text
    assert text.endswith("more; the loss differs too")


class Pair(NamedTuple):
    z: jax.Array  # declared first: first in the tree, last in the alphabet
    a: jax.Array


def test_leaves_are_listed_in_tree_order_not_alphabetically():
    calls = {"n": 0}

    def step(state, t):  # the second run differs from step 2 on, in both leaves
        calls["n"] += 1
        bump = 1.0 if calls["n"] > 3 and t >= 1 else 0.0
        return Pair(state.z + t + bump, state.a + t + bump), None

    init = lambda: Pair(jnp.zeros(2), jnp.zeros(2))  # noqa: E731
    with pytest.raises(AssertionError, match=r"after step 2 \(they agree up to step 1\) in z, a$"):
        jpr.testing.assert_reproducible(init, step, steps=3)
