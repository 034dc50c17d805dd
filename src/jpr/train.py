"""The jitted training step: Optax Adam on the MLP, with dropout keyed by step.

Two ways to spread a global batch over devices (and processes):

* ``microbatches=None`` (data parallel): one jitted step over the whole global
  batch, sharded along the batch axis. The dropout mask of the whole batch comes
  from one key; with ``jax_threefry_partitionable`` (the default) each device
  draws its slice of the same bits. Only the gradient reduction depends on the
  device count, so the bits can move by a few ULPs when it changes.
* ``microbatches=M``: the global batch is cut into ``M`` microbatches; each is
  processed with dropout key ``fold_in(step key, m)`` inside ``jax.shard_map``,
  the per-microbatch gradients are all-gathered and summed in one fixed
  left-to-right order. The result is bitwise the same on 1, 2, 4 or 8 devices
  and on several processes, as long as the device count divides ``M``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jpr import model, rng
from jpr.config import RunConfig
from jpr.portability import portable

__all__ = [
    "TrainState",
    "evaluate",
    "init_state",
    "make_mesh",
    "make_train_chunk",
    "make_train_step",
    "optimizer",
    "replicate",
    "state_tree",
]

AXIS = "data"


@dataclasses.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
        params: the model's params dict.
        opt_state: Optax Adam state.
        step: number of completed steps.

    Example:
        >>> from jpr.train import TrainState
        >>> TrainState(params={}, opt_state=(), step=40).step
        40
    """

    params: Any
    opt_state: Any
    step: int = 0


def optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    """Optax Adam with the config's learning rate.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.train import optimizer
        >>> tx = optimizer(RunConfig())
        >>> type(tx).__name__
        'GradientTransformationExtraArgs'
    """
    return optax.adam(cfg.lr)


def init_state(
    cfg: RunConfig, *, mesh: jax.sharding.Mesh | None = None
) -> tuple[Any, TrainState]:
    """Fresh ``(graphdef, TrainState)`` at step 0, the same on every process.

    Args:
        cfg: the run config.
        mesh: if given, the state is placed on it as the step returns its
            outputs (:func:`replicate`), so the step compiles once, not twice.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.train import init_state
        >>> graphdef, state = init_state(RunConfig(seed=0))
        >>> state.step
        0
    """
    graphdef, params = model.init_params(cfg)
    state = TrainState(params=params, opt_state=_optimizer_init(cfg)(params), step=0)
    return graphdef, state if mesh is None else replicate(state, mesh)


@functools.lru_cache(maxsize=8)
def _optimizer_init(cfg: RunConfig):
    return jax.jit(optimizer(cfg).init)  # one program for every zero, not one per leaf


def replicate(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """``state`` with its arrays replicated on ``mesh``: the layout the step returns.

    A jitted function is traced and compiled again when its inputs' layout
    changes. The step (and :func:`make_train_chunk`) returns arrays replicated
    on its mesh, so a state fresh from :func:`init_state` (on no mesh yet)
    would cost a second compilation at the second call. The values, and so the
    bits, are unchanged: this only places them.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.hashing import hash_pytree
        >>> from jpr.train import init_state, make_mesh, replicate
        >>> _, state = init_state(RunConfig(seed=0))
        >>> placed = replicate(state, make_mesh(jax.devices()[:1]))
        >>> placed.params["fc1"]["kernel"].sharding.is_fully_replicated
        True
        >>> hash_pytree(placed.params) == hash_pytree(state.params)
        True
    """
    params, opt_state = _replicator(mesh)((state.params, state.opt_state))
    return dataclasses.replace(state, params=params, opt_state=opt_state)


@functools.lru_cache(maxsize=8)
def _replicator(mesh: jax.sharding.Mesh):
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))


def state_tree(state: TrainState, root: jax.Array) -> dict[str, Any]:
    """The pytree that ``state_hash`` covers: params, optimizer, root key, step.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.rng import root_key
        >>> from jpr.train import init_state, state_tree
        >>> _, state = init_state(RunConfig(seed=0))
        >>> sorted(state_tree(state, root_key(0)))
        ['opt_state', 'params', 'rng', 'step']
    """
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": root,
        "step": np.int64(state.step),
    }


