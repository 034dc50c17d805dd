"""jpr.portable: every matrix product canonical, behind barriers, at every depth.

The rewrite is checked three ways: structurally (no non-canonical
``dot_general`` anywhere in the rewritten jaxpr, whatever transform holds it),
numerically (the same values as the function it rewrote, within float
rounding), and in the compiled program (no product left to a runtime library:
:func:`jpr.portability.library_dots`). That the kernels it routes to compute
the same bits on AVX2, AVX-512 and arm64 CPUs is the canary's job
(``scripts/cpu_canary.py``, run under emulation by ``tests/test_cpu_canary.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jpr
from jpr.portability import is_canonical, library_dots, rewrite_jaxpr

KEYS = jax.random.split(jax.random.key(7), 4)
W1 = jax.random.normal(KEYS[0], (32, 48)) * 0.2
W2 = jax.random.normal(KEYS[1], (48, 10)) * 0.2
X = jax.random.normal(KEYS[2], (4, 16, 32))


def _loss(params, x):
    h = jax.nn.relu(x @ params[0])
    return jnp.mean((h @ params[1]) ** 2)


def _dots(jaxpr) -> list:
    """Every dot_general of ``jaxpr`` and of the jaxprs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            for v in value if isinstance(value, tuple | list) else (value,):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    found.extend(_dots(v.jaxpr))
                elif isinstance(v, jax.extend.core.Jaxpr):
                    found.extend(_dots(v))
    return found


def _scan_step(params, x):
    def body(c, xi):
        g = jax.grad(_loss)(c, xi)
        return jax.tree.map(lambda a, b: a - 0.1 * b, c, g), jnp.sum(g[1])

    params, sums = lax.scan(body, params, x)
    return lax.cond(sums[0] > 0, lambda p: p, lambda p: jax.tree.map(jnp.negative, p), params)


def _fori_step(params, x):
    return lax.fori_loop(0, 2, lambda i, p: jax.tree.map(
        lambda a, b: a - 0.1 * b, p, jax.grad(_loss)(p, x[i])), params)


def _remat_step(params, x):
    return jax.grad(lambda p: jax.checkpoint(_loss)(p, x[0]))(params)


@jax.custom_vjp
def _dense(x, w):
    return x @ w


def _dense_fwd(x, w):
    return x @ w, (x, w)


def _dense_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_dense.defvjp(_dense_fwd, _dense_bwd)


def _custom_vjp_step(params, x):
    return jax.grad(lambda p: jnp.sum(jax.nn.relu(_dense(x[0], p[0])) @ p[1]))(params)


def _vmap_step(params, x):
    return jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, x)


def _einsum_step(params, x):
    return jax.grad(lambda p: jnp.sum(jnp.einsum("bij,jk,bik->b", x, p[0], x @ p[0])))(params)


STEPS = {
    "scan+cond": _scan_step,
    "fori_loop": _fori_step,
    "remat": _remat_step,
    "custom_vjp": _custom_vjp_step,
    "vmap batch dims": _vmap_step,
    "einsum, batch and contract": _einsum_step,
}


@pytest.mark.parametrize("name", list(STEPS))
def test_every_product_is_canonical_after_the_rewrite(name):
    closed = jax.make_jaxpr(STEPS[name])((W1, W2), X)
    before = _dots(closed.jaxpr)
    after = _dots(rewrite_jaxpr(closed.jaxpr))
    assert any(not _canonical(e) for e in before), "the case must hold a non-canonical product"
    assert len(after) == len(before)
    assert all(_canonical(e) for e in after)


def _canonical(eqn) -> bool:
    """Canonical, or canonical but for a rhs laid out (batch, free, contract),
    which YNNPACK's products read in place."""
    lhs, rhs = eqn.invars
    dims = eqn.params["dimension_numbers"]
    if is_canonical(lhs.aval.ndim, rhs.aval.ndim, dims):
        return True
    (lc, rc), (lb, rb) = dims
    nl, nr, nb = lhs.aval.ndim, rhs.aval.ndim, len(lb)
    return (list(lb) == list(rb) == list(range(nb))
            and list(lc) == list(range(nl - len(lc), nl))
            and list(rc) == list(range(nr - len(rc), nr)))


