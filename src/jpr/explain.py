"""``jpr explain A B``: which operation made two runs diverge.

``jpr compare`` names the first step whose parameters differ. ``jpr explain``
replays that step under each record's own setting (its ``XLA_FLAGS``, device
count and config, each in a subprocess of its own, since XLA reads its flags
once, when JAX starts), from the last state the two runs share, and hashes every
intermediate value of the step's jaxpr, equation by equation (through ``jit``,
``custom_jvp``/``custom_vjp``, ``scan`` and ``shard_map`` sub-jaxprs). It then
diffs the two streams and names the first equation whose inputs are bitwise
identical and whose output is not: the primitive, the shapes, the source line
that created it, the path of sub-jaxprs it sits in, and the largest ULP
distance between the two outputs.

The method, and what it can see. Evaluating a jaxpr one equation at a time
changes what XLA fuses, and with it FMA contraction and reduction order, so an
eager replay would see other numbers than the compiled step. Here each compiled
unit of the program (the jitted step; each top-level operation of an un-jitted
function, as JAX's eager dispatch runs it) stays *one* compiled program, with
*probes* added: every intermediate also feeds a 64-bit fingerprint computed in
the same program with integer arithmetic on its bits (a wrapping sum of mixed
words: exact, so it is the same whatever the reduction order or device count,
and cannot itself differ between settings). Probes change the program a
little (a probed value must exist, and XLA may fuse around it differently: on
jpr's own step the probed outputs do differ from the plain step's, which the
report says as ``faithful``), so the streams only propose candidates: each one
is then confirmed on the plain program, compiled without probes and returning
only that equation's inputs and outputs as well, and the first candidate
whose inputs are bitwise equal and whose outputs are not is named. What a
probe cannot see is a value that never exists in the compiled program: when
XLA fuses ``a * b + c`` into one FMA, the product the probe hashes is the
rounded one, so the blame lands on the ``add`` (inputs identical, output
not), which is where the rounding really differs.

:func:`first_divergent_op` is the same engine for two functions of this
process, e.g. a step function and a variant of it.

Exit codes of the command: 0 the divergence is explained (an operation, or a
change made outside the program), 1 the replay does not reproduce it, 2 bad
input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from jpr.errors import JprError

__all__ = [
    "add_explain_arguments",
    "doctor_program",
    "explain_records",
    "first_divergent_op",
    "format_report",
    "main",
    "max_ulps",
    "program_risks",
    "run",
]

# --------------------------------------------------------------------------- fingerprints

_K = ((0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D), (0x27D4EB2F, 0x165667B1, 0xD3A2646C))


def _bits32(x):
    """The value's bits as uint32 words (one per element, two for 64-bit types)."""
    import jax
    import jax.numpy as jnp

    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)


def _fingerprint(x):
    """A uint32[2] fingerprint of ``x``'s bits and positions (exact integer arithmetic)."""
    import jax.numpy as jnp

    w = _bits32(x).reshape(-1)
    pos = jnp.arange(w.shape[0], dtype=jnp.uint32)
    out = []
    for k1, k2, k3 in _K:
        h = w * jnp.uint32(k1) + pos * jnp.uint32(k2) + jnp.uint32(k3)
        h = h ^ (h >> 15)
        h = h * jnp.uint32(k2)
        h = h ^ (h >> 13)
        out.append(jnp.sum(h, dtype=jnp.uint32))
    return jnp.stack(out)


@__import__("functools").cache
def _fingerprint_jit():
    import jax

    return jax.jit(_fingerprint)


# --------------------------------------------------------------------------- the probed interpreter


def _source(eqn) -> str:
    """``file:line (function)`` of the innermost frame outside JAX, shortened."""
    from jax._src import source_info_util as siu

    frame = siu.user_frame(eqn.source_info.traceback)
    if frame is None:
        return "unknown"
    return f"{_short_path(frame.file_name)}:{frame.start_line} ({frame.function_name})"


def _op_line(eqn) -> str:
    """``file:line (function)`` of the innermost frame, JAX's own included."""
    tb = eqn.source_info.traceback
    for f in tb.frames if tb is not None else []:
        path = f.file_name.replace(os.sep, "/")
        rel = path.rsplit("/jax/_src/", 1)[1] if "/jax/_src/" in path else None
        if rel is not None and rel.startswith(_PLUMBING):
            continue  # tracing machinery, not where the operation was written
        return f"{_short_path(f.file_name)}:{f.line_num} ({f.function_name})"
    return "unknown"


# Files under jax/_src/ that trace and dispatch rather than define an operation.
_PLUMBING = (
    "core.py", "source_info_util.py", "pjit.py", "api.py", "linear_util.py",
    "traceback_util.py", "interpreters/", "api_util.py", "dispatch.py", "lax/lax.py",
    "numpy/ufuncs.py", "numpy/ufunc_api.py", "custom_derivatives.py", "lax/control_flow/",
    "numpy/util.py", "sharding_impls.py", "shard_map.py", "ad_checkpoint.py",
    "numpy/array_methods.py",
)

#: Primitives that move or annotate a value without computing: skipped when
#: the two programs' equations are matched up (one setting may have more).
_LAYOUT_ONLY = frozenset({"reshard", "sharding_constraint", "device_put", "mesh_cast", "pvary"})


def _short_path(path: str) -> str:
    p = path.replace(os.sep, "/")
    for marker in ("/site-packages/", "/src/"):
        if marker in p:
            return p.rsplit(marker, 1)[1]
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    return Path(p).name if p.startswith("/") else p


def _details(eqn) -> str:
    """The parameters that decide an equation's numerics, briefly."""
    p = eqn.params
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, rc), _ = p["dimension_numbers"]
        return f"contracting dims {tuple(lc)} x {tuple(rc)}"
    if name.startswith("reduce_") or name in ("argmax", "argmin", "cumsum"):
        axes = p.get("axes", p.get("axis"))
        return f"axes {tuple(axes) if isinstance(axes, (tuple, list)) else axes}"
    return ""


