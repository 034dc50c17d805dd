"""Reproducible Flax Linen training: `rngs={"dropout": k}` with k derived from the step.

    python snippets/recipes/linen_train_loop.py

`init` gets the ``params`` key, `apply` gets ``rngs={"dropout": ...}``, and inside
the module ``self.make_rng("dropout")`` (what ``nn.Dropout`` calls) derives
its keys from the one passed in. That key is ``fold_in(dropout_root, step)``,
made inside ``jit`` from the traced step, so a restarted run draws the same
masks. Proof: 10 steps straight == 5 + restart + 5.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)  # calls self.make_rng("dropout")
        noise = jax.random.normal(self.make_rng("dropout"), x.shape)  # your own draws too
        return nn.Dense(1)(x + 0.01 * noise * train)


MODEL, TX = MLP(), optax.adam(1e-2)


def init(seed: int):
    params_key, dropout_root, data_root = jax.random.split(jax.random.key(seed), 3)
    params = MODEL.init({"params": params_key}, jnp.zeros((1, 4)), train=False)["params"]
    return params, TX.init(params), {"dropout": dropout_root, "data": data_root}


@jax.jit
def train_step(params, opt_state, roots, step):  # `step` is a traced argument
    x = jax.random.normal(jax.random.fold_in(roots["data"], step), (16, 4))
    y = jnp.sum(jnp.sin(x), axis=1, keepdims=True)
    dropout_key = jax.random.fold_in(roots["dropout"], step)

    def loss_fn(p):
        pred = MODEL.apply({"params": p}, x, train=True, rngs={"dropout": dropout_key})
        return jnp.mean((pred - y) ** 2)

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def train(params, opt_state, roots, start: int, stop: int):
    for step in range(start, stop):
        params, opt_state = train_step(params, opt_state, roots, jnp.uint32(step))
    return params, opt_state


def same_bits(a, b) -> bool:
    return all(x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main() -> None:
    params, opt_state, roots = init(seed=0)
    straight, _ = train(params, opt_state, roots, 0, 10)

    half = jax.device_get(train(params, opt_state, roots, 0, 5))  # a checkpoint's content
    jax.clear_caches()  # a "new process": everything rebuilt from the seed and the state
    _, _, roots = init(seed=0)
    resumed, _ = train(*jax.device_put(half), roots, 5, 10)

    print("trained: 10 steps straight, and 5 + restart + 5")
    print(f"resumed == uninterrupted: {same_bits(resumed, straight)}")
    print(f"training changed the params: {not same_bits(straight, params)}")


if __name__ == "__main__":
    main()
