"""A convolution as exact data movement and canonical products (for jpr.portable).

:func:`conv_as_dot` computes ``lax.conv_general_dilated`` of one feature and
batch group without a convolution kernel: the input is padded, cut into the
windows the kernel sees (strided slices, stacked: the patch matrix) and
multiplied with the kernel by one canonical ``dot_general``, so every sum
runs in YNNPACK's product kernel, whose bits every CPU agrees on.

A weight gradient is a convolution whose "kernel" is an image (the output's
gradient) and whose output is the small kernel; there the windows are
enumerated over the output's positions instead, cut from the input in its own
layout (batch first): they are the forward convolution's windows, and XLA
computes that patch matrix P once for both. The product is Pᵀ · g; its
rewrite transposes P. The other way round, gᵀ · P, was as fast but put the
patches' long side in the product's columns, and YNNPACK blocks a product
with many columns and a long contraction differently on arm64 than on
x86-64 (measured: 34 of 100 shapes; docs/hardware.md). What the rewrite
costs an MNIST-sized CNN is measured by benchmarks/bench_cpu_target.py
(docs/performance.md).

A convolution whose input is dilated (``lhs_dilation``: the input gradient of
a strided convolution, a transposed convolution) is split by phase first.
With a dilation of 2, three in four entries of the dilated input are zeros,
and each output position meets the input's real entries at only some of the
kernel's taps, the same taps for every position of one phase (position mod
2). Each phase is then an ordinary convolution of the undilated input with
those taps; the phases' outputs are interleaved back. No window holds the
dilation's zeros, so the products are 2**d times smaller for d dilated
dimensions, and the values differ from the dilated form's only in the order
of the additions (the zeros' terms are gone).

Everything here is data movement (pad, slice, stack, transpose, reshape)
except the ``dot_general`` calls; it imports JAX.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["conv_as_dot"]


def conv_as_dot(lhs: Any, rhs: Any, *, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, precision=None, preferred_element_type=None,
                **_: Any) -> Any:
    """``lax.conv_general_dilated`` (one group) as data movement and canonical products.

    Takes the convolution primitive's parameters (``feature_group_count`` and
    ``batch_group_count`` must be 1; they are ignored).

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jpr._convolution import conv_as_dot
        >>> x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 5, 3)), jnp.float32)
        >>> w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4)), jnp.float32)
        >>> dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        >>> kw = dict(window_strides=(1, 1), padding=((1, 2), (0, 1)), lhs_dilation=(2, 1),
        ...           rhs_dilation=(1, 2), dimension_numbers=dn)
        >>> rewritten = jax.jit(lambda x, w: conv_as_dot(x, w, **kw))
        >>> bool(jnp.allclose(rewritten(x, w), jax.lax.conv_general_dilated(x, w, **kw),
        ...                   atol=1e-5))
        True
    """
    ls, rs, os_ = dimension_numbers.lhs_spec, dimension_numbers.rhs_spec, dimension_numbers.out_spec
    x = jnp.transpose(lhs, (ls[0], *ls[2:], ls[1]))  # N, spatial…, C
    w = jnp.transpose(rhs, (*rs[2:], rs[1], rs[0]))  # kernel…, C, O
    product = {"precision": precision, "preferred_element_type": preferred_element_type}
    dims = _Dims(tuple(window_strides), tuple(tuple(p) for p in padding),
                 tuple(lhs_dilation), tuple(rhs_dilation))
    dilated = any(d > 1 for d in dims.lhs_dilation)
    if dilated and all(d == 1 or s == 1 for d, s in zip(dims.lhs_dilation, dims.strides,
                                                         strict=True)):
        out = _by_phase(x, w, dims, product)
    else:
        out = _convolve(x, w, dims, product)
    back = [0] * out.ndim  # (N, spatial…, O) -> out_spec
    for i, d in enumerate((os_[0], *os_[2:], os_[1])):
        back[d] = i
    return jnp.transpose(out, back)


class _Dims(NamedTuple):
    """A convolution's geometry, one entry per spatial dimension."""

    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]


def _convolve(x: Any, w: Any, dims: _Dims, product: dict) -> Any:
    """The convolution of ``x`` (N, spatial…, C) with ``w`` (kernel…, C, O),
    (N, out…, O): windows enumerated over the kernel's positions or, when the
    output has fewer (a weight gradient, whose "kernel" is an image), over the
    output's."""
    out = _output_size(x.shape[1:-1], w.shape[:-2], dims)
    if math.prod(w.shape[:-2]) <= math.prod(out):
        return _windows(x, w, out, dims, product)
    n_sp = x.ndim - 2  # (C, spatial…, N) and (C, kernel…, O): XLA merges these transposes
    return _by_output_position(jnp.transpose(x, (n_sp + 1, *range(1, n_sp + 1), 0)),
                               jnp.moveaxis(w, -2, 0), out, dims, product)


