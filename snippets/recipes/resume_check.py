"""A pytest test that *your* training loop resumes bit-exact from an Orbax checkpoint.

    python -m pytest -q snippets/recipes/resume_check.py

Copy it into your tests (as test_resume.py) and replace `init_state` and
`train_step` with yours. The test trains N steps straight; then, from scratch,
K steps, saves with Orbax, restores into a freshly built state, and trains the
remaining N - K. Every leaf must have the same dtype, shape and bytes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

TX = optax.adamw(1e-2)


def init_state(seed: int = 0):
    """Your model's state at step 0: everything that `train_step` reads."""
    k_w, k_run = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(k_w, (4, 1)), "b": jnp.zeros(1)}
    return {"params": params, "opt_state": TX.init(params), "step": jnp.int32(0), "key": k_run}


@jax.jit
def train_step(state):
    """Your step: a pure function of the state (keys included)."""
    key = jax.random.fold_in(state["key"], state["step"])
    x = jax.random.normal(key, (8, 4))
    y = x.sum(axis=1, keepdims=True)
    grads = jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(state["params"])
    updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}


def unkey(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def leaf_bits(tree):
    return [(jax.tree_util.keystr(p), str(x.dtype), np.shape(x), np.asarray(unkey(x)).tobytes())
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def train(state, steps, step_fn):
    for _ in range(steps):
        state = step_fn(state)
    return state


def test_resume_is_bit_exact(tmp_path, init=init_state, step_fn=train_step, n=6, k=3):
    uninterrupted = train(init(), n, step_fn)

    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(k, args=ocp.args.StandardSave(train(init(), k, step_fn)))
        mngr.wait_until_finished()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, init())  # a fresh state's shape
        restored = mngr.restore(k, args=ocp.args.StandardRestore(target))
    resumed = train(restored, n - k, step_fn)

    assert int(resumed["step"]) == n
    for a, b in zip(leaf_bits(resumed), leaf_bits(uninterrupted), strict=True):
        assert a == b, f"leaf {a[0]} differs after resuming at step {k}"
    print(f"\n{n} steps straight vs {k} + save/restore + {n - k}: resumed == uninterrupted: True")