class _Probe:
    """Builds the probed program while it is traced, and collects its metadata."""

    def __init__(self, capture: int | None = None, which: str = "both", probes: bool = True):
        self.sites: list[dict[str, Any]] = []  # one per value: shape, dtype, leading dims
        self.eqns: list[dict[str, Any]] = []  # pre-order: a body before its container
        self.values: list[Any] = []  # per site: fingerprint (or tracer until executed)
        self.captured: dict[str, Any] = {}  # "in0", "out0", ... of eqn `capture`
        self.capture, self.which, self.probes = capture, which, probes
        self._callers: list[str] = []  # user source lines of the enclosing containers
        self._eqn_counter = 0
        self._labels: dict[int, str] = {}

    # A "pending" list of probe values is what a compiled unit (jit, scan body,
    # shard_map body) must return so that its fingerprints leave the unit.
    def site(self, value, lead: int, pending: list) -> int:
        sid = len(self.sites)
        self.sites.append(
            {"shape": list(getattr(value, "shape", ())), "dtype": str(value.dtype), "lead": lead}
        )
        if not self.probes:  # a prefix program: no fingerprints, only the captured values
            self.values.append(None)
            return sid
        fp = _fingerprint_jit()(value)
        self.values.append(fp)
        pending.append(("fp", sid, fp))
        return sid

    def run(self, jaxpr, consts, args, sites, path, lead, pending, top=False):
        """Evaluate ``jaxpr`` with probes; returns (outputs, their sites)."""
        from jax._src import core

        env: dict[Any, tuple[Any, int | None]] = {}

        def read(v):
            if isinstance(v, core.Literal):
                return v.val, None
            return env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = (c, self.site(c, lead, pending) if hasattr(c, "shape") else None)
        for v, a, s in zip(jaxpr.invars, args, sites, strict=True):
            env[v] = (a, s)
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            invals = [x for x, _ in ins]
            eid = self._eqn_counter
            self._eqn_counter += 1
            source = _source(eqn)
            if source == "unknown" and self._callers:
                source = self._callers[-1]
            self._callers.append(source)
            try:
                outs, out_sites, container = self._eval(
                    eqn, invals, [s for _, s in ins], path, lead, pending, top
                )
            finally:
                self._callers.pop()
            if not eqn.primitive.multiple_results:
                outs = [outs]
            if out_sites is None:
                out_sites = [self.site(o, lead, pending) for o in outs]
            if self.capture == eid:
                if self.which in ("in", "both"):
                    for i, x in enumerate(invals):
                        if hasattr(x, "shape"):
                            pending.append(("cap", f"in{i}", x))
                if self.which in ("out", "both"):
                    for i, x in enumerate(outs):
                        pending.append(("cap", f"out{i}", x))
            self.eqns.append(
                {
                    "id": eid,
                    "primitive": eqn.primitive.name,
                    "path": list(path),
                    "in_sites": [s for _, s in ins],
                    "out_sites": out_sites,
                    "in_shapes": [list(getattr(v.aval, "shape", ())) for v in eqn.invars],
                    "out_shapes": [list(getattr(v.aval, "shape", ())) for v in eqn.outvars],
                    "in_dtypes": [str(getattr(v.aval, "dtype", "")) for v in eqn.invars],
                    "out_dtypes": [str(getattr(v.aval, "dtype", "")) for v in eqn.outvars],
                    "producers": [self._labels.get(id(v)) for v in eqn.invars],
                    "source": source,
                    "op_line": _op_line(eqn),
                    "details": _details(eqn),
                    "container": container,
                    "lead": lead,
                }
            )
            for v, o, s in zip(eqn.outvars, outs, out_sites, strict=True):
                env[v] = (o, s)
                self._labels[id(v)] = eqn.primitive.name
        return [read(v)[0] for v in jaxpr.outvars], [read(v)[1] for v in jaxpr.outvars]

    def _eval(self, eqn, invals, in_sites, path, lead, pending, top):
        """Evaluate one equation; containers are descended into (their bodies probed)."""
        name = eqn.primitive.name
        p = eqn.params
        if name in ("jit", "pjit"):
            label = f"jit {p.get('name', '')}".strip()
            closed = p["jaxpr"]
            if top:  # its own compiled program, as eager dispatch runs it
                return self._compiled(eqn, self._body(closed, in_sites, [*path, label]), invals)
            outs, sites = self.run(closed.jaxpr, closed.consts, invals, in_sites,
                                   [*path, label], lead, pending)
            return outs, sites, True
        if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
            closed = p.get("call_jaxpr") or p.get("fun_jaxpr")
            if closed is not None:
                if top:
                    return self._compiled(eqn, self._body(closed, in_sites, [*path, name]), invals)
                outs, sites = self.run(closed.jaxpr, closed.consts, invals, in_sites,
                                       [*path, name], lead, pending)
                return outs, sites, True
        if name == "scan" and not top:
            return (*self._scan(eqn, invals, in_sites, path, lead, pending), True)
        if name == "shard_map" and not top:
            return (*self._shard_map(eqn, invals, in_sites, path, lead, pending), True)
        if top and name in ("scan", "shard_map"):
            def inner(args, pending):
                outs, sites, _ = self._eval(eqn, args, in_sites, path, 0, pending, False)
                return outs, sites

            return self._compiled(eqn, inner, invals)
        return eqn.primitive.bind(*invals, **p), None, False

    def _body(self, closed, in_sites, path):
        def inner(args, pending):
            return self.run(closed.jaxpr, closed.consts, args, in_sites, path, 0, pending)

        return inner

    def _compiled(self, eqn, inner, invals):
        """Run ``inner`` as one jitted program with probes; concrete results come back."""
        import jax
        from jax.sharding import NamedSharding

        box: dict[str, Any] = {}
        out_shardings = eqn.params.get("out_shardings") or ()

        def fn(*args):
            pending: list = []
            outs, sites = inner(list(args), pending)
            outs = [
                jax.lax.with_sharding_constraint(o, s) if isinstance(s, NamedSharding) else o
                for o, s in zip(outs, list(out_shardings) or [None] * len(outs), strict=True)
            ]
            box["sites"], box["pending"] = sites, pending
            return outs, [v for _, _, v in pending]

        outs, probes = jax.jit(fn)(*invals)
        self._resolve(box["pending"], probes)
        return outs, box["sites"], True

    def _resolve(self, pending, probes):
        for (kind, key, _), value in zip(pending, probes, strict=True):
            if kind == "fp":
                self.values[key] = value
            else:
                self.captured[key] = value

    def _inner(self, pending, results, lead):
        """Re-register the probes of a body with the stacked values that left it."""
        for (kind, key, _), value in zip(pending, results, strict=True):
            if kind == "fp":
                self.values[key] = value
                self.sites[key]["lead"] = lead
            else:
                self.captured[key] = value

    def _scan(self, eqn, invals, in_sites, path, lead, pending):
        import jax

        p = eqn.params
        nc, ncarry = p["num_consts"], p["num_carry"]
        closed = p["jaxpr"]
        consts, carry0, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
        csites = in_sites[:nc]
        box: dict[str, Any] = {}

        def body(carry, x):
            inner: list = []
            args = [*consts, *carry, *x]
            # carry and xs are new values each iteration: sites of their own
            sites = [*csites] + [self.site(a, lead + 1, inner) for a in [*carry, *x]]
            outs, osites = self.run(closed.jaxpr, closed.consts, args, sites,
                                    [*path, f"scan (length {p['length']})"], lead + 1, inner)
            box["pending"], box["osites"] = inner, osites
            return outs[:ncarry], (outs[ncarry:], [v for _, _, v in inner])

        carry, (ys, probes) = jax.lax.scan(
            body, list(carry0), list(xs), length=p["length"], reverse=p["reverse"],
            unroll=p["unroll"],
        )
        self._inner(box["pending"], probes, lead + 1)
        outs = [*carry, *ys]
        sites = [self.site(o, lead, pending) for o in outs]
        self._forward(box["pending"], probes, pending)
        return outs, sites

    def _forward(self, inner_pending, results, pending):
        # values computed in a body must also leave the enclosing compiled unit
        for (kind, key, _), value in zip(inner_pending, results, strict=True):
            pending.append((kind, key, value))

    def _shard_map(self, eqn, invals, in_sites, path, lead, pending):
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        p = eqn.params
        mesh = p["mesh"]
        axes = tuple(mesh.axis_names)
        box: dict[str, Any] = {}
        n_dev = int(mesh.devices.size)

        def body(*args):
            inner: list = []
            sites = [self.site(a, lead + 1, inner) for a in args]
            label = f"shard_map ({n_dev} device{'s' if n_dev != 1 else ''})"
            outs, _ = self.run(p["jaxpr"], (), list(args), sites, [*path, label], lead + 1, inner)
            box["pending"] = inner
            return tuple(outs), tuple(jnp.expand_dims(v, 0) for _, _, v in inner)

        probes_spec = P(axes)
        fn = jax.shard_map(
            body, mesh=mesh, in_specs=tuple(p["in_specs"]),
            out_specs=(tuple(p["out_specs"]), probes_spec), check_vma=False,
            axis_names=set(p.get("newly_manual_axes", axes)),
        )
        # out_specs of the probes list must be a pytree prefix: one spec for the list
        outs, probes = fn(*invals)
        self._inner(box["pending"], probes, lead + 1)
        self._forward(box["pending"], probes, pending)
        sites = [self.site(o, lead, pending) for o in outs]
        return list(outs), sites


