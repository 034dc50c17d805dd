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

This module is the public face: the report and the command, and the functions
re-exported from the private modules that do the work, each read in one
sitting: ``jpr._probes`` (fingerprints, the probed programs, their diff),
``jpr._replay`` (the two worker processes that replay the records) and
``jpr._program_risks`` (``jpr doctor --program``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jpr._probes import _shape, first_divergent_op, max_ulps
from jpr._program_risks import doctor_program, program_risks
from jpr._replay import _worker, explain_records

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

# --------------------------------------------------------------------------- report and command


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