@pytest.mark.parametrize("name", list(STEPS))
def test_the_rewrite_keeps_the_values(name):
    want = jax.jit(STEPS[name])((W1, W2), X)
    got = jax.jit(jpr.portable(STEPS[name]))((W1, W2), X)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", list(STEPS))
def test_no_product_is_left_to_a_runtime_library(name):
    assert library_dots(jpr.portable(STEPS[name]), (W1, W2), X) == []


def test_the_unrewritten_weight_gradient_does_reach_the_library():
    # the check above could not fail if library_dots found nothing anywhere
    assert library_dots(jax.grad(_loss), (W1, W2), X[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32])
def test_dtypes_and_preferred_element_type_are_kept(dtype):
    a = (jnp.arange(12 * 8).reshape(12, 8) % 7).astype(dtype)
    b = (jnp.arange(12 * 5).reshape(12, 5) % 5).astype(dtype)

    def f(a, b):
        return (lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32), a.T @ b)

    want, got = jax.jit(f)(a, b), jax.jit(jpr.portable(f))(a, b)
    for w, g in zip(want, got, strict=True):
        assert (g.dtype, g.shape) == (w.dtype, w.shape)
        np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64))


def test_shard_map_bodies_are_rewritten_too():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    P = jax.sharding.PartitionSpec

    def step(params, x):
        def per_device(params, x):
            g = jax.grad(_loss)(params, x[0])
            return jax.tree.map(lambda t: lax.psum(t, "data"), g)

        return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                             out_specs=P())(params, x)

    closed = jax.make_jaxpr(step)((W1, W2), X)
    assert all(_canonical(e) for e in _dots(rewrite_jaxpr(closed.jaxpr)))
    assert not all(_canonical(e) for e in _dots(closed.jaxpr))
    want = jax.jit(step)((W1, W2), X)
    got = jax.jit(jpr.portable(step))((W1, W2), X)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)


def _transposed_results(jaxpr) -> int:
    """How many transposes read a product's result, through its barrier or not."""
    made = {e.outvars[0] for e in jaxpr.eqns if e.primitive.name == "dot_general"}
    made |= {e.outvars[0] for e in jaxpr.eqns
             if e.primitive.name == "optimization_barrier" and e.invars[0] in made}
    return sum(e.primitive.name == "transpose" and e.invars[0] in made for e in jaxpr.eqns)


def test_a_weight_gradient_is_one_product_with_no_transpose_after_it():
    # autodiff writes every weight gradient as transpose(dot(g, x)); the rewrite
    # makes it one product of x and g, so no consumer reads it transposed
    closed = jax.make_jaxpr(jax.grad(_loss))((W1, W2), X[0])
    assert _transposed_results(closed.jaxpr) == 2  # one per layer before
    rewritten = rewrite_jaxpr(closed.jaxpr)
    assert _transposed_results(rewritten) == 0
    assert len(_dots(rewritten)) == len(_dots(closed.jaxpr))
    want = jax.jit(jax.grad(_loss))((W1, W2), X[0])
    got = jax.jit(jpr.portable(jax.grad(_loss)))((W1, W2), X[0])
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)


def test_a_transpose_that_is_not_the_swap_of_a_product_is_kept():
    # (batch, m, n) -> (m, batch, n) is not the product of the swapped operands
    a, b = X, jnp.ones((4, 32, 6))

    def f(a, b):
        return jnp.transpose(lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,)))), (1, 0, 2))

    rewritten = rewrite_jaxpr(jax.make_jaxpr(f)(a, b).jaxpr)
    assert _transposed_results(rewritten) == 1
    np.testing.assert_allclose(jax.jit(jpr.portable(f))(a, b), jax.jit(f)(a, b), rtol=2e-6)


def test_a_sharded_weight_gradient_keeps_its_sharding():
    # a step on sharded inputs names each product's out_sharding; the swapped
    # product names its result's (the transpose's) instead
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec
    x = jax.device_put(X[0], jax.sharding.NamedSharding(mesh, P("data")))
    w = jax.device_put(W1, jax.sharding.NamedSharding(mesh, P()))
    f = jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w)))
    closed = jax.make_jaxpr(f)(w, x)
    assert any(e.params.get("out_sharding") is not None for e in _dots(closed.jaxpr))
    assert _transposed_results(rewrite_jaxpr(closed.jaxpr)) == 0
    np.testing.assert_allclose(jax.jit(jpr.portable(f))(w, x), jax.jit(f)(w, x), rtol=2e-5)