def _padded(x: Any, dims: _Dims) -> Any:
    """``x`` (·, spatial…, ·) padded and dilated, materialised once (a barrier):
    XLA would otherwise recompute the padding inside every window's slice, 10x
    slower on a strided convolution's gradient."""
    pads = [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(dims.padding, dims.lhs_dilation,
                                                               strict=True)), (0, 0, 0)]
    return lax.optimization_barrier(lax.pad(x, np.zeros((), x.dtype), pads))


def _windows(x: Any, w: Any, out_sp: list[int], dims: _Dims, product: dict) -> Any:
    """One slice of ``x`` (N, spatial…, C) per kernel position, stacked (the
    patch matrix, N·out × kernel·C), times the kernel: (N, out…, O)."""
    n_sp = x.ndim - 2
    x = _padded(x, dims)
    ksz = w.shape[:n_sp]
    n, c, o = x.shape[0], x.shape[-1], w.shape[-1]
    cols = [
        lax.slice(x, (0, *(k * d for k, d in zip(pos, dims.rhs_dilation, strict=True)), 0),
                  (n, *(k * d + (m - 1) * s + 1 for k, d, m, s in
                        zip(pos, dims.rhs_dilation, out_sp, dims.strides, strict=True)), c),
                  (1, *dims.strides, 1))
        for pos in np.ndindex(*ksz)
    ]
    patches = jnp.stack(cols, axis=-2).reshape(-1, math.prod(ksz) * c)
    kernel = w.reshape(math.prod(ksz) * c, o)
    out = lax.dot_general(patches, kernel, (((1,), (0,)), ((), ())), **product)
    return out.reshape(n, *out_sp, o)


def _length(n: int, k: int, *, padding: tuple[int, int], lhs_dilation: int, rhs_dilation: int,
            stride: int) -> int:
    """The output length of one spatial dimension: input ``n``, kernel ``k``."""
    lo, hi = padding
    return (lo + (n - 1) * lhs_dilation + 1 + hi - ((k - 1) * rhs_dilation + 1)) // stride + 1


def _output_size(lengths, kernel, dims: _Dims) -> list[int]:
    """The convolution's output length per spatial dimension."""
    return [_length(n, k, padding=p, lhs_dilation=d, rhs_dilation=rd, stride=s)
            for n, k, p, d, rd, s in zip(lengths, kernel, dims.padding, dims.lhs_dilation,
                                         dims.rhs_dilation, dims.strides, strict=True)]


def _by_output_position(x: Any, g: Any, out_sp: list[int], dims: _Dims, product: dict) -> Any:
    """A convolution whose kernel has more positions than its output (a weight
    gradient: the kernel ``g`` is the output's gradient, an image), (B, out…, O).

    ``x`` is (F, spatial…, B) and ``g`` (F, kernel…, O): the contraction runs
    over F and the kernel's positions, which lead both operands, as the input
    and its gradient lie in memory (batch first). One window of ``x`` per output
    position, stacked, is the patch matrix P (F·kernel, out·B); the result is
    Pᵀ · ``g`` (out·B, O).
    """
    x = _padded(x, dims)
    f, b, o = x.shape[0], x.shape[-1], g.shape[-1]
    ksz = g.shape[1:-1]
    span = [(k - 1) * d + 1 for k, d in zip(ksz, dims.rhs_dilation, strict=True)]
    windows = [
        lax.slice(x, (0, *(m * s for m, s in zip(pos, dims.strides, strict=True)), 0),
                  (f, *(m * s + sp for m, s, sp in zip(pos, dims.strides, span, strict=True)), b),
                  (1, *dims.rhs_dilation, 1))
        for pos in np.ndindex(*out_sp)
    ]
    patches = jnp.stack(windows, axis=-2).reshape(f * math.prod(ksz), -1)
    out = lax.dot_general(patches, g.reshape(f * math.prod(ksz), o), (((0,), (0,)), ((), ())),
                          **product)  # (out·B, O)
    return jnp.moveaxis(out.reshape(*out_sp, b, o), -2, 0)


class _Phase(NamedTuple):
    """One phase of one spatial dimension: its output positions are ``r``,
    ``r + d``, … (``size`` of them), and it is the convolution of the
    undilated input with the kernel's taps ``first``, ``first + step``, …
    (none if ``first`` is None) at ``padding`` and ``rhs_dilation``."""

    size: int
    first: int | None
    step: int
    padding: tuple[int, int]
    rhs_dilation: int


