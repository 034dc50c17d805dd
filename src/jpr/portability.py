"""One kernel family for every matrix product: the same bits on every CPU.

XLA:CPU sends a matrix product to one of two places. A *canonical* product
(``lhs[batch…, m…, k…] · rhs[batch…, k…, n…]``, or with ``rhs[batch…, n…,
k…]``, which YNNPACK reads in place) becomes a YNNPACK fusion, whose result
was measured equal on AVX2, AVX-512 and arm64 CPUs. A product
whose contraction runs over another dimension, such as the weight gradient
``h.T @ g`` that autodiff writes for every dense layer, stays a plain ``dot``
that Eigen hands to oneDNN's sgemm, and oneDNN picks its kernel from the CPU
it runs on (AVX2, AVX-512 and arm64 each gave other bits; measured, see
docs/hardware.md). XLA folds a transpose into the product's dimension numbers,
so writing ``x.T`` yourself does not help. Convolutions go to a library too,
and their weight gradients differ on arm64.

:func:`portable` rewrites a function's every ``dot_general`` into such a
product behind ``optimization_barrier`` calls (an explicit transpose of an
operand where needed, which XLA then cannot fold back; a product whose
result is only read transposed, as autodiff writes every weight gradient,
becomes the product of the swapped operands), and every
convolution of one feature group into exact data movement (pad, strided
slices) and one such product (a dilated input split by phase first:
:mod:`jpr._convolution`), and every floating-point sum into a fixed
pairwise tree of elementwise additions (a reduction kernel's order follows
the CPU's vector width), everywhere in the function, nested jaxprs
included (``jit``, ``scan``, ``while``, ``cond``, ``shard_map``, ``remat``,
``custom_jvp``/``custom_vjp``). Each value is unchanged up to the order of its
additions; the kernel that computes it is the same on every CPU. Grouped
convolutions (depthwise ones) are left as they are: :func:`library_dots` and
the probe do not see them, so keep them out of a step that must be portable.

Apply it *outside* the gradient: ``jax.jit(jpr.portable(step))`` where
``step`` calls ``jax.grad``. The backward products are written by autodiff;
:func:`portable` sees them only if the gradient is taken inside.

This module imports JAX: it is for your training code, not for ``jpr compare``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.extend.core as jcore
import numpy as np
from jax import lax

from jpr._convolution import conv_as_dot
from jpr.errors import JprError

__all__ = [
    "canonical_dimension_numbers",
    "is_canonical",
    "library_dots",
    "portable",
    "rewrite_jaxpr",
]

F = TypeVar("F", bound=Callable[..., Any])

_DOT = "dot_general"
_CONV = "conv_general_dilated"
_SUM = "reduce_sum"
# The primitives the rewrite emits, taken from JAX itself (no private import).
_TRANSPOSE_P = jax.make_jaxpr(lambda x: x.T)(np.zeros((1, 2), np.float32)).eqns[0].primitive
_BARRIER_P = jax.make_jaxpr(lax.optimization_barrier)(np.float32(0)).eqns[0].primitive

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def _layouts(ndim_lhs: int, ndim_rhs: int, dims: DimensionNumbers) -> tuple[list[int], list[int]]:
    """The permutations that put ``lhs`` as (batch, free, contract) and ``rhs`` as
    (batch, contract, free), each free group kept in its original order."""
    (lc, rc), (lb, rb) = dims
    lfree = [d for d in range(ndim_lhs) if d not in lc and d not in lb]
    rfree = [d for d in range(ndim_rhs) if d not in rc and d not in rb]
    return [*lb, *lfree, *lc], [*rb, *rc, *rfree]


def canonical_dimension_numbers(
    ndim_lhs: int, ndim_rhs: int, *, n_batch: int, n_contract: int
) -> DimensionNumbers:
    """The dimension numbers of a canonical product of arrays of these ranks.

    Example:
        >>> from jpr.portability import canonical_dimension_numbers
        >>> canonical_dimension_numbers(2, 2, n_batch=0, n_contract=1)
        (((1,), (0,)), ((), ()))
        >>> canonical_dimension_numbers(3, 3, n_batch=1, n_contract=1)
        (((2,), (1,)), ((0,), (0,)))
    """
    batch = tuple(range(n_batch))
    lhs_c = tuple(range(ndim_lhs - n_contract, ndim_lhs))
    rhs_c = tuple(range(n_batch, n_batch + n_contract))
    return (lhs_c, rhs_c), (batch, batch)


def is_canonical(ndim_lhs: int, ndim_rhs: int, dimension_numbers: DimensionNumbers) -> bool:
    """Whether a ``dot_general`` already has the canonical form.

    Example:
        >>> from jpr.portability import is_canonical
        >>> is_canonical(2, 2, (((1,), (0,)), ((), ())))   # x @ w
        True
        >>> is_canonical(2, 2, (((0,), (0,)), ((), ())))   # x.T @ g, a weight gradient
        False
    """
    lperm, rperm = _layouts(ndim_lhs, ndim_rhs, dimension_numbers)
    return lperm == list(range(ndim_lhs)) and rperm == list(range(ndim_rhs))


def _permuted_aval(aval: Any, perm: list[int]) -> Any:
    shape = tuple(aval.shape[p] for p in perm)
    sharding = getattr(aval, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is not None and len(spec) == len(perm):
        permuted = sharding.update(spec=jax.sharding.PartitionSpec(*(spec[p] for p in perm)))
        return aval.update(shape=shape, sharding=permuted)
    return aval.update(shape=shape)


def _eqn(invars, outvars, primitive, params, like) -> jcore.JaxprEqn:
    return jcore.new_jaxpr_eqn(
        invars, outvars, primitive, params, jcore.no_effects, like.source_info, like.ctx
    )


def _canonical_operand(var: Any, perm: list[int], like: Any, out: list) -> Any:
    """``var`` transposed by ``perm`` (if it is not the identity) and put behind a
    barrier, so that XLA cannot fold a transpose into the product; the new
    equations are appended to ``out``."""
    if isinstance(var, jcore.Literal):
        if perm != list(range(len(perm))):
            raise NotImplementedError("a literal operand of a non-canonical dot_general")
        return var
    if perm != list(range(len(perm))):
        moved = jcore.Var(_permuted_aval(var.aval, perm))
        out.append(_eqn([var], [moved], _TRANSPOSE_P, {"permutation": tuple(perm)}, like))
        var = moved
    kept = jcore.Var(var.aval)
    out.append(_eqn([var], [kept], _BARRIER_P, {}, like))
    return kept


def _rhs_layout(ndim_rhs: int, dims: DimensionNumbers, canonical: list[int]) -> list[int]:
    """The permutation ``rhs`` gets: none where it is laid out (batch, free,
    contract), as in ``g @ w.T`` (every input gradient), which a YNNPACK product
    reads in place (a 1024x1024 copy in front cost 2.5 ms; the canary proves its
    bits on AVX2, AVX-512 and arm64); ``canonical`` otherwise."""
    (_, rc), (_, rb) = dims
    rfree = [d for d in range(ndim_rhs) if d not in rc and d not in rb]
    in_place = [*rb, *rfree, *rc] == list(range(ndim_rhs))
    return list(range(ndim_rhs)) if in_place else canonical


def _moved(dims: DimensionNumbers, lperm: list[int], rperm: list[int]) -> DimensionNumbers:
    """``dims`` of the operands after ``lperm`` and ``rperm``."""
    (lc, rc), (lb, rb) = dims

    def where(perm: list[int], axes: Sequence[int]) -> tuple[int, ...]:
        return tuple(perm.index(a) for a in axes)

    return (where(lperm, lc), where(rperm, rc)), (where(lperm, lb), where(rperm, rb))


def _rewrite_dot(eqn: Any, out: list) -> None:
    """Every product behind barriers, in a form YNNPACK takes: a transpose written
    anywhere (by ``x.T``, by autodiff, in another jaxpr) stays a transpose."""
    lhs, rhs = eqn.invars
    dims = eqn.params["dimension_numbers"]
    nl, nr = len(lhs.aval.shape), len(rhs.aval.shape)
    lperm, rperm = _layouts(nl, nr, dims)
    rperm = _rhs_layout(nr, dims, rperm)
    new_lhs = _canonical_operand(lhs, lperm, eqn, out)
    new_rhs = _canonical_operand(rhs, rperm, eqn, out)
    params = {**eqn.params, "dimension_numbers": _moved(dims, lperm, rperm)}
    (result,) = eqn.outvars
    product = jcore.Var(result.aval)
    out.append(_eqn([new_lhs, new_rhs], [product], eqn.primitive, params, eqn))
    # the result too: XLA would fold a transpose of it (autodiff writes one
    # after every weight gradient) back into the operands.
    out.append(_eqn([product], [result], _BARRIER_P, {}, eqn))


def _free_swap(eqn: Any) -> list[int]:
    """The permutation that turns a product's result (batch, lhs free, rhs free)
    into that of the product with its operands swapped (batch, rhs free, lhs free)."""
    lhs, rhs = eqn.invars
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nb, nl = len(lb), len(lhs.aval.shape) - len(lb) - len(lc)
    nr = len(rhs.aval.shape) - len(rb) - len(rc)
    return [*range(nb), *range(nb + nl, nb + nl + nr), *range(nb, nb + nl)]


def _transposed_products(jaxpr: jcore.Jaxpr) -> dict[int, Any]:
    """The products (by ``id``) whose result only a transpose reads, one that
    swaps the two operands' free dimensions: autodiff writes one after every
    weight gradient (``transpose(dot(g, x))``)."""
    uses: dict[Any, int] = {}
    for v in [*(v for e in jaxpr.eqns for v in e.invars), *jaxpr.outvars]:
        if isinstance(v, jcore.Var):
            uses[v] = uses.get(v, 0) + 1
    made = {e.outvars[0]: e for e in jaxpr.eqns if e.primitive.name == _DOT}
    found = {}
    for eqn in jaxpr.eqns:
        product = made.get(eqn.invars[0]) if eqn.primitive is _TRANSPOSE_P else None
        if (product is not None and uses[eqn.invars[0]] == 1
                and list(eqn.params["permutation"]) == _free_swap(product)):
            found[id(product)] = eqn
    return found


def _swapped(product: Any, transpose: Any) -> Any:
    """``transpose(product(a, b))`` as one product of ``b`` and ``a``, the same
    products summed over the same axis. Without the barriers XLA makes this
    fold itself; with them, it fused the transpose into every consumer of the
    result instead (Adam's two moments, each then reading a 1024x1024 gradient
    with a stride: 5 ms each against 0.5 ms; measured in docs/performance.md)."""
    (lc, rc), (lb, rb) = product.params["dimension_numbers"]
    precision = product.params.get("precision")
    if isinstance(precision, tuple):
        precision = precision[::-1]
    params = {**product.params, "dimension_numbers": ((rc, lc), (rb, lb)), "precision": precision}
    sharding = product.params.get("out_sharding")
    if sharding is not None:  # a sharded step's product names its result's sharding
        perm = transpose.params["permutation"]
        spec = (*sharding.spec, *[None] * (len(perm) - len(sharding.spec)))
        params["out_sharding"] = sharding.update(
            spec=jax.sharding.PartitionSpec(*(spec[p] for p in perm)))
    return product.replace(invars=product.invars[::-1], outvars=transpose.outvars, params=params)


def _rewrite_conv(eqn: Any, out: list) -> bool:
    """Replace a convolution of one feature and batch group by :func:`conv_as_dot`
    (a ``closed_call`` of its rewritten jaxpr); ``False`` for grouped ones."""
    params = eqn.params
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return False
    avals = [v.aval for v in eqn.invars]
    traced = jax.make_jaxpr(functools.partial(conv_as_dot, **params))(
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals)
    )
    body = jcore.ClosedJaxpr(rewrite_jaxpr(traced.jaxpr), traced.consts)
    out.append(_eqn(eqn.invars, eqn.outvars, jcore.primitives.closed_call_p,
                    {"call_jaxpr": body}, eqn))
    return True


def _tree_sum(x: Any, *, axes: tuple[int, ...], **_: Any) -> Any:
    """``x`` summed over ``axes`` in a fixed pairwise order, written out.

    Each level adds the first half of the remaining terms to the second half,
    elementwise (an odd one out is carried to the next level), so the order of
    every addition is part of the program, not of a reduction kernel's
    vector width: the same bits on every CPU. log2(n) levels for n terms.
    """
    import jax.numpy as jnp

    kept = [d for d in range(x.ndim) if d not in axes]
    x = jnp.transpose(x, (*kept, *axes)).reshape(*(x.shape[d] for d in kept), -1)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        pair = x[..., :half] + x[..., half:2 * half]
        x = jnp.concatenate([pair, x[..., 2 * half:]], axis=-1) if x.shape[-1] % 2 else pair
    return x[..., 0] if x.shape[-1] == 1 else jnp.zeros(x.shape[:-1], x.dtype)


def _rewrite_sum(eqn: Any, out: list) -> bool:
    """Replace a floating-point ``reduce_sum`` by :func:`_tree_sum`."""
    (aval,) = [v.aval for v in eqn.invars]
    if not np.issubdtype(aval.dtype, np.floating) or not eqn.params["axes"]:
        return False
    traced = jax.make_jaxpr(functools.partial(_tree_sum, axes=tuple(eqn.params["axes"])))(
        jax.ShapeDtypeStruct(aval.shape, aval.dtype)
    )
    out.append(_eqn(eqn.invars, eqn.outvars, jcore.primitives.closed_call_p,
                    {"call_jaxpr": jcore.ClosedJaxpr(traced.jaxpr, traced.consts)}, eqn))
    return True


def _rewrite_param(value: Any, *, convolutions: bool) -> Any:
    if isinstance(value, jcore.ClosedJaxpr):
        return jcore.ClosedJaxpr(rewrite_jaxpr(value.jaxpr, convolutions=convolutions),
                                 value.consts)
    if isinstance(value, jcore.Jaxpr):
        return rewrite_jaxpr(value, convolutions=convolutions)
    if isinstance(value, tuple | list) and any(
        isinstance(v, jcore.Jaxpr | jcore.ClosedJaxpr) for v in value
    ):
        return type(value)(_rewrite_param(v, convolutions=convolutions) for v in value)
    return value


def rewrite_jaxpr(jaxpr: jcore.Jaxpr, *, convolutions: bool = True) -> jcore.Jaxpr:
    """``jaxpr`` with every product in YNNPACK's forms, every float sum a tree, recursively.

    Args:
        jaxpr: an open jaxpr (``closed.jaxpr`` of a ``jax.make_jaxpr`` result).
        convolutions: also rewrite each convolution of one feature group (see
            :func:`portable`).

    Returns:
        A jaxpr with the same inputs and outputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jpr.portability import rewrite_jaxpr
        >>> closed = jax.make_jaxpr(lambda a, b: a.T @ b)(jnp.ones((4, 3)), jnp.ones((4, 2)))
        >>> [e.primitive.name for e in closed.jaxpr.eqns]
        ['transpose', 'dot_general']
        >>> [e.primitive.name for e in rewrite_jaxpr(closed.jaxpr).eqns][1:]
        ['optimization_barrier', 'optimization_barrier', 'dot_general', 'optimization_barrier']
    """
    eqns: list = []
    folded = _transposed_products(jaxpr)
    skip = {id(t) for t in folded.values()}
    for eqn in jaxpr.eqns:
        if id(eqn) in skip:
            continue
        if eqn.primitive.name == _DOT:
            _rewrite_dot(_swapped(eqn, folded[id(eqn)]) if id(eqn) in folded else eqn, eqns)
            continue
        if convolutions and eqn.primitive.name == _CONV and _rewrite_conv(eqn, eqns):
            continue
        if eqn.primitive.name == _SUM and _rewrite_sum(eqn, eqns):
            continue
        params = {k: _rewrite_param(v, convolutions=convolutions) for k, v in eqn.params.items()}
        if any(params[k] is not v for k, v in eqn.params.items()):
            eqn = eqn.replace(params=params)
        eqns.append(eqn)
    return jaxpr.replace(eqns=eqns)


def _is_dynamic(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic | bool | int | float | complex)


def portable(fn: F, *, convolutions: bool = True) -> F:
    """``fn`` with every matrix product in the form that every CPU computes alike.

    The returned function traces ``fn`` to a jaxpr, rewrites it with
    :func:`rewrite_jaxpr` and evaluates the result; array arguments (and
    Python numbers) are traced, any other argument is passed through as a
    static value. Use it under ``jax.jit``, and outside ``jax.grad``
    (``jax.jit(portable(step))`` where ``step`` takes the gradient): the
    products autodiff writes exist only once the gradient is taken.

    ``fn`` runs on copies of its arguments, rebuilt from their leaves. A Flax
    NNX step that updates its objects in place (``@nnx.jit @jpr.portable``
    over ``train_step(model, optimizer, rngs, batch)``) gets its updates
    written back with ``nnx.update``: params, optimizer state, the ``Rngs``
    counts. Any other argument behaves as under ``jax.jit``, which passes
    pytrees by value: an item set in a dict inside ``fn`` is not seen outside.

    Args:
        fn: a function of arrays and pytrees of arrays.
        convolutions: rewrite convolutions too (the default). Their rewrite is
            exact data movement (every window, stacked) and products (their
            cost, measured: docs/performance.md). ``False`` leaves them to the library,
            whose bits then follow the CPU (they differ between x86-64 CPUs
            even under the pin, and on arm64).

    Returns:
        A function with the signature and results of ``fn``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import jpr
        >>> def loss(w, x):
        ...     return jnp.sum(jnp.tanh(x @ w) ** 2)
        >>> step = jax.jit(jpr.portable(jax.grad(loss)))
        >>> w, x = jnp.ones((3, 2)) / 4, jnp.arange(12.0).reshape(4, 3) / 12
        >>> bool(jnp.allclose(step(w, x), jax.grad(loss)(w, x), rtol=1e-6))
        True
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dynamic = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]

        def traced(*values: Any) -> Any:
            full = list(leaves)
            for i, v in zip(dynamic, values, strict=True):
                full[i] = v
            a, kw = jax.tree_util.tree_unflatten(treedef, full)
            out = fn(*a, **kw)
            # What fn updated in place (an NNX step's Variables) is returned too.
            after, after_def = jax.tree_util.tree_flatten((a, kw))
            if after_def != treedef:
                raise JprError(f"jpr.portable: {_name(fn)} changed the structure of its arguments")
            return out, [after[i] for i in dynamic]

        values = [leaves[i] for i in dynamic]
        closed, shape = jax.make_jaxpr(traced, return_shape=True)(*values)
        flat = jcore.jaxpr_as_fun(
            jcore.ClosedJaxpr(rewrite_jaxpr(closed.jaxpr, convolutions=convolutions),
                              closed.consts)
        )(*jax.tree_util.tree_leaves(values))
        out, new = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), flat)
        if any(n is not v for n, v in zip(new, values, strict=True)):
            _write_back(args, kwargs, leaves, treedef, dict(zip(dynamic, new, strict=True)))
        return out

    return wrapped  # type: ignore[return-value]


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _write_back(args: tuple, kwargs: dict, leaves: list, treedef: Any, new: dict[int, Any]) -> None:
    """Give the NNX objects that ``fn`` updated in place their new values.

    ``portable`` runs ``fn`` on copies of its arguments (rebuilt from their
    leaves), so an update made in place (``optimizer.update(model, grads)``,
    a dropout ``Rngs`` count) lands in the copies; ``nnx.update`` writes it
    into the caller's objects, as ``nnx.jit`` expects. Any other argument
    is left as ``jax.jit`` leaves it: a pytree is passed by value there too.
    """
    full = list(leaves)
    for i, v in new.items():
        full[i] = v
    new_args, new_kwargs = jax.tree_util.tree_unflatten(treedef, full)
    nnx = _nnx()
    start = 0
    for old, updated in [*zip(args, new_args, strict=True),
                         *((kwargs[k], new_kwargs[k]) for k in kwargs)]:
        count = len(jax.tree_util.tree_leaves(old))
        moved = any(new.get(i, full[i]) is not leaves[i] for i in range(start, start + count))
        start += count
        if moved and nnx is not None and nnx.graph.is_graph_node(old):
            nnx.update(old, nnx.state(updated))


