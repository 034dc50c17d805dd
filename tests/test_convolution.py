"""The convolution rewrite jpr.portable uses (jpr._convolution): values and work."""

from __future__ import annotations

import math

import jax
import jax.extend.core as jcore
import numpy as np
import pytest
from jax import lax

from jpr._convolution import conv_as_dot

SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _operands(lengths, kernel, *, c=3, o=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *lengths, c)).astype(np.float32)
    w = rng.standard_normal((*kernel, c, o)).astype(np.float32)
    sp = SPATIAL[len(lengths)]
    dn = lax.conv_dimension_numbers(x.shape, w.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
    return x, w, dn


# (input lengths, kernel, strides, padding, lhs_dilation, rhs_dilation): a
# strided convolution's input gradient (dilation 2, SAME-like padding), a
# dilation of 3 with a kernel dilation of 2 (taps 3 apart, 2 apart after),
# negative padding (cropping), a phase with no taps (a 1-wide kernel, dilation
# 3), an output length no multiple of the dilation, dilated and strided
# dimensions side by side, one and three spatial dimensions; kernels with more
# positions than the output (weight gradients), undilated and in a phase.
CASES = [
    ((7, 7), (3, 3), (1, 1), ((1, 2), (1, 2)), (2, 2), (1, 1)),
    ((6, 5), (3, 2), (1, 1), ((2, 1), (0, 3)), (3, 1), (2, 1)),
    ((6, 6), (3, 3), (1, 1), ((-1, 2), (2, -2)), (2, 2), (1, 1)),
    ((5, 4), (1, 2), (1, 1), ((0, 0), (1, 1)), (3, 1), (1, 1)),
    ((5, 6), (2, 3), (1, 2), ((1, 1), (1, 0)), (2, 1), (1, 1)),
    ((9,), (4,), (1,), ((3, 2),), (2,), (1,)),
    ((3, 4, 3), (2, 2, 3), (1, 1, 1), ((1, 1), (0, 1), (2, 2)), (2, 1, 2), (1, 2, 1)),
    ((9, 8), (7, 4), (1, 1), ((1, 1), (0, 1)), (1, 1), (1, 2)),
    ((8,), (6,), (2,), ((0, 1),), (1,), (1,)),
    ((2,), (7,), (1,), ((3, 3),), (2,), (1,)),
]


@pytest.mark.parametrize(("lengths", "kernel", "strides", "padding", "lhs", "rhs"), CASES)
def test_the_rewrite_computes_the_convolution(lengths, kernel, strides, padding, lhs, rhs):
    x, w, dn = _operands(lengths, kernel)
    kw = {"window_strides": strides, "padding": padding, "lhs_dilation": lhs,
          "rhs_dilation": rhs, "dimension_numbers": dn}
    want = lax.conv_general_dilated(x, w, **kw)
    got = jax.jit(lambda x, w: conv_as_dot(x, w, **kw))(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _products(fn, *args) -> list[tuple[int, int, int]]:
    """(m, k, n) of every product in ``fn``'s jaxpr, nested calls included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                a, b = (v.aval.shape for v in eqn.invars)
                k = math.prod(a[d] for d in lc)
                found.append((math.prod(a) // k, k, math.prod(b) // k))
            for sub in jcore.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_a_strided_convolutions_input_gradient_multiplies_no_dilation_zeros():
    # The input gradient of a 3x3 convolution of stride 2 (14x14 -> 7x7) is a
    # convolution of the 7x7 gradient dilated to 13x13, three entries in four
    # zeros. By phase, output positions (even, even) meet 4 taps, (even, odd)
    # and (odd, even) 2, (odd, odd) 1: 9 taps per 4 positions, not 36.
    x, w, _ = _operands((14, 14), (3, 3), c=16, o=32)

    def forward(x):
        return lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = np.ones((2, 7, 7, 32), np.float32)
    (eqn,) = [e for e in jax.make_jaxpr(jax.vjp(forward, x)[1])(g).jaxpr.eqns
              if e.primitive.name == "conv_general_dilated"]
    assert eqn.params["lhs_dilation"] == (2, 2)

    k = np.random.default_rng(1).standard_normal(eqn.invars[1].aval.shape).astype(np.float32)

    def rewritten(g, k):
        return conv_as_dot(g, k, **eqn.params)

    done = sum(m * kk * n for m, kk, n in _products(rewritten, g, k))
    assert done == 2 * 7 * 7 * (4 + 2 + 2 + 1) * 32 * 16  # per phase: positions x taps x C x O
    want = lax.conv_general_dilated_p.bind(g, k, **eqn.params)
    np.testing.assert_allclose(np.asarray(jax.jit(rewritten)(g, k)), np.asarray(want),
                               rtol=1e-5, atol=1e-4)
