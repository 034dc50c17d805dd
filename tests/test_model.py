"""The NNX MLP: deterministic init, dropout only with a key, functional split/merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpr import rng
from jpr.config import RunConfig
from jpr.hashing import hash_pytree
from jpr.model import apply, init_params

CFG = RunConfig(seed=0)


@pytest.fixture(scope="module")
def model():
    return init_params(CFG)


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (16, CFG.features))


def test_params_are_a_plain_dict_of_the_seed_shapes(model):
    _, params = model
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == {
        "fc1": {"kernel": (64, 32), "bias": (32,)},
        "fc2": {"kernel": (32, 10), "bias": (10,)},
    }
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    assert type(params) is dict and type(params["fc1"]) is dict


def test_init_is_deterministic(model):
    _, params = model
    _, again = init_params(RunConfig(seed=0))
    assert hash_pytree(again) == hash_pytree(params)


def test_init_depends_on_the_seed_and_uses_the_params_stream(model):
    _, params = model
    _, other = init_params(RunConfig(seed=1))
    assert hash_pytree(other) != hash_pytree(params)
    root = rng.root_key(0)
    _, explicit = init_params(CFG, key=rng.stream_key(root, "params"))
    assert hash_pytree(explicit) == hash_pytree(params)
    _, wrong_stream = init_params(CFG, key=rng.stream_key(root, "dropout"))
    assert hash_pytree(wrong_stream) != hash_pytree(params)


def test_init_does_not_depend_on_the_dropout_rate(model):
    _, params = model
    _, p2 = init_params(RunConfig(seed=0, dropout=0.5))
    assert hash_pytree(p2) == hash_pytree(params)


def test_no_dropout_key_is_deterministic(model, x):
    graphdef, params = model
    a = apply(graphdef, params, x)
    b = apply(graphdef, params, x)
    assert a.shape == (16, 10)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_dropout_changes_outputs_with_the_key(model, x):
    graphdef, params = model
    plain = np.asarray(apply(graphdef, params, x))
    k1, k2 = (rng.step_key(rng.root_key(0), "dropout", s) for s in (0, 1))
    d1 = np.asarray(apply(graphdef, params, x, dropout_key=k1))
    d1_again = np.asarray(apply(graphdef, params, x, dropout_key=k1))
    d2 = np.asarray(apply(graphdef, params, x, dropout_key=k2))
    assert d1.tobytes() == d1_again.tobytes()
    assert d1.tobytes() != plain.tobytes()
    assert d1.tobytes() != d2.tobytes()


def test_dropout_rate_zero_ignores_the_key(x):
    graphdef, params = init_params(RunConfig(seed=0, dropout=0.0))
    key = rng.step_key(rng.root_key(0), "dropout", 0)
    plain = np.asarray(apply(graphdef, params, x))
    keyed = np.asarray(apply(graphdef, params, x, dropout_key=key))
    assert plain.tobytes() == keyed.tobytes()


def test_apply_under_jit_matches_eager(model, x):
    graphdef, params = model
    key = rng.step_key(rng.root_key(0), "dropout", 3)
    jitted = jax.jit(lambda p, x, k: apply(graphdef, p, x, dropout_key=k))
    eager = np.asarray(apply(graphdef, params, x, dropout_key=key))
    assert np.asarray(jitted(params, x, key)).tobytes() == eager.tobytes()


def test_apply_uses_the_given_params(model, x):
    graphdef, params = model
    zeroed = jax.tree.map(jnp.zeros_like, params)
    assert not np.asarray(apply(graphdef, zeroed, x)).any()
    assert np.asarray(apply(graphdef, params, x)).any()
