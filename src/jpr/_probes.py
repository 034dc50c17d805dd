"""The probe engine of ``jpr explain``: fingerprints, probed programs and their diff.

See :mod:`jpr.explain` for the method; this module holds its first two parts:
the 64-bit integer fingerprints a compiled program computes of its own
intermediates, the interpreter that adds them to each compiled unit, and the
diff of two probed streams (:func:`first_divergent_op`, :func:`max_ulps`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

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
        if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                    "closed_call"):  # closed_call: what jpr.portable writes a sum or a conv as
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
        return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(p)), None, False

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


def _shape(dtype: str, shape: list[int]) -> str:
    return f"{dtype}[{', '.join(map(str, shape))}]"