def test_static_arguments_and_pytrees_pass_through():
    def step(params, x, *, scale, name="layer"):
        assert isinstance(scale, str) and name == "layer"  # static: never traced
        return {name: jax.grad(_loss)(params, x * float(scale))}

    out = jax.jit(jpr.portable(functools.partial(step, scale="2.0")))((W1, W2), X[0])
    want = step((W1, W2), X[0], scale="2.0")
    np.testing.assert_allclose(out["layer"][0], want["layer"][0], rtol=2e-5, atol=2e-6)


def test_the_model_step_jpr_trains_with_is_portable():
    from jpr import train
    from jpr.config import RunConfig

    cfg = RunConfig(seed=0)
    graphdef, state = train.init_state(cfg)
    body, _ = train._step_body(cfg, graphdef, train.make_mesh(jax.devices()[:1]))
    args = (state.params, state.opt_state, jpr.root_key(0),
            jnp.ones((cfg.batch_size, cfg.features)), jnp.zeros((cfg.batch_size,), jnp.int32), 0)
    assert library_dots(body, *args) == []


def _cnn_loss(w, x):
    def conv(h, k, strides=(1, 1), dil=(1, 1)):
        return lax.conv_general_dilated(h, k, strides, "SAME", rhs_dilation=dil,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    h = jax.nn.relu(conv(x, w[0], strides=(2, 2)))
    return jnp.mean(jnp.tanh(conv(h, w[1], dil=(2, 1))) ** 2)


CNN_W = (jax.random.normal(KEYS[0], (3, 3, 1, 8)) * 0.3,
         jax.random.normal(KEYS[1], (3, 3, 8, 16)) * 0.1)
CNN_X = jax.random.normal(KEYS[2], (4, 14, 14, 1))


def test_convolutions_and_their_gradients_become_canonical_products():
    step = jpr.portable(jax.grad(_cnn_loss))
    hlo = jax.jit(step).lower(CNN_W, CNN_X).compile().as_text()
    assert " convolution(" not in hlo
    assert " convolution(" in jax.jit(jax.grad(_cnn_loss)).lower(CNN_W, CNN_X).compile().as_text()
    assert library_dots(step, CNN_W, CNN_X) == []
    want, got = jax.jit(jax.grad(_cnn_loss))(CNN_W, CNN_X), jax.jit(step)(CNN_W, CNN_X)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("strides", "padding", "lhs_dilation", "rhs_dilation"),
    [((1, 2), ((2, 1), (0, 1)), (2, 1), (1, 1)),
     ((2, 1), "VALID", (1, 1), (1, 2)),
     ((1, 1), ((0, 0), (3, 3)), (1, 3), (2, 1))],
)
def test_any_layout_stride_padding_and_dilation(strides, padding, lhs_dilation, rhs_dilation):
    x = jnp.transpose(CNN_X, (0, 3, 1, 2)) + 0.5  # NCHW
    w = jnp.transpose(CNN_W[0], (3, 2, 0, 1))  # OIHW

    def f(w, x):
        y = lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                     rhs_dilation=rhs_dilation,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jnp.sum(jnp.sin(y))

    for fn in (f, jax.grad(f, argnums=(0, 1))):
        want, got = jax.jit(fn)(w, x), jax.jit(jpr.portable(fn))(w, x)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)


