"""``jpr doctor --program``: the operations of a program whose bits may vary, and why.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from jpr._probes import _op_line, _shape, _source
from jpr.errors import JprError

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
    ``dot_general``): a fixed order on CPU and TPU; on GPU, XLA's determinism
    notes list matrix products (not ``reduce_sum``) among the operations whose
    kernel may vary, which the same flag fixes.

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
        "on CPU and TPU; on GPU, XLA's determinism notes list matrix products among the "
        f"operations whose kernel may vary, which {_DET_FLAG} fixes (reduce_sum is not "
        f"listed; cost: {_NOT_MEASURED})"
    )
    return 0
