"""``jpr compare A B`` / ``python -m jpr.compare A B``: are two runs the same bits?

Exit code 0 when they match, 1 when they differ, 2 on bad input. On a mismatch
it says where the runs first diverge (the step, from the trajectories, and the
leaves that differ there), by how many ULPs the loss moved, which leaves of the
final state differ, and which config and environment fields differ.

This module never imports JAX: comparing two JSON files takes milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from typing import Any

from jpr._cli_common import Parser, guarded
from jpr.errors import JprError
from jpr.platform import SOURCE_WORDS  # no JAX: the module loads it only to probe
from jpr.record import SCHEMA, read_record

__all__ = [
    "build_parser",
    "compare_records",
    "cpu_target_difference",
    "format_result",
    "main",
    "ulp_distance",
]

#: The per-step digest of records without a ``step_digest`` field (``jpr run``'s):
#: ``jpr.hashing.SCHEME``, spelled out so that ``jpr compare`` need not load NumPy.
SHA256_STEPS = "jpr-pytree-sha256-v1"
MATCH_LINE = "✅ MATCH: hashes (and metrics if requested) are equal."


def ulp_distance(a: float, b: float) -> int:
    """Distance between two float32 values in units in the last place.

    Example:
        >>> from jpr.compare import ulp_distance
        >>> import struct
        >>> one_up = struct.unpack("<f", struct.pack("<I", 0x3F800001))[0]
        >>> ulp_distance(1.0, one_up), ulp_distance(-0.0, 0.0)
        (1, 0)
    """

    def ordered(x: float) -> int:
        (i,) = struct.unpack("<i", struct.pack("<f", x))
        return i if i >= 0 else -(i & 0x7FFFFFFF)

    return abs(ordered(a) - ordered(b))


def _loss(entry: dict[str, Any]) -> float | None:
    v = entry.get("loss")
    return None if v is None else float.fromhex(v)


def _first_divergence(ta: list, tb: list, prefix: str = "params/") -> dict[str, Any] | None:
    by_step_b = {e["step"]: e for e in tb}
    last_equal = None
    for ea in ta:
        eb = by_step_b.get(ea["step"])
        if eb is None:
            continue
        if ea.get("params_hash") == eb.get("params_hash") and ea.get("loss") == eb.get("loss"):
            last_equal = ea["step"]
            continue
        la, lb = ea.get("leaves", {}), eb.get("leaves", {})
        leaves = sorted(k for k in set(la) | set(lb) if la.get(k) != lb.get(k))
        a_loss, b_loss = _loss(ea), _loss(eb)
        return {
            "step": ea["step"],
            "last_equal_step": last_equal,
            "leaves": [prefix + k for k in leaves],
            "loss_a": a_loss,
            "loss_b": b_loss,
            "loss_ulps": _ulps(a_loss, b_loss),
        }
    return None


def _prefix(record: dict[str, Any]) -> str:
    # A `jpr run` trajectory hashes the params; a trace, whatever tree its loop passed.
    return "params/" if record.get("schema", SCHEMA) == SCHEMA else ""


def _ulps(a: float | None, b: float | None) -> int | None:
    if a is None or b is None:
        return None
    try:
        return ulp_distance(a, b)
    except OverflowError:  # not a float32 (a hand-made record): no ULP distance to give
        return None


def _dict_diff(a: dict, b: dict) -> list[str]:
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def _target_text(t: dict[str, Any]) -> str:
    who = SOURCE_WORDS.get(t.get("source"), t.get("source"))
    text = f"{t.get('arch')} {t.get('effective')} ({who}"
    return text + f", host {t.get('host_isa')}, probe {str(t.get('probe'))[:8]})"


def _moved_families(ta: dict[str, Any], tb: dict[str, Any]) -> list[str]:
    fa, fb = ta.get("probe_families") or {}, tb.get("probe_families") or {}
    return sorted(k for k in set(fa) & set(fb) if fa[k] != fb[k])


def cpu_target_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """How two records' CPU targets differ, when their probes say it matters, or ``None``.

    Records carry ``env.cpu_target`` (see :mod:`jpr.platform`): the settings
    of the pin, and the probe, a fingerprint of the bits each kernel family
    computed. Two records whose probes agree computed alike, whatever their
    settings: nothing is said. When the probes or any kernel family differ
    (one left to a runtime library too), the text names both targets and the
    families that moved.

    Example:
        >>> import re
        >>> from jpr.compare import cpu_target_difference
        >>> t = {"arch": "x86_64", "effective": "AVX2", "source": "jpr",
        ...      "host_isa": "AVX512", "probe": "1a2b3c4d5e6f7a8b",
        ...      "probe_families": {"fma": "01", "dot": "02"}}
        >>> ra = {"env": {"cpu_target": t}}
        >>> rb = {"env": {"cpu_target": {**t, "effective": "AVX", "source": "user",
        ...       "probe": "99aa88bb77cc66dd", "probe_families": {"fma": "03", "dot": "02"}}}}
        >>> for part in re.split(" vs |; ", cpu_target_difference(ra, rb)):
        ...     print(part)
        x86_64 AVX2 (pinned by jpr, host AVX512, probe 1a2b3c4d)
        x86_64 AVX (set by you, host AVX512, probe 99aa88bb)
        the probe differs in: fma
        >>> cpu_target_difference(ra, ra) is None
        True
    """
    ta, tb = a.get("env", {}).get("cpu_target"), b.get("env", {}).get("cpu_target")
    if not ta or not tb:
        return None
    moved = _moved_families(ta, tb)
    if ta.get("probe") and tb.get("probe"):
        if ta["probe"] == tb["probe"] and not moved:
            return None
    elif all(ta.get(k) == tb.get(k) for k in ("arch", "effective")):
        return None
    text = f"{_target_text(ta)} vs {_target_text(tb)}"
    return text + (f"; the probe differs in: {', '.join(moved)}" if moved else "")


def compare_records(
    a: dict[str, Any], b: dict[str, Any], *, check_metrics: bool = False
) -> dict[str, Any]:
    """Compare two run records (as read by :func:`jpr.record.read_record`).

    Returns:
        A JSON-ready dict: ``match`` plus the evidence (hashes, first
        divergence, differing leaves, config and environment differences).

    Example:
        >>> from jpr.compare import compare_records
        >>> r = {"hash": "ab", "state_hash": "cd", "final": {"loss": 0.5, "acc": 0.9},
        ...      "trajectory": [], "config": {}, "env": {}, "leaf_hashes": {}}
        >>> compare_records(r, r)["match"]
        True
    """
    hash_eq = a["hash"] == b["hash"]
    state_eq = a.get("state_hash") == b.get("state_hash")
    fa, fb = a.get("final", {}), b.get("final", {})
    metrics_eq = fa.get("loss") == fb.get("loss") and fa.get("acc") == fb.get("acc")
    la, lb = a.get("leaf_hashes", {}), b.get("leaf_hashes", {})
    # Per-step entries are comparable only when both records digested them alike.
    kinds = [r.get("step_digest", SHA256_STEPS) for r in (a, b)]
    divergence = None
    if kinds[0] == kinds[1]:
        divergence = _first_divergence(a["trajectory"], b["trajectory"], _prefix(a))
    result = {
        "match": hash_eq and state_eq and (metrics_eq or not check_metrics),
        "hash": [a["hash"], b["hash"]],
        "hash_equal": hash_eq,
        "state_hash_equal": state_eq,
        "metrics_checked": check_metrics,
        "metrics_equal": metrics_eq,
        "final_loss": [fa.get("loss"), fb.get("loss")],
        "final_acc": [fa.get("acc"), fb.get("acc")],
        "first_divergence": divergence,
        "step_digests": kinds,
        "leaves_differ": sorted(k for k in set(la) | set(lb) if la.get(k) != lb.get(k)),
        "leaves_total": len(set(la) | set(lb)),
        "config_diff": _dict_diff(a.get("config", {}), b.get("config", {})),
        "cpu_target_diff": cpu_target_difference(a, b),
        "env_diff": _dict_diff(
            {k: v for k, v in a.get("env", {}).items() if k != "cpu_target"},
            {k: v for k, v in b.get("env", {}).items() if k != "cpu_target"},
        ),
        "steps": [a.get("steps"), b.get("steps")],
    }
    return result


def format_result(r: dict[str, Any]) -> str:
    """The human-readable report of :func:`compare_records`.

    Example:
        >>> from jpr.compare import compare_records, format_result
        >>> r = {"hash": "ab", "state_hash": "cd", "final": {"loss": 0.5, "acc": 0.9},
        ...      "trajectory": [], "config": {}, "env": {}, "leaf_hashes": {}}
        >>> print(format_result(compare_records(r, r)))
        ✅ MATCH: hashes (and metrics if requested) are equal.
    """
    first = []
    if r.get("cpu_target_diff") and not r["match"]:
        first = [
            "different CPU code generation: " + r["cpu_target_diff"]
            + "; float results can differ for that reason alone"
        ]
    if r["match"]:
        lines = [MATCH_LINE]
        if r.get("cpu_target_diff"):
            lines.append("note: the runs agree although their CPUs compute some kernels "
                         "differently: " + r["cpu_target_diff"])
        if r["env_diff"]:
            lines.append("note: environment differs: " + "; ".join(r["env_diff"]))
        return "\n".join(lines)
    what = []
    if not r["hash_equal"]:
        what.append(f"hash {r['hash'][0][:16]} != {r['hash'][1][:16]}")
    if not r["state_hash_equal"]:
        what.append("state_hash differs")
    if r["metrics_checked"] and not r["metrics_equal"]:
        what.append(f"metrics differ (loss {r['final_loss'][0]} vs {r['final_loss'][1]})")
    lines = [*first, "❌ MISMATCH: " + "; ".join(what)]
    if r["steps"][0] != r["steps"][1]:
        lines.append(f"steps differ: {r['steps'][0]} vs {r['steps'][1]}")
    d = r["first_divergence"]
    if d is not None:
        where = f"step {d['step']}"
        if d["last_equal_step"] is not None and d["last_equal_step"] < d["step"] - 1:
            where = f"between step {d['last_equal_step']} and step {d['step']}"
        text = f"first divergence: {where}"
        if d["leaves"]:
            text += " in " + ", ".join(d["leaves"])
        if d["loss_ulps"] is not None:
            text += f"; train loss {d['loss_ulps']} ULP apart"
        lines.append(text)
    elif len(set(r.get("step_digests", ()))) > 1:
        a, b = r["step_digests"]
        lines.append(f"first divergence: not compared (steps digested as {a} vs {b})")
    elif not r["hash_equal"]:
        lines.append("first divergence: not in the recorded trajectories")
    if r["leaves_differ"]:
        lines.append(
            f"final state: {len(r['leaves_differ'])} of {r['leaves_total']} leaves differ: "
            + ", ".join(r["leaves_differ"][:6])
            + (" ..." if len(r["leaves_differ"]) > 6 else "")
        )
    if r["config_diff"]:
        lines.append("config differs: " + "; ".join(r["config_diff"]))
    if r["env_diff"]:
        lines.append("environment differs: " + "; ".join(r["env_diff"]))
    return "\n".join(lines)


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``compare`` arguments to a parser."""
    p.add_argument("a", help="first run record (JSON)")
    p.add_argument("b", help="second run record (JSON)")
    p.add_argument(
        "--check-metrics", action="store_true", help="also require equal final loss and accuracy"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Compare the two records named in ``args``; returns the exit code."""
    try:
        same = os.path.samefile(args.a, args.b)
    except OSError:
        same = False
    if same:
        raise JprError(f"{args.a} and {args.b} are the same file; compare two different runs")
    ra, rb = read_record(args.a), read_record(args.b)
    result = compare_records(ra, rb, check_metrics=args.check_metrics)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_result(result))
    return 0 if result["match"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m jpr.compare``.

    Example:
        >>> from jpr.compare import build_parser
        >>> build_parser().parse_args(["a.json", "b.json", "--check-metrics"]).check_metrics
        True
    """
    p = Parser(prog="python -m jpr.compare", description=__doc__.split("\n")[0])
    add_compare_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m jpr.compare``; 0 match, 1 mismatch, 2 bad input.

    Example:
        >>> import contextlib, io
        >>> from jpr.compare import main
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = main(["missing-a.json", "missing-b.json"])
        >>> code, err.getvalue().strip()
        (2, 'jpr compare: error: missing-a.json: no such file')
    """
    return guarded(lambda: run(build_parser().parse_args(argv)), prog="jpr compare")


if __name__ == "__main__":
    sys.exit(main())
