"""Gradient accumulation that equals the full batch bitwise, and what MultiSteps does.

    python snippets/recipes/grad_accumulation.py

Floating-point addition is not associative, so "the same gradient" means the
same additions in the same order. Here both the full batch and the
microbatches add per-example gradients into one running sum, left to right
(`lax.scan` over examples, the running sum carried from one microbatch to the
next), then divide by the batch size once: 1 x 32 and 4 x 8 are the same bits.
A single `jax.grad` of the mean loss, or `optax.MultiSteps` (a running mean,
acc + (g - acc) / (n + 1), of microbatch means), adds in other orders: whether
they happen to match is measured below, not promised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

B, MICRO = 32, 4  # batch size, number of microbatches (8 examples each)


def loss(params, x, y):  # one example
    return (jnp.tanh(x @ params["w"]) @ params["v"] - y)[0] ** 2


@jax.jit
def add_grads(params, acc, xs, ys):
    """acc + g(x_0) + g(x_1) + ... in that order: the one rule every variant follows."""
    def body(acc, example):
        return jax.tree.map(jnp.add, acc, jax.grad(loss)(params, *example)), None

    return jax.lax.scan(body, acc, (xs, ys))[0]


def full_batch(params, x, y):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.tree.map(lambda g: g / B, add_grads(params, zeros, x, y))


def accumulated(params, x, y):  # MICRO separate calls, as a memory-bound loop would
    acc = jax.tree.map(jnp.zeros_like, params)
    for xm, ym in zip(x.reshape(MICRO, -1, 16), y.reshape(MICRO, -1, 1), strict=True):
        acc = add_grads(params, acc, xm, ym)  # the running sum goes on where it stopped
    return jax.tree.map(lambda g: g / B, acc)


mean_grad = jax.jit(jax.grad(lambda p, x, y: jnp.mean(jax.vmap(loss, (None, 0, 0))(p, x, y))))


def multisteps(params, x, y):
    """optax.MultiSteps fed the microbatch mean gradients: the update it emits."""
    opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=MICRO)
    state = opt.init(params)
    for xm, ym in zip(x.reshape(MICRO, -1, 16), y.reshape(MICRO, -1, 1), strict=True):
        updates, state = opt.update(mean_grad(params, xm, ym), state, params)
    return jax.tree.map(jnp.negative, updates)  # sgd(1.0): update = -gradient


def same_bits(a, b) -> bool:
    return all(np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main() -> None:
    kw, kv, kx = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(kw, (16, 32)), "v": jax.random.normal(kv, (32, 1))}
    x = jax.random.normal(kx, (B, 16))
    y = jnp.sin(x).sum(axis=1, keepdims=True)
    full, acc = full_batch(params, x, y), accumulated(params, x, y)
    one_grad, multi = mean_grad(params, x, y), multisteps(params, x, y)
    print(f"{MICRO} x {B // MICRO} accumulated == 1 x {B} full batch: {same_bits(acc, full)}")
    print(f"jax.grad of the mean == fixed-order full batch (measured): {same_bits(one_grad, full)}")
    print(f"optax.MultiSteps == jax.grad of the mean (measured): {same_bits(multi, one_grad)}")
    print(f"optax.MultiSteps == fixed-order full batch (measured): {same_bits(multi, full)}")


if __name__ == "__main__":
    main()
