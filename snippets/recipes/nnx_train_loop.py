"""Reproducible Flax NNX training: named streams, per-step dropout keys, restart-proof.

    python snippets/recipes/nnx_train_loop.py

The model draws its weights from the ``params`` stream of ``nnx.Rngs``; the
dropout key of step t is ``fold_in(dropout_root, t)``, computed inside ``jit``
from the step (a traced argument), so no key depends on how many steps ran
before in this process. Proof: 10 steps straight == 5 steps, a restart from a
host copy of the state, then 5 more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)  # weights from the 'params' stream
        self.drop = nnx.Dropout(0.5)  # no stored stream: the key is passed per call
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x, dropout_key):
        return self.out(self.drop(nnx.relu(self.hidden(x)), rngs=dropout_key))


def init(seed: int):
    # One stream per purpose, all split from one seed (seed + 1 would be another run's seed).
    params, dropout, data = jax.random.split(jax.random.key(seed), 3)
    rngs = nnx.Rngs(params=params, dropout=dropout, data=data)
    graphdef, params = nnx.split(MLP(rngs))
    # The roots of the per-step keys: plain typed keys, never advanced.
    roots = {"dropout": rngs.dropout.key[...], "data": rngs.data.key[...]}
    return graphdef, params, roots


TX = optax.adam(1e-2)


def make_step(graphdef):
    @jax.jit
    def train_step(params, opt_state, roots, step):  # `step` is traced: one compile
        x = jax.random.normal(jax.random.fold_in(roots["data"], step), (16, 4))
        y = jnp.sum(jnp.sin(x), axis=1, keepdims=True)
        dropout_key = jax.random.fold_in(roots["dropout"], step)  # this step's, from the step

        def loss_fn(p):
            return jnp.mean((nnx.merge(graphdef, p)(x, dropout_key) - y) ** 2)

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return train_step


def train(params, opt_state, roots, graphdef, start: int, stop: int):
    step_fn = make_step(graphdef)
    for step in range(start, stop):  # steps start..stop-1, whatever ran before
        params, opt_state = step_fn(params, opt_state, roots, jnp.uint32(step))
    return params, opt_state


def same_bits(a, b) -> bool:
    return all(x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main() -> None:
    graphdef, params, roots = init(seed=0)
    straight, _ = train(params, TX.init(params), roots, graphdef, 0, 10)

    half, opt_half = train(params, TX.init(params), roots, graphdef, 0, 5)
    host = jax.device_get((half, opt_half))  # what a checkpoint would hold
    jax.clear_caches()  # a "new process": rebuild everything from the seed...
    graphdef, _, roots = init(seed=0)
    resumed, _ = train(*jax.device_put(host), roots, graphdef, 5, 10)  # ...and load the state

    print("trained: 10 steps straight, and 5 + restart + 5")
    print(f"resumed == uninterrupted: {same_bits(resumed, straight)}")
    print(f"training changed the params: {not same_bits(straight, params)}")


if __name__ == "__main__":
    main()