def _phases(length: int, ksize: int, *, stride: int, padding: tuple[int, int],
            lhs_dilation: int, rhs_dilation: int) -> list[_Phase]:
    """The phases of one spatial dimension (one for an undilated one).

    Output position ``o`` meets input entry ``t`` at tap ``k`` where ``o *
    stride + k * rhs_dilation - lo = t * lhs_dilation``; with a dilation ``d``
    (and stride 1) that has a solution only for the taps with ``(o + k *
    rhs_dilation - lo) % d == 0``, which depends on ``o`` only through ``o % d``.
    """
    lo, _ = padding
    d, rd = lhs_dilation, rhs_dilation
    out = _length(length, ksize, padding=padding, lhs_dilation=d, rhs_dilation=rd, stride=stride)
    if d == 1:
        return [_Phase(max(out, 0), 0, 1, padding, rd)]
    step = d // math.gcd(rd, d)  # taps of one phase are `step` apart
    phases = []
    for r in range(d):
        size = len(range(r, max(out, 0), d))
        taps = [k for k in range(ksize) if (r + k * rd - lo) % d == 0]
        if not taps or size == 0:
            phases.append(_Phase(size, None, step, (0, 0), 1))
            continue
        first, sub_rd = taps[0], rd * step // d
        shift = (r + first * rd - lo) // d  # input entry of the first tap at position r
        sub_span = (len(range(first, ksize, step)) - 1) * sub_rd + 1
        phases.append(_Phase(size, first, step, (-shift, size - 1 + sub_span - length + shift),
                             sub_rd))
    return phases


def _by_phase(x: Any, w: Any, dims: _Dims, product: dict) -> Any:
    """The convolution of a dilated input (stride 1 where dilated), phase by
    phase: (N, spatial…, O), each phase's output interleaved into place."""
    n_sp = x.ndim - 2
    per_dim = [
        _phases(x.shape[1 + i], w.shape[i], stride=dims.strides[i], padding=dims.padding[i],
                lhs_dilation=dims.lhs_dilation[i], rhs_dilation=dims.rhs_dilation[i])
        for i in range(n_sp)
    ]
    cells = [max(p.size for p in ps) for ps in per_dim]  # the longest phase's positions
    outs = [_pad_to(_phase_output(x, w, combo, dims, product), cells)
            for combo in itertools.product(*per_dim)]
    # Interleave, the last dimension first: stacking its phases right after its
    # cell axis and merging the two puts cell j of phase r at j * d + r. Each
    # level copies runs of everything after that axis, contiguous.
    for i in reversed(range(n_sp)):
        d = len(per_dim[i])
        outs = [_merged(jnp.stack(outs[k:k + d], axis=2 + i), 1 + i)
                for k in range(0, len(outs), d)]
    (out,) = outs
    n, o = out.shape[0], out.shape[-1]
    sizes = [sum(p.size for p in ps) for ps in per_dim]
    return lax.slice(out, (0,) * out.ndim, (n, *sizes, o))


def _merged(y: Any, axis: int) -> Any:
    """``y`` with axes ``axis`` and ``axis + 1`` merged into one."""
    return y.reshape(*y.shape[:axis], y.shape[axis] * y.shape[axis + 1], *y.shape[axis + 2:])


def _phase_output(x: Any, w: Any, combo: tuple[_Phase, ...], dims: _Dims,
                  product: dict) -> Any:
    """One phase's output, (N, sizes…, O): its taps' convolution, or zeros."""
    n, o = x.shape[0], w.shape[-1]
    if any(p.first is None or p.size == 0 for p in combo):
        dtype = product["preferred_element_type"] or jnp.result_type(x, w)
        return jnp.zeros((n, *(p.size for p in combo), o), dtype)
    taps = w[tuple(slice(p.first, None, p.step) for p in combo)]
    sub = _Dims(tuple(s if d == 1 else 1 for s, d in zip(dims.strides, dims.lhs_dilation,
                                                        strict=True)),
                tuple(p.padding for p in combo), (1,) * len(combo),
                tuple(p.rhs_dilation for p in combo))
    return _convolve(x, taps, sub, product)


def _pad_to(y: Any, cells: list[int]) -> Any:
    """``y`` (N, spatial…, O) padded with zeros at the end of each spatial
    dimension to ``cells``."""
    pads = [(0, 0, 0), *((0, c - s, 0) for c, s in zip(cells, y.shape[1:-1], strict=True)),
            (0, 0, 0)]
    return lax.pad(y, np.zeros((), y.dtype), pads)