def _nnx() -> Any:
    import sys

    module = sys.modules.get("flax.nnx")  # only a caller that passes NNX objects has loaded it
    return module


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_DEFINE = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT_LINE = re.compile(r"%([\w.\-]+) = .* dot\(%([\w.\-]+), %([\w.\-]+)\), (.*)")
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def _computations(hlo: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line.strip())
        if m and not line.startswith(" "):
            current = blocks.setdefault(m.group(1), [])
        elif line.startswith(" "):
            current.append(line.strip())
    return blocks


def _contraction_size(line: str, shapes: dict[str, list[int]]) -> int:
    m = _DOT_LINE.search(line)
    if not m:
        return 0
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m.group(4))
    lhs = shapes.get(m.group(2), [])
    size = 1
    for d in (int(x) for x in (dims.group(1).split(",") if dims and dims.group(1) else [])):
        size *= lhs[d] if d < len(lhs) else 0
    return size


def library_dots(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[str]:
    """The matrix products of ``jax.jit(fn)(*args)`` that XLA leaves to a runtime library.

    Compiles ``fn`` for the CPU and reads the optimized HLO: every ``dot``
    that sums over more than one element and is not inside a YNNPACK fusion
    is computed by a kernel that the runtime library (Eigen, oneDNN) picks
    from the CPU it runs on. An empty list means every product of ``fn``
    computes the same bits on every CPU where YNNPACK's were measured alike.

    Returns:
        One line per such product: its HLO name, shape and dimension numbers.

    Example:
        >>> import jax.numpy as jnp
        >>> import jpr
        >>> from jpr.portability import library_dots
        >>> a, b = jnp.ones((64, 32)), jnp.ones((64, 10))
        >>> len(library_dots(lambda a, b: a.T @ b, a, b))
        1
        >>> library_dots(jpr.portable(lambda a, b: a.T @ b), a, b)
        []
    """
    hlo = jax.jit(fn).lower(*args, **kwargs).compile().as_text()
    blocks = _computations(hlo)
    in_ynn = {
        name
        for lines in blocks.values()
        for line in lines
        if "__ynn_fusion" in line
        for name in _CALLS.findall(line)
    }
    found = []
    for name, lines in blocks.items():
        if name in in_ynn:
            continue
        shapes = {
            m.group(1): [int(x) for x in m.group(2).split(",") if x]
            for m in (_DEFINE.search(line) for line in lines)
            if m
        }
        for line in lines:
            if " dot(" in line and _contraction_size(line, shapes) > 1:
                found.append(line.split(", metadata=")[0])
    return found