def make_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all global devices).

    Example:
        >>> from jpr.train import make_mesh
        >>> make_mesh().axis_names
        ('data',)
    """
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def _loss(graphdef, params, x, y, key):
    logits = model.apply(graphdef, params, x, dropout_key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _fixed_sum(stacked):
    """Sum over the leading axis strictly left to right (an unrolled chain)."""
    total = stacked[0]
    for i in range(1, stacked.shape[0]):
        total = total + stacked[i]
    return total


def make_train_step(cfg: RunConfig, graphdef: Any, *, mesh: jax.sharding.Mesh):
    """Build the jitted ``step_fn(params, opt_state, root, x, y, step)``.

    ``x`` and ``y`` are the *global* batch (a global ``jax.Array`` sharded along
    ``"data"`` in a multi-process run); ``step`` is the index of the step being
    taken; the dropout key is ``step_key(root, "dropout", step)``.

    Returns:
        A function returning ``(params, opt_state, loss)``, all replicated.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpr.config import RunConfig
        >>> from jpr.rng import root_key
        >>> from jpr.train import init_state, make_mesh, make_train_step
        >>> cfg = RunConfig(seed=0)
        >>> graphdef, s = init_state(cfg)
        >>> step_fn = make_train_step(cfg, graphdef, mesh=make_mesh(jax.devices()[:1]))
        >>> x, y = jnp.ones((64, 64)), jnp.zeros((64,), jnp.int32)
        >>> params, opt_state, loss = step_fn(s.params, s.opt_state, root_key(0), x, y, 0)
        >>> loss.shape
        ()
    """
    body, replicated = _step_body(cfg, graphdef, mesh)
    return jax.jit(body, out_shardings=(replicated, replicated, replicated))


def _step_body(cfg: RunConfig, graphdef: Any, mesh: jax.sharding.Mesh):
    """The un-jitted step shared by :func:`make_train_step` and :func:`make_train_chunk`."""
    tx = optimizer(cfg)
    m = cfg.microbatches
    n_dev = mesh.devices.size
    replicated = NamedSharding(mesh, P())
    if m is not None and m % n_dev:
        raise ValueError(f"microbatches ({m}) must be divisible by the device count ({n_dev})")
    if cfg.batch_size % n_dev:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be divisible by the device count ({n_dev})"
        )

    def grads_data_parallel(params, root, x, y, step):
        key = rng.microbatch_key(rng.step_key(root, "dropout", step), 0)
        return jax.value_and_grad(functools.partial(_loss, graphdef))(params, x, y, key)

    def grads_microbatched(params, root, x, y, step):
        local_m = m // n_dev
        dkey = rng.step_key(root, "dropout", step)

        def per_device(params, x, y):
            first = jax.lax.axis_index(AXIS) * local_m
            xs = x.reshape((local_m, -1, *x.shape[1:]))
            ys = y.reshape((local_m, -1, *y.shape[1:]))

            def body(_, inp):
                xb, yb, i = inp
                key = rng.microbatch_key(dkey, first + i)
                return None, jax.value_and_grad(functools.partial(_loss, graphdef))(
                    params, xb, yb, key
                )

            _, (losses, grads) = jax.lax.scan(body, None, (xs, ys, jnp.arange(local_m)))
            gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, tiled=True)
            return gather(losses), jax.tree_util.tree_map(gather, grads)

        losses, grads = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(AXIS), P(AXIS)),
            out_specs=P(),
            check_vma=False,
        )(params, x, y)
        loss = _fixed_sum(losses) / m
        grads = jax.tree_util.tree_map(lambda g: _fixed_sum(g) / m, grads)
        return loss, grads

    compute = grads_data_parallel if m is None else grads_microbatched

    def step_fn(params, opt_state, root, x, y, step):
        loss, grads = compute(params, root, x, y, step)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Every matrix product in the form every CPU computes alike (jpr.portable).
    return portable(step_fn), replicated


def make_train_chunk(cfg: RunConfig, graphdef: Any, *, mesh: jax.sharding.Mesh, width: int):
    """Build ``chunk_fn(params, opt_state, root, xs, ys, steps, n)``: ``n <= width`` steps a call.

    The same step as :func:`make_train_step`, run ``n <= width`` times inside one
    ``lax.fori_loop``, so a host dispatch is paid once per chunk instead of once
    per step. ``xs[i]``, ``ys[i]`` and ``steps[i]`` are the batch and index of the
    ``i``-th step (stacked along a leading axis of length ``width``; rows past
    ``n`` are padding and never read). The loop body is compiled once whatever
    ``n``, and the bits after every step are identical to those of
    :func:`make_train_step`, whatever ``width`` (the tests check it).

    Returns:
        ``(params, opt_state, losses, history)``: the state after ``n`` steps,
        the loss of each step (``[width]``) and the params after each step
        (every leaf stacked along a leading axis of length ``width``).

    Example:
        >>> import numpy as np
        >>> from jpr.config import RunConfig
        >>> from jpr.data import get_batches, make_dataset
        >>> from jpr.hashing import hash_pytree
        >>> from jpr.rng import root_key
        >>> from jpr.train import init_state, make_mesh, make_train_chunk, make_train_step
        >>> cfg = RunConfig(seed=0)
        >>> graphdef, s = init_state(cfg)
        >>> mesh = make_mesh(jax.devices()[:1])
        >>> xs, ys = get_batches(0, 3, ds=make_dataset(cfg), batch_size=64, pad_to=4)
        >>> steps = np.arange(4, dtype=np.uint32)
        >>> chunk_fn = make_train_chunk(cfg, graphdef, mesh=mesh, width=4)
        >>> p, o, losses, hist = chunk_fn(s.params, s.opt_state, root_key(0), xs, ys, steps, 3)
        >>> step_fn = make_train_step(cfg, graphdef, mesh=mesh)
        >>> q, r = s.params, s.opt_state
        >>> for i in range(3):
        ...     q, r, loss = step_fn(q, r, root_key(0), xs[i], ys[i], steps[i])
        >>> hash_pytree(p) == hash_pytree(q) == hash_pytree(jax.tree.map(lambda h: h[2], hist))
        True
    """
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    return _chunk_fn(cfg, graphdef, mesh, width)


@functools.lru_cache(maxsize=8)
def _chunk_fn(cfg: RunConfig, graphdef: Any, mesh: jax.sharding.Mesh, width: int):
    # Cached, so that runs in one process (tests, notebooks) compile the chunk once.
    body, replicated = _step_body(cfg, graphdef, mesh)

    @functools.partial(jax.jit, out_shardings=replicated)
    def chunk_fn(params, opt_state, root, xs, ys, steps, n):
        history = jax.tree_util.tree_map(
            lambda a: jnp.zeros((width, *a.shape), a.dtype), params
        )
        shapes = jax.eval_shape(body, params, opt_state, root, xs[0], ys[0], steps[0])
        losses = jnp.zeros((width,), shapes[2].dtype)  # float64 under jax_enable_x64

        def one(i, carry):
            params, opt_state, losses, history = carry
            params, opt_state, loss = body(params, opt_state, root, xs[i], ys[i], steps[i])
            history = jax.tree_util.tree_map(lambda h, a: h.at[i].set(a), history, params)
            return params, opt_state, losses.at[i].set(loss), history

        return jax.lax.fori_loop(0, n, one, (params, opt_state, losses, history))

    return chunk_fn


@functools.partial(jax.jit, static_argnums=0)
@portable  # its mean, like the step's sums, in the order every CPU agrees on
def _evaluate(graphdef, params, x, y):
    logits = model.apply(graphdef, params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = (jnp.argmax(logits, -1) == y).mean()
    return loss, acc


def evaluate(graphdef: Any, params: Any, x: Any, y: Any) -> tuple[float, float]:
    """Loss and accuracy on ``(x, y)`` without dropout.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.data import make_dataset
        >>> from jpr.train import evaluate, init_state
        >>> cfg = RunConfig(seed=0)
        >>> graphdef, s = init_state(cfg)
        >>> ds = make_dataset(cfg)
        >>> loss, acc = evaluate(graphdef, s.params, ds.eval_x, ds.eval_y)
        >>> 0.0 <= acc <= 1.0
        True
    """
    loss, acc = _evaluate(graphdef, params, x, y)
    return float(loss), float(acc)
