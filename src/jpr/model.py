"""The seed's tiny MLP (64 -> 32 -> 10) with dropout, in Flax NNX.

jpr uses Flax NNX, the API Flax recommends for new code, but keeps the training
step functional: :func:`init_params` splits the module into a static graph
definition and a plain dict of arrays, and :func:`apply` merges them back inside
``jax.jit``. Plain dicts hash, checkpoint and shard like any pytree, and the
jitted step avoids ``nnx.jit``'s per-call graph traversal.

Dropout takes its key as an argument at call time (never from a stateful
``nnx.Rngs`` counter), so the mask of step ``t`` is a pure function of
(seed, t): see :func:`jpr.rng.step_key`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from jpr import rng
from jpr.config import RunConfig

__all__ = ["MLP", "apply", "init_params"]

Params = dict[str, Any]


class MLP(nnx.Module):
    """``Linear(features, hidden) -> relu -> Dropout -> Linear(hidden, classes)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from jpr.model import MLP
        >>> m = MLP(64, 32, 10, dropout=0.1, rngs=nnx.Rngs(params=jax.random.key(0)))
        >>> m(jnp.ones((2, 64))).shape
        (2, 10)
    """

    def __init__(
        self, features: int, hidden: int, classes: int, *, dropout: float, rngs: nnx.Rngs
    ):
        self.fc1 = nnx.Linear(features, hidden, rngs=rngs)
        self.drop = nnx.Dropout(dropout)
        self.fc2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits; dropout is applied only when ``dropout_key`` is given."""
        h = nnx.relu(self.fc1(x))
        h = self.drop(h, deterministic=dropout_key is None, rngs=dropout_key)
        return self.fc2(h)


def init_params(cfg: RunConfig, *, key: jax.Array | None = None) -> tuple[nnx.GraphDef, Params]:
    """Build the model from the ``"params"`` stream and split it.

    Every process must call this with the same key: folding the process index
    into it is the classic multi-host bug (each host would train its own model).

    Args:
        cfg: the run config (sizes, dropout rate, seed).
        key: the init key; defaults to ``stream_key(root_key(cfg.seed), "params")``.

    Returns:
        ``(graphdef, params)`` where ``params`` is a nested dict of arrays, e.g.
        ``params["fc1"]["kernel"]``.

    Example:
        >>> from jpr.config import RunConfig
        >>> from jpr.model import init_params
        >>> graphdef, params = init_params(RunConfig(seed=0))
        >>> {k: v["kernel"].shape for k, v in params.items()}
        {'fc1': (64, 32), 'fc2': (32, 10)}
    """
    if key is None:
        key = rng.stream_key(rng.root_key(cfg.seed), "params")
    dims = (cfg.features, cfg.hidden, cfg.classes, cfg.dropout)
    # The module's structure from an abstract build, its arrays from one jitted
    # program (the same bits as building it eagerly, which runs a program per
    # initializer and per scalar on the way).
    graphdef = nnx.graphdef(nnx.eval_shape(functools.partial(_build, *dims), key))
    return graphdef, _init_arrays(*dims, key)


def _build(features: int, hidden: int, classes: int, dropout: float, key: jax.Array) -> MLP:
    return MLP(features, hidden, classes, dropout=dropout, rngs=nnx.Rngs(params=key))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_arrays(features, hidden, classes, dropout, key):
    return nnx.to_pure_dict(nnx.state(_build(features, hidden, classes, dropout, key)))


def apply(
    graphdef: nnx.GraphDef,
    params: Params,
    x: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Run the model given its graph definition and a params dict.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpr.config import RunConfig
        >>> from jpr.model import apply, init_params
        >>> graphdef, params = init_params(RunConfig(seed=0))
        >>> apply(graphdef, params, jnp.zeros((3, 64))).shape
        (3, 10)
    """
    model = nnx.merge(graphdef, nnx.State(params))
    return model(x, dropout_key=dropout_key)