def _probe(fn, args, capture=None, which="both", probes=True):
    """Trace ``fn(*args)`` and run it with probes: (outputs, probe with numpy values).

    With ``probes=False`` no fingerprint is computed: the program is the plain
    one, returning only what ``capture`` asks for (XLA drops everything after
    it): a jitted prefix of the program.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    closed = jax.make_jaxpr(fn)(*args)
    flat = [a if hasattr(a, "dtype") else jnp.asarray(a) for a in jax.tree_util.tree_leaves(args)]
    probe = _Probe(capture, which, probes)
    top: list = []
    sites = [probe.site(a, 0, top) for a in flat]
    outs, out_sites = probe.run(closed.jaxpr, closed.consts, flat, sites, [], 0, top, top=True)
    for kind, key, value in top:
        if kind == "cap":
            probe.captured[key] = value
    probe.values = [None if v is None else np.asarray(v) for v in probe.values]
    probe.captured = {
        k: np.asarray(jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
                      else v)
        for k, v in probe.captured.items()
    }
    probe.in_sites, probe.out_sites = sites, out_sites
    return outs, probe


def _probed_program(step_fn, args):
    """A jitted ``step_fn`` that also returns the fingerprint of every intermediate.

    For a jitted ``step_fn`` (one top-level ``jit``): the program that
    :func:`jpr.explain.explain_records` compiles under each setting, compiled
    once here so that it can be timed (``benchmarks/bench_explain.py``).
    """
    import jax
    import jax.numpy as jnp

    closed = jax.make_jaxpr(step_fn)(*args)
    (eqn,) = closed.jaxpr.eqns
    inner = eqn.params["jaxpr"]
    flat = [a if hasattr(a, "dtype") else jnp.asarray(a) for a in jax.tree_util.tree_leaves(args)]

    @jax.jit
    def program(*flat_args):
        probe = _Probe()
        pending: list = []
        sites = [probe.site(a, 0, pending) for a in flat_args]
        outs, _ = probe.run(inner.jaxpr, inner.consts, list(flat_args), sites, [], 0, pending)
        return outs, [v for _, _, v in pending]

    return program, flat


# --------------------------------------------------------------------------- the diff


def _ordered(a):
    """Floats mapped to integers whose difference is the ULP distance."""
    import numpy as np

    a = np.asarray(a)
    if a.dtype.kind != "f":
        return None
    n = a.dtype.itemsize * 8
    i = a.view({16: np.int16, 32: np.int32, 64: np.int64}[n]).astype(np.int64)
    sign = np.int64(1) << np.int64(n - 1)
    return np.where(i >= 0, i, -(i & (sign - 1)))


def max_ulps(a, b) -> int | None:
    """Largest ULP distance between two float arrays of one shape (``None``: not floats).

    Example:
        >>> import numpy as np
        >>> from jpr.explain import max_ulps
        >>> x = np.float32([1.0, 2.0])
        >>> max_ulps(x, np.nextafter(x, np.float32(3)))
        1
    """
    import numpy as np

    oa, ob = _ordered(a), _ordered(b)
    if oa is None or ob is None or oa.shape != ob.shape:
        return None
    return int(np.max(np.abs(oa - ob))) if oa.size else 0


def _site_eq(va, vb, sa, sb, lead):
    """Per-iteration equality of two sites' fingerprints, broadcast to ``lead`` dims."""
    import numpy as np

    if va.shape != vb.shape or sa["shape"] != sb["shape"] or sa["dtype"] != sb["dtype"]:
        return None
    eq = np.all(va == vb, axis=-1)
    return eq.reshape(eq.shape + (1,) * (lead - eq.ndim)) if eq.ndim < lead else eq


