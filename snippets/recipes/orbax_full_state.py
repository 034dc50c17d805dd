"""Save and restore *all* training state with a plain Orbax CheckpointManager.

    python snippets/recipes/orbax_full_state.py [CHECKPOINT_DIR]

The state: params, optimizer state, the step, a typed data key that is split
every step (``jax.random.key``), and the model's ``nnx.RngState`` (a dropout
stream whose counter advances every call). Orbax 0.12.8 saves typed keys as
they are (key data on disk plus the impl name) and restores them typed: no
``key_data``/``wrap_key_data`` by hand. Proof: 8 steps straight == 4 steps,
save, restore into a freshly built state, 4 more.
"""

import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

TX = optax.sgd(0.1, momentum=0.9)


def fresh_state(seed: int = 0):
    """The graph of the model (static) and the whole state at step 0."""
    k_params, k_dropout, k_data = jax.random.split(jax.random.key(seed), 3)
    rngs = nnx.Rngs(params=k_params, dropout=k_dropout)  # named streams
    model = nnx.Sequential(nnx.Linear(4, 16, rngs=rngs), nnx.Dropout(0.3, rngs=rngs),
                           nnx.Linear(16, 1, rngs=rngs))
    graphdef, params, rng_state = nnx.split(model, nnx.Param, nnx.RngState)
    return graphdef, {"params": params, "rng_state": rng_state, "opt_state": TX.init(params),
                      "step": jnp.int32(0), "key": k_data}


GRAPHDEF = fresh_state()[0]


@jax.jit
def train_step(state):
    key, batch_key = jax.random.split(state["key"])  # a carried key: it must be saved
    x = jax.random.normal(batch_key, (8, 4))

    model = nnx.merge(GRAPHDEF, state["params"], state["rng_state"])

    def loss_fn(model):
        return jnp.mean((model(x) - jnp.cos(x).sum(1, keepdims=True)) ** 2)

    grads = nnx.grad(loss_fn)(model)  # w.r.t. the nnx.Param leaves; advances the dropout stream
    rng_state = nnx.state(model, nnx.RngState)
    updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "rng_state": rng_state,
            "opt_state": opt_state, "step": state["step"] + 1, "key": key}


def bits(tree):
    return [(str(x.dtype), np.asarray(jax.random.key_data(x) if jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x).tobytes()) for x in jax.tree.leaves(tree)]


def train(state, steps: int):
    for _ in range(steps):
        state = train_step(state)
    return state


def main(directory: Path) -> None:
    straight = train(fresh_state()[1], 8)
    state = train(fresh_state()[1], 4)
    with ocp.CheckpointManager(directory.absolute() / "ckpt") as mngr:
        mngr.save(int(state["step"]), args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        # As a new process would: the target's structure from a freshly built state.
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_state()[1])
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
    print(f"restored step: {int(restored['step'])}, key dtype: {restored['key'].dtype}")
    print(f"restored == saved (typed key, RngState included): {bits(restored) == bits(state)}")
    restored = train(restored, 4)
    count = restored["rng_state"]["layers"][1]["rngs"]["count"][...]
    print(f"dropout stream calls after resuming: {int(count)}")
    print(f"resumed == uninterrupted: {bits(restored) == bits(straight)}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:  # deleted afterwards
            main(Path(tmp))