def test_grouped_convolutions_are_left_as_they_are():
    x = jnp.ones((2, 6, 6, 4))
    w = jnp.ones((3, 3, 1, 4))

    def depthwise(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=4,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    names = [e.primitive.name for e in rewrite_jaxpr(jax.make_jaxpr(depthwise)(x, w).jaxpr).eqns]
    assert names == ["conv_general_dilated"]


def _float_sums(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum" and jnp.issubdtype(
            eqn.invars[0].aval.dtype, jnp.floating
        ):
            count += 1
        for value in eqn.params.values():
            for v in value if isinstance(value, tuple | list) else (value,):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    count += _float_sums(v.jaxpr)
                elif isinstance(v, jax.extend.core.Jaxpr):
                    count += _float_sums(v)
    return count


@pytest.mark.parametrize("axes", [None, 0, (1, 2), (0, 1, 2), 3])
def test_float_sums_become_a_fixed_pairwise_tree(axes):
    x = jax.random.normal(KEYS[3], (5, 7, 9, 6))

    def f(x):
        return jnp.sum(x, axis=axes), jnp.mean(x * x, axis=axes)

    closed = jax.make_jaxpr(f)(x)
    assert _float_sums(closed.jaxpr) == 2
    assert _float_sums(rewrite_jaxpr(closed.jaxpr)) == 0
    want, got = jax.jit(f)(x), jax.jit(jpr.portable(f))(x)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_integer_sums_are_exact_already_and_left_alone():
    x = jnp.arange(24).reshape(4, 6)
    closed = jax.make_jaxpr(lambda x: jnp.sum(x, axis=1))(x)
    assert [e.primitive.name for e in rewrite_jaxpr(closed.jaxpr).eqns] == ["reduce_sum"]


def test_the_tree_is_the_documented_order():
    # 5 terms: ((a + c) + (b + d)) + e, the odd one out carried up each level
    x = jnp.array([1e8, 1.0, -1e8, 1.0, 0.5], jnp.float32)
    got = float(jax.jit(jpr.portable(jnp.sum))(x))
    a, b, c, d, e = (np.float32(v) for v in np.asarray(x))
    # level 1: [a+c, b+d] + carried e -> [a+c, b+d, e]; level 2: [(a+c)+e] + carried (b+d)
    level1 = [a + c, b + d, e]
    level2 = [level1[0] + level1[1], level1[2]]
    assert got == float(level2[0] + level2[1])


def test_convolutions_can_be_left_to_the_library():
    step = jpr.portable(jax.grad(_cnn_loss), convolutions=False)
    hlo = jax.jit(step).lower(CNN_W, CNN_X).compile().as_text()
    assert " convolution(" in hlo
    want, got = jax.jit(jax.grad(_cnn_loss))(CNN_W, CNN_X), jax.jit(step)(CNN_W, CNN_X)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def _in_place_setup():
    import optax
    from flax import nnx

    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rngs = nnx.Rngs(dropout=1)
    return model, optimizer, rngs


def _in_place_step(model, optimizer, rngs, x, y):
    import optax
    from flax import nnx

    def loss_fn(model, rngs):
        logits = nnx.Dropout(0.5)(model(x), rngs=rngs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model, rngs)
    optimizer.update(model, grads)  # in place
    return loss


def test_an_nnx_step_that_updates_in_place_keeps_its_updates():
    """Under nnx.jit, portable runs the step on copies of the objects; what the
    step updates in place (params, Adam's moments and count, the dropout count)
    is written back, so the portable step trains as the plain one does."""
    from flax import nnx

    x, y = jnp.arange(8.0).reshape(2, 4) / 8, jnp.array([0, 2])
    plain, portable = _in_place_setup(), _in_place_setup()
    plain_step = nnx.jit(_in_place_step)
    portable_step = nnx.jit(jpr.portable(_in_place_step))
    for _ in range(3):
        a = plain_step(*plain, x, y)
        b = portable_step(*portable, x, y)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    (pm, po, pr), (qm, qo, qr) = plain, portable
    assert int(qr.dropout.count[...]) == int(pr.dropout.count[...]) == 3
    assert int(qo.step[...]) == int(po.step[...]) == 3
    np.testing.assert_allclose(np.asarray(qm.kernel[...]), np.asarray(pm.kernel[...]), rtol=1e-5)


def test_other_arguments_are_passed_by_value_as_under_jit():
    """Only NNX objects are written back; a dict updated in place inside the
    step is a copy under jax.jit, with or without portable."""

    def step(state, x):
        state["w"] = state["w"] + x
        return state["w"].sum()

    for f in (jax.jit(step), jax.jit(jpr.portable(step))):
        state = {"w": jnp.zeros(2)}
        assert float(f(state, jnp.ones(2))) == 2.0
        assert state["w"].tolist() == [0.0, 0.0]