def _candidates(pa, pb, limit: int = 8) -> list[dict[str, Any]]:
    """Equations with identical inputs and different outputs, in program order.

    Equations with a body come after the equations of their body, so the
    deepest equation is named first; a container (a ``shard_map`` whose local
    values cannot be compared across device counts) only when nothing in it is.
    """
    import numpy as np

    leaves, containers = [], []
    eqns_a = [e for e in pa.eqns if e["primitive"] not in _LAYOUT_ONLY]
    eqns_b = [e for e in pb.eqns if e["primitive"] not in _LAYOUT_ONLY]
    for ea, eb in zip(eqns_a, eqns_b, strict=False):
        lead = ea["lead"]
        same_op = ea["primitive"] == eb["primitive"] and len(ea["in_sites"]) == len(eb["in_sites"])
        ins_equal = np.ones((), bool)
        comparable = True
        for sa, sb in zip(ea["in_sites"], eb["in_sites"], strict=False):
            if sa is None or sb is None:
                continue
            eq = _site_eq(pa.values[sa], pb.values[sb], pa.sites[sa], pb.sites[sb], lead)
            if eq is None:
                comparable = False
                break
            ins_equal = ins_equal & eq
        if not comparable:
            continue
        outs_differ = np.zeros((), bool)
        for sa, sb in zip(ea["out_sites"], eb["out_sites"], strict=False):
            eq = _site_eq(pa.values[sa], pb.values[sb], pa.sites[sa], pb.sites[sb], lead)
            if eq is None:
                comparable = False
                break
            outs_differ = outs_differ | ~eq
        if not comparable and same_op:
            continue
        # a different op at this position: the programs part ways here, if its
        # output differs (or cannot even be compared)
        hit = ins_equal & outs_differ if comparable else ins_equal
        if np.any(hit):
            where = [int(i) for i in np.argwhere(hit)[0]] if np.ndim(hit) else []
            found = {"eqn_a": ea, "eqn_b": eb, "iteration": where, "same_op": same_op}
            (containers if ea["container"] else leaves).append(found)
            if len(leaves) >= limit:
                break
    return leaves + containers[:1]


def _confirmed(found, cap_a, cap_b) -> bool:
    """Whether the plain programs (no probes) agree: same inputs, different outputs."""
    import numpy as np

    def same(k):
        a, b = cap_a.get(k), cap_b.get(k)
        return a is not None and b is not None and a.shape == b.shape and (
            a.view(np.uint8) == b.view(np.uint8)
        ).all()

    ins = [k for k in cap_a if k.startswith("in")]
    outs = [k for k in cap_a if k.startswith("out")]
    if not found["same_op"]:
        return all(same(k) for k in ins)
    return all(same(k) for k in ins) and not all(same(k) for k in outs)


def _describe(found, cap_a=None, cap_b=None) -> dict[str, Any]:
    ea, eb = found["eqn_a"], found["eqn_b"]
    out = {
        "primitive": ea["primitive"],
        "primitive_b": eb["primitive"],
        "same_op": found["same_op"],
        "source": ea["source"],
        "source_b": eb["source"],
        "op_line": ea["op_line"],
        "path": ea["path"],
        "in_shapes": ea["in_shapes"],
        "out_shapes": ea["out_shapes"],
        "dtypes": ea["out_dtypes"],
        "in_dtypes": ea["in_dtypes"],
        "details": ea["details"],
        "producers": ea["producers"],
        "iteration": found["iteration"],
        "eqn_index": ea["id"],
        "max_ulps": None,
        "elements_differ": None,
    }
    if cap_a is not None and cap_b is not None:
        import numpy as np

        ulps, n = [], 0
        for k in sorted(cap_a):
            if k.startswith("out") and k in cap_b and cap_a[k].shape == cap_b[k].shape:
                u = max_ulps(cap_a[k], cap_b[k])
                if u is not None:
                    ulps.append(u)
                a, b = cap_a[k], cap_b[k]
                bytes_a = a.view(np.uint8).reshape((*a.shape, -1))
                bytes_b = b.view(np.uint8).reshape((*b.shape, -1))
                n += int((bytes_a != bytes_b).any(axis=-1).sum())
        out["max_ulps"] = max(ulps) if ulps else None
        out["elements_differ"] = n
    return out


def first_divergent_op(f, g, args: tuple) -> dict[str, Any] | None:
    """The first operation at which ``f(*args)`` and ``g(*args)`` part ways.

    Both functions are traced to jaxprs and run with a fingerprint of every
    intermediate value (see the module docstring for how the compiled numerics
    are kept); equations are matched by position. Returns ``None`` when every
    value is bitwise the same, else a dict with ``primitive`` (and
    ``primitive_b``, the op of ``g`` at that position), ``source`` (the line
    that created it), ``path`` (the sub-jaxprs it sits in), ``in_shapes``,
    ``out_shapes``, ``max_ulps`` and ``elements_differ``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jpr.explain import first_divergent_op
        >>> def f(x):
        ...     return jnp.exp(x * 3.0).sum()
        >>> def g(x):
        ...     return jnp.exp2(x * 3.0).sum()
        >>> r = first_divergent_op(f, g, (jnp.linspace(0.0, 1.0, 8),))
        >>> r["primitive"], r["primitive_b"], r["source"].split(" ")[-1], r["confirmed"]
        ('exp', 'exp2', '(f)', True)
    """
    _, pa = _probe(f, args)
    _, pb = _probe(g, args)

    def capture(fn, eqn):
        # the plain program with one equation's inputs and outputs captured
        return _probe(fn, args, capture=eqn, which="both", probes=False)[1].captured

    return _locate(pa, pb, lambda k: capture(f, k), lambda k: capture(g, k))


def _locate(pa, pb, capture_a, capture_b) -> dict[str, Any] | None:
    """The first candidate of the probed streams that the plain programs confirm."""
    first = None
    for tried, found in enumerate(_candidates(pa, pb)[:4], start=1):
        ca, cb = capture_a(found["eqn_a"]["id"]), capture_b(found["eqn_b"]["id"])
        described = _describe(found, ca, cb)
        described["confirmed"] = _confirmed(found, ca, cb)
        described["candidates_tried"] = tried
        if described["confirmed"]:
            return described
        first = first or described
    return first


# --------------------------------------------------------------------------- replaying a record


def _leaf_names(args: tuple, names: tuple[str, ...]) -> list[str]:
    import jax

    from jpr.hashing import leaf_path

    out = []
    for name, a in zip(names, args, strict=True):
        for path, _ in jax.tree_util.tree_leaves_with_path(a):
            out.append("/".join(x for x in (name, leaf_path(path)) if x))
    return out


class _Replay:
    """One record's run, replayed in this process (which has the record's XLA flags)."""

    def __init__(self, record: dict[str, Any]):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from jpr import rng, train
        from jpr.config import RunConfig

        self.record = record
        self.cfg = RunConfig.from_dict(record["config"])
        self._ds = None  # built on first use: explaining step 0 needs no data
        self.graphdef, state = train.init_state(self.cfg)
        self.root = rng.root_key(self.cfg.seed)
        self.mesh = train.make_mesh()
        self.multi = self.mesh.devices.size > 1
        self.batch_sharding = NamedSharding(self.mesh, P(train.AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.step_fn = train.make_train_step(self.cfg, self.graphdef, mesh=self.mesh)
        self.states = {0: (state.params, state.opt_state)}
        self.program_hash = {}
        self.perturb_at = record.get("perturb_at")
        self.devices = jax.device_count()

    @property
    def ds(self):
        from jpr import data

        if self._ds is None:
            self._ds = data.make_dataset(self.cfg)
        return self._ds

    def step_args(self, s: int) -> tuple:
        """The arguments of the step that produces trajectory entry ``s`` (``s >= 1``)."""
        import jax
        import numpy as np

        from jpr import data

        params, opt_state = self.states[s - 1]
        x, y = data.get_batch(s - 1, ds=self.ds, batch_size=self.cfg.batch_size)
        if self.multi:
            params, opt_state = jax.device_put(
                jax.tree_util.tree_map(np.asarray, (params, opt_state)), self.replicated
            )
            x, y = jax.device_put((x, y), self.batch_sharding)
        return params, opt_state, self.root, x, y, np.uint32(s - 1)

    def replay(self, until: int) -> dict[str, Any]:
        """Run steps up to ``until``; the params hash after each, against the record's."""
        import jax.numpy as jnp

        from jpr import hashing

        recorded = {e["step"]: e["params_hash"] for e in self.record["trajectory"]}
        rows = []
        for s in range(0, until + 1):
            if s not in self.states:
                params, opt_state, _ = self.step_fn(*self.step_args(s))
                self.program_hash[s] = hashing.hash_pytree(params)
                if self.perturb_at == s:
                    k = jnp.asarray(params["fc1"]["kernel"]).view(jnp.uint32)
                    k = k.at[0, 0].set(k[0, 0] ^ jnp.uint32(1)).view(jnp.float32)
                    params = {**params, "fc1": {**params["fc1"], "kernel": k}}
                self.states[s] = (params, opt_state)
            params, opt_state = self.states[s]
            h = hashing.hash_pytree(params)
            rows.append(
                {
                    "step": s,
                    "params_hash": h,
                    "program_hash": self.program_hash.get(s, h),
                    "state_hash": hashing.hash_pytree((params, opt_state)),
                    "leaves": hashing.leaf_hashes(params),
                    "recorded": recorded.get(s),
                }
            )
        return {"rows": rows}

    def probe(
        self, s: int, capture: int | None = None, which: str = "both", probes: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Probe the program of step ``s`` (0: the initialisation)."""
        import jax

        from jpr import hashing, model

        if s == 0:
            def fn():
                return model.init_params(self.cfg)[1]

            args, names = (), ()
            plain = fn()
            all_reduce = 0
        else:
            fn = self.step_fn
            args = self.step_args(s)
            names = ("params", "opt_state", "rng", "x", "y", "step")
            plain = fn(*args)
            text = fn.lower(*args).compile().as_text() or ""
            all_reduce = text.count(" all-reduce(") + text.count(" all-reduce-start(")
        outs, probe = _probe(fn, args, capture, which, probes)
        if not probes:
            return {}, {f"cap_{k}": v for k, v in probe.captured.items()}
        flat_plain = jax.tree_util.tree_leaves(plain)
        faithful = hashing.hash_pytree(list(outs)) == hashing.hash_pytree(flat_plain)
        meta = {
            "eqns": probe.eqns,
            "sites": probe.sites,
            "in_sites": probe.in_sites,
            "inputs": _leaf_names(args, names),
            "faithful": faithful,
            "all_reduce": all_reduce,
            "devices": self.devices,
        }
        arrays = {f"fp{i}": v for i, v in enumerate(probe.values)}
        arrays.update({f"cap_{k}": v for k, v in probe.captured.items()})
        return meta, arrays


def _worker(record_path: str, outdir: str) -> int:
    """``python -m jpr.explain --worker RECORD DIR``: answer requests on stdin."""
    import numpy as np

    from jpr.record import read_record
    from jpr.run_repro import enable_compilation_cache

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # only the protocol goes to the real stdout
    enable_compilation_cache()
    replay = _Replay(read_record(record_path))
    out = Path(outdir)
    for n, line in enumerate(sys.stdin):
        req = json.loads(line)
        try:
            if req["cmd"] == "replay":
                meta, arrays = replay.replay(req["until"]), {}
            else:
                meta, arrays = replay.probe(
                    req["step"], req.get("capture"), req.get("which", "both"),
                    req.get("probes", True),
                )
        except Exception as e:  # reported to the parent as one line
            proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
            continue
        (out / f"{n}.json").write_text(json.dumps(meta))
        np.savez(out / f"{n}.npz", **arrays)
        answer = {"json": str(out / f"{n}.json"), "npz": str(out / f"{n}.npz")}
        proto.write(json.dumps(answer) + "\n")
    return 0


def _xla_flags(record: dict[str, Any]) -> str:
    env = record.get("env", {})
    target = env.get("cpu_target")
    flags = None
    if isinstance(target, dict) and target.get("xla_flags"):
        flags = target["xla_flags"]
    flags = flags if flags is not None else env.get("XLA_FLAGS", "") or ""
    n = int(record.get("topology", {}).get("device_count") or env.get("device_count") or 1)
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    return flags


class _Worker:
    def __init__(self, path: str, record: dict[str, Any], tmp: Path, name: str):
        env = dict(os.environ)
        env["XLA_FLAGS"] = _xla_flags(record)
        if record.get("backend"):
            env["JAX_PLATFORMS"] = record["backend"]
        env.pop("JAX_NUM_CPU_DEVICES", None)
        folder = tmp / name
        folder.mkdir()
        # stderr to a file, never a pipe nobody reads while the worker runs
        self.log = (folder / "stderr.txt").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jpr.explain", "--worker", path, str(folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env,
        )
        self.name = name
        self.folder = folder

    def send(self, **req) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> tuple[dict[str, Any], dict[str, Any]]:
        import numpy as np

        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            err = (self.folder / "stderr.txt").read_text(errors="replace").strip().splitlines()
            raise JprError(f"the replay of record {self.name} failed: {err[-1] if err else '?'}")
        msg = json.loads(line)
        if "error" in msg:
            raise JprError(f"the replay of record {self.name} failed: {msg['error']}")
        meta = json.loads(Path(msg["json"]).read_text())
        with np.load(msg["npz"]) as z:
            arrays = {k: z[k] for k in z.files}
        return meta, arrays

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _both(workers, **req):
    for w in workers:
        w.send(**req)
    return [w.receive() for w in workers]


class _Stream:
    """A probe stream read back from a worker (what :func:`_candidates` needs)."""

    def __init__(self, meta, arrays):
        self.eqns, self.sites = meta["eqns"], meta["sites"]
        self.values = [arrays[f"fp{i}"] for i in range(len(self.sites))]
        self.captured = {k[4:]: v for k, v in arrays.items() if k.startswith("cap_")}
        self.meta = meta


def explain_records(path_a: str, path_b: str) -> dict[str, Any]:
    """Replay the first divergent step of two records and name its cause.

    Returns:
        A JSON-ready dict: ``cause`` is ``"op"`` (then ``op`` names the
        operation), ``"outside"`` (the program computes the same bits under
        both settings; the state was changed between steps), ``"inputs"`` (the
        step's inputs already differ) or ``"not_reproduced"``; ``step``,
        ``settings`` and ``replay`` give the evidence.

    Example:
        >>> from jpr.explain import explain_records
        >>> try:
        ...     explain_records("missing-a.json", "missing-b.json")
        ... except Exception as e:
        ...     print(e)
        missing-a.json: no such file
    """
    from jpr.compare import _first_divergence
    from jpr.record import read_record

    try:
        same = os.path.samefile(path_a, path_b)
    except OSError:
        same = False
    ra = read_record(path_a)
    rb = read_record(path_b)
    if same:
        raise JprError(f"{path_a} and {path_b} are the same file; explain two different runs")
    d = _first_divergence(ra["trajectory"], rb["trajectory"])
    if d is None:
        raise JprError(
            f"{path_a} and {path_b} do not diverge in their recorded trajectories: "
            "nothing to explain"
        )
    until, since = d["step"], d["last_equal_step"]
    settings = [
        {"record": str(p), "XLA_FLAGS": _xla_flags(r),
         "device_count": r.get("topology", {}).get("device_count"),
         "process_count": r.get("topology", {}).get("process_count"),
         "microbatches": r["config"].get("microbatches"),
         "perturb_at": r.get("perturb_at")}
        for p, r in ((path_a, ra), (path_b, rb))
    ]
    result: dict[str, Any] = {"settings": settings, "compare_step": until}
    with tempfile.TemporaryDirectory(prefix="jpr-explain-") as tmp:
        workers = [
            _Worker(str(path_a), ra, Path(tmp), "A"),
            _Worker(str(path_b), rb, Path(tmp), "B"),
        ]
        try:
            _explain(workers, until, since, result)
        finally:
            for w in workers:
                w.close()
    return result


def _explain(workers, until, since, result) -> None:
    (rep_a, _), (rep_b, _) = _both(workers, cmd="replay", until=until)
    rows_a, rows_b = rep_a["rows"], rep_b["rows"]
    result["timing"] = {}
    # the replay must reproduce each record where the record has a hash
    bad = [
        (name, r["step"]) for name, rows in (("A", rows_a), ("B", rows_b)) for r in rows
        if r["recorded"] is not None and r["recorded"] != r["params_hash"]
    ]
    result["replay"] = {"matches_records": not bad, "mismatch": bad[:1]}
    start = 0 if since is None else since
    step = next(
        (a["step"] for a, b in zip(rows_a, rows_b, strict=True)
         if a["step"] >= start and a["state_hash"] != b["state_hash"]),
        None,
    )
    result["step"] = step
    if bad or step is None:
        result["cause"] = "not_reproduced"
        return
    a, b = rows_a[step], rows_b[step]
    if step > 0 and a["program_hash"] == b["program_hash"]:
        # the step's program computed the same bits in both: the change came after it
        result["cause"] = "outside"
        result["leaves_differ"] = sorted(
            "params/" + k for k in set(a["leaves"]) | set(b["leaves"])
            if a["leaves"].get(k) != b["leaves"].get(k)
        )
        return
    (ma, fa), (mb, fb) = _both(workers, cmd="probe", step=step)
    sa, sb = _Stream(ma, fa), _Stream(mb, fb)
    result["faithful"] = [ma["faithful"], mb["faithful"]]
    result["all_reduce"] = [ma["all_reduce"], mb["all_reduce"]]
    result["eqns"] = len(ma["eqns"])
    differ = [
        name for name, ia, ib in zip(ma["inputs"], ma["in_sites"], mb["in_sites"], strict=False)
        if not (fa[f"fp{ia}"] == fb[f"fp{ib}"]).all()
    ]
    if differ:
        result["cause"] = "inputs"
        result["inputs_differ"] = differ
        return
    cache: dict[tuple[int, int], dict[str, Any]] = {}

    def capture(i: int, k: int) -> dict[str, Any]:
        # the plain step with one equation's inputs (then its outputs) captured,
        # asked of both workers at once; each answer is kept for the other side
        if (i, k) not in cache:
            got = _both(workers, cmd="probe", step=step, capture=k, which="both", probes=False)
            cache[(0, k)], cache[(1, k)] = (
                {n[4:]: v for n, v in arrays.items() if n.startswith("cap_")} for _, arrays in got
            )
        return cache[(i, k)]

    op = _locate(sa, sb, lambda k: capture(0, k), lambda k: capture(1, k))
    if op is not None:
        result["cause"] = "op"
        result["op"] = op
        op["cross_device"] = _cross_device(op, result)
        return
    result["cause"] = "not_reproduced"


_REDUCTIONS = {"dot_general", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "cumsum",
               "psum", "all_gather", "reduce_scatter"}


def _cross_device(op: dict[str, Any], result: dict[str, Any]) -> bool:
    """A reduction whose sum XLA splits across devices in one setting and not the other."""
    ar = result.get("all_reduce") or [0, 0]
    return op["primitive"] in _REDUCTIONS and ar[0] != ar[1]


# --------------------------------------------------------------------------- doctor --program

_DET_FLAG = "--xla_gpu_deterministic_ops=true"
_NOT_MEASURED = "not measured here: no GPU on the machines that test jpr"


def _risk(eqn) -> dict[str, str] | None:
    """Why an equation may be nondeterministic on some backend, and the fix."""
    name = eqn.primitive.name
    p = eqn.params
    if name.startswith("scatter"):
        if p.get("unique_indices"):
            return None
        if name == "scatter":
            why = ("indices may repeat: which of the colliding updates lands is left to the "
                   "backend (on GPU, to the order threads finish)")
        else:
            why = ("indices may repeat: on GPU the colliding updates are applied with atomics, "
                   "in an order that changes from run to run, and so does the rounding")
        return {
            "why": why,
            "fix": f"{_DET_FLAG} (XLA then uses a deterministic scatter); or, if the indices "
                   "are unique, .at[i].add(v, unique_indices=True); or a one-hot matmul / "
                   "a segment_sum over sorted indices",
            "cost": _NOT_MEASURED,
        }
    if name == "select_and_scatter_add":
        return {
            "why": "the gradient of max-pooling scatters into overlapping windows with atomics "
                   "on GPU; ties and collisions are applied in a varying order",
            "fix": f"no deterministic implementation: with {_DET_FLAG} compilation fails; "
                   "rewrite the pooling (strided convolution, average pooling, or a gradient "
                   "through an explicit argmax mask)",
            "cost": "compilation fails under the flag",
        }
    if name == "sort" and not p.get("is_stable", True):
        return {
            "why": "an unstable sort: equal keys may come out in another order on another "
                   "backend or version",
            "fix": "sort with stable=True (jnp.sort/argsort's default), or add a tie-breaking key",
            "cost": _NOT_MEASURED,
        }
    if name in ("top_k", "approx_top_k"):
        return {
            "why": "ties among the k largest values are broken by the backend's algorithm",
            "fix": "break ties explicitly (e.g. add a tiny index-dependent key) or use a stable "
                   "argsort",
            "cost": _NOT_MEASURED,
        }
    return None


def program_risks(fn, args: tuple) -> dict[str, Any]:
    """Lower ``fn(*args)`` and list the operations nondeterministic on some backend.

    Walks every equation of the jaxpr, through ``jit``, ``scan``,
    ``shard_map`` and custom-derivative sub-jaxprs. Each risk names the
    primitive, its shapes, the source line, the path of sub-jaxprs, why it is a
    risk, the flag or rewrite that fixes it, and what the flag costs.
    ``reductions`` counts the floating-point reductions (``reduce_sum``,
    ``dot_general``): deterministic on CPU and TPU; on GPU XLA may choose an
    atomics-based kernel for some of them, which the same flag excludes.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpr.explain import program_risks
        >>> def f(x, i):
        ...     return jnp.zeros(4).at[i].add(x)
        >>> r = program_risks(f, (jnp.ones(3), jnp.array([0, 1, 1])))
        >>> [(x["primitive"], x["source"].split(" ")[-1]) for x in r["risks"]]
        [('scatter-add', '(f)')]
    """
    import jax

    closed = jax.make_jaxpr(fn)(*args)
    risks: list[dict[str, Any]] = []
    counts = {"reductions": 0, "eqns": 0}

    def walk(jaxpr, path, caller):
        for eqn in jaxpr.eqns:
            counts["eqns"] += 1
            source = _source(eqn)
            if source == "unknown":
                source = caller
            r = _risk(eqn)
            if r is not None:
                risks.append(
                    {
                        "primitive": eqn.primitive.name,
                        "source": source,
                        "op_line": _op_line(eqn),
                        "path": list(path),
                        "shapes": [
                            _shape(str(v.aval.dtype), list(v.aval.shape))
                            for v in eqn.invars if hasattr(v.aval, "shape")
                        ],
                        **r,
                    }
                )
            if eqn.primitive.name in ("reduce_sum", "dot_general") and any(
                "float" in str(getattr(v.aval, "dtype", "")) for v in eqn.outvars
            ):
                counts["reductions"] += 1
            for key, sub in eqn.params.items():
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    label = eqn.primitive.name
                    if label in ("jit", "pjit"):
                        label = f"jit {eqn.params.get('name', '')}".strip()
                    elif key not in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
                        label = f"{label} {key}"
                    walk(inner, [*path, label], source)

    walk(closed.jaxpr, [], "unknown")
    return {"risks": risks, **counts}


def _jpr_step() -> tuple[Any, tuple, str]:
    import jax

    from jpr import data, rng, train
    from jpr.config import RunConfig

    cfg = RunConfig()
    graphdef, state = train.init_state(cfg)
    step_fn = train.make_train_step(cfg, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    x, y = data.get_batch(0, ds=data.make_dataset(cfg), batch_size=cfg.batch_size)
    args = (state.params, state.opt_state, rng.root_key(cfg.seed), x, y, 0)
    return step_fn, args, "jpr's training step (jpr.train.make_train_step, default config)"


def _load_program(spec: str) -> tuple[Any, tuple, str]:
    """``module:function``: a callable returning ``(fn, args)``, imported from the cwd too."""
    import importlib

    if spec == "jpr":
        return _jpr_step()
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise JprError(f"--program {spec!r}: expected MODULE:FUNCTION (or no value: jpr's step)")
    sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise JprError(f"--program {spec}: cannot import {module} ({e})") from None
    finally:
        sys.path.pop(0)
    factory = getattr(mod, name, None)
    if not callable(factory):
        raise JprError(f"--program {spec}: {module} has no function {name}")
    got = factory()
    if not (isinstance(got, tuple) and len(got) == 2 and callable(got[0])):
        raise JprError(f"--program {spec}: {name}() must return (fn, args)")
    return got[0], tuple(got[1]), f"{spec}"


def doctor_program(spec: str, *, as_json: bool = False) -> int:
    """``jpr doctor --program [MODULE:FUNCTION]``: print the program's risks; exit 0.

    ``spec`` is ``"jpr"`` (jpr's own training step) or ``MODULE:FUNCTION``,
    where ``FUNCTION()`` returns ``(fn, args)``; the module is imported from
    the working folder too.

    Example:
        >>> from jpr.errors import JprError
        >>> from jpr.explain import doctor_program
        >>> try:
        ...     doctor_program("no-colon")
        ... except JprError as e:
        ...     print(e)
        --program 'no-colon': expected MODULE:FUNCTION (or no value: jpr's step)
    """
    fn, args, label = _load_program(spec)
    try:
        r = program_risks(fn, args)
    except Exception as e:  # a user's function that does not trace
        raise JprError(f"--program {spec}: tracing failed: {type(e).__name__}: {e}") from None
    if as_json:
        print(json.dumps({"program": label, **r}, indent=2))
        return 0
    print(f"program: {label}")
    print(f"{r['eqns']} operations; {len(r['risks'])} nondeterministic on some backend:")
    for x in r["risks"]:
        print(f"  {x['primitive']}  {', '.join(x['shapes'])}")
        print(f"    at {x['source']}")
        if x["op_line"] not in ("unknown", x["source"]):
            what = "the gradient of the gather at" if x["op_line"].endswith("(gather)") and (
                x["primitive"].startswith("scatter")) else "the operation itself:"
            print(f"    ({what} {x['op_line']})")
        print("    in " + (" > ".join(x["path"]) or "the top level"))
        print(f"    why: {x['why']}")
        print(f"    fix: {x['fix']}")
        print(f"    cost of {_DET_FLAG}: {x['cost']}")
    print(
        f"{r['reductions']} floating-point reductions (reduce_sum, dot_general): a fixed order "
        "on CPU and TPU; on GPU XLA may pick an atomics-based kernel for some, which "
        f"{_DET_FLAG} excludes (cost: {_NOT_MEASURED})"
    )
    return 0


# --------------------------------------------------------------------------- report and command


def _shape(dtype: str, shape: list[int]) -> str:
    return f"{dtype}[{', '.join(map(str, shape))}]"


def format_report(r: dict[str, Any], *, ulps: bool = True) -> str:
    """The human-readable report of :func:`explain_records` (no hashes in it).

    ``ulps=False`` leaves out the ULP distance (a machine-bound number).

    Example:
        >>> from jpr.explain import format_report
        >>> print(format_report({"cause": "not_reproduced", "step": None, "compare_step": 3,
        ...                      "replay": {"matches_records": True, "mismatch": []}}))
        not reproduced: replayed under each record's setting, the runs do not diverge up to step 3
    """
    lines = []
    step = r.get("step")
    cause = r["cause"]
    if cause == "not_reproduced":
        rep = r.get("replay", {})
        if not rep.get("matches_records", True):
            name, s = rep["mismatch"][0]
            lines.append(
                f"not reproduced: the replay of record {name} does not match its record at "
                f"step {s} (a setting this replay does not recreate)"
            )
        else:
            lines.append(
                "not reproduced: replayed under each record's setting, the runs do not "
                f"diverge up to step {r['compare_step']}"
            )
        return "\n".join(lines)
    what = "the initialisation" if step == 0 else f"step {step}"
    lines.append(f"first divergent step: {step} ({what}), replayed under each record's setting")
    if cause == "inputs":
        shown = ", ".join(r["inputs_differ"][:4]) + (" ..." if len(r["inputs_differ"]) > 4 else "")
        lines.append(f"the inputs of {what} already differ: {shown}")
        lines.append(
            "the divergence came from outside the step's program: no operation is to blame"
        )
        return "\n".join(lines)
    if cause == "outside":
        who = [
            f"record {n} changes the params after step {step} (perturb_at {s['perturb_at']})"
            for n, s in zip("AB", r["settings"], strict=True) if s.get("perturb_at") == step
        ]
        lines.append(f"the program of {what} computes the same bits under both settings")
        lines.append(
            "the difference was made outside the program, after it ran"
            + (": " + "; ".join(who) if who else "")
        )
        lines.append(
            f"so step {step + 1} starts from inputs that already differ: "
            + ", ".join(r["leaves_differ"]) + "; no operation is to blame"
        )
        return "\n".join(lines)
    op = r["op"]
    name = op["primitive"] if op["same_op"] else f"{op['primitive']} (A) / {op['primitive_b']} (B)"
    ins = ", ".join(_shape(d, s) for d, s in zip(op.get("in_dtypes", op["dtypes"]),
                                                  op["in_shapes"], strict=False))
    outs = ", ".join(_shape(d, s) for d, s in zip(op["dtypes"], op["out_shapes"], strict=True))
    lines.append("first operation whose inputs are identical and whose output differs:")
    lines.append(f"  {name}  {ins} -> {outs}" + (f"  ({op['details']})" if op["details"] else ""))
    lines.append(f"  at {op['source']}")
    if op.get("op_line") not in (None, "unknown", op["source"]):
        lines.append(f"  (the operation itself: {op['op_line']})")
    lines.append("  in " + (" > ".join(op["path"]) or "the top level"))
    if op["iteration"]:
        lines.append(f"  first differs at iteration {op['iteration']}")
    if ulps and op["max_ulps"] is not None:
        lines.append(
            f"  max ULP distance {op['max_ulps']} ({op['elements_differ']} elements differ)"
        )
    if op.get("cross_device"):
        lines.append(
            "  a cross-device reduction: the compiled step of A has "
            f"{r['all_reduce'][0]} all-reduce ops and B has {r['all_reduce'][1]}; a sum split "
            "over devices adds in another order"
        )
    elif op["primitive"] in ("add", "sub", "add_any") and any(
        p in ("mul", "dot_general") for p in op.get("producers") or []
    ):
        lines.append(
            "  its input is a product: where the CPU has FMA, XLA may contract multiply and "
            "add into one rounding"
        )
    if op.get("confirmed"):
        lines.append(
            "  confirmed on the plain program (no probes): its inputs are identical, its output not"
        )
    else:
        lines.append("  not confirmed on the plain program: read it as a lead, not a verdict")
    if not all(r.get("faithful", [True, True])):
        lines.append("  note: with probes the step's outputs differ from the plain step's")
    return "\n".join(lines)


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``explain`` arguments to a parser.

    Example:
        >>> import argparse
        >>> from jpr.explain import add_explain_arguments
        >>> p = argparse.ArgumentParser()
        >>> add_explain_arguments(p)
        >>> p.parse_args(["a.json", "b.json", "--json"]).json
        True
    """
    p.add_argument("a", help="first run record (JSON)")
    p.add_argument("b", help="second run record (JSON)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _jsonable(x):
    import numpy as np

    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def run(args: argparse.Namespace) -> int:
    """Explain the two records named in ``args``; returns the exit code.

    0: explained (an operation, or a change made outside the program); 1: the
    replay does not reproduce the divergence; bad input raises
    :class:`jpr.errors.JprError` (exit 2 from the command line).

    Example:
        >>> import argparse
        >>> from jpr.explain import run
        >>> try:
        ...     run(argparse.Namespace(a="nope-a.json", b="nope-b.json", json=False))
        ... except Exception as e:
        ...     print(e)
        nope-a.json: no such file
    """
    r = explain_records(args.a, args.b)
    if args.json:
        out = {k: v for k, v in r.items()}
        if "op" in out:
            out["op"] = {k: v for k, v in out["op"].items() if k != "producers"}
        print(json.dumps(_jsonable(out), indent=2))
    else:
        print(format_report(r))
    return 1 if r["cause"] == "not_reproduced" else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m jpr.explain A B``; 0 explained, 1 not reproduced, 2 bad input.

    Example:
        >>> import contextlib, io
        >>> from jpr.explain import main
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = main(["missing-a.json", "missing-b.json"])
        >>> code, err.getvalue().strip()
        (2, 'jpr explain: error: missing-a.json: no such file')
    """
    from jpr._cli_common import Parser, guarded

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1], argv[2])
    p = Parser(prog="python -m jpr.explain", description=__doc__.split("\n")[0])
    add_explain_arguments(p)
    return guarded(lambda: run(p.parse_args(argv)), prog="jpr explain")


if __name__ == "__main__":
    sys.exit(main())
