"""``jpr doctor``: the environment fingerprint and its determinism risks."""

from __future__ import annotations

import argparse
import json

from jpr.distributed import undetected_clusters
from jpr.envinfo import determinism_risks, environment

__all__ = ["add_doctor_arguments", "run"]


def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``doctor`` flags to a parser.

    Example:
        >>> import argparse
        >>> from jpr.doctor import add_doctor_arguments
        >>> p = argparse.ArgumentParser()
        >>> add_doctor_arguments(p)
        >>> p.parse_args(["--json"]).json
        True
    """
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument(
        "--program",
        nargs="?",
        const="jpr",
        metavar="MODULE:FUNCTION",
        help="list the operations of a program that are nondeterministic on some backend "
        "(default: jpr's training step; FUNCTION returns (fn, args))",
    )


def _readable(env: dict) -> dict:
    """``env`` with its CPU target in words: what the host is, and whether it is
    the reference platform."""
    from jpr.platform import CpuTarget

    target = env.get("cpu_target")
    if not target:
        return env
    t = CpuTarget.from_dict(target)
    pin = ", ".join(f"{n}={v}" + (" (yours)" if n in t.user else "")
                    for n, v in t.settings.items() if v is not None)
    return {
        **{k: v for k, v in env.items() if k != "cpu_target"},
        "cpu_target": f"{t.describe()}: {t.verdict()}",
        "cpu_pin": pin or "none",
        "cpu_probe": target.get("probe"),
    }


def run(args: argparse.Namespace) -> int:
    """``jpr doctor``: print the environment fingerprint and its determinism risks.

    Inside a cluster's environment that JAX 0.10.2 will not detect (an Open MPI 5
    job, a Kubernetes pod without the ``kubernetes`` package, variables set only
    in part) it also says which and why
    (:func:`jpr.distributed.undetected_clusters`), as ``cluster`` in the JSON.

    Example:
        >>> import argparse, contextlib, io, json
        >>> from jpr.doctor import run
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = run(argparse.Namespace(json=True, program=None))
        >>> code, sorted(json.loads(out.getvalue()))
        (0, ['env', 'risks'])
    """
    if getattr(args, "program", None) is not None:
        from jpr.explain import doctor_program

        return doctor_program(args.program, as_json=args.json)
    env = environment()
    risks = determinism_risks(env)
    clusters = undetected_clusters()
    if args.json:
        extra = {"cluster": clusters} if clusters else {}
        print(json.dumps({"env": env, "risks": risks, **extra}, indent=2))
        return 0
    width = max(map(len, env))
    for k, v in _readable(env).items():
        print(f"{k:<{width}}  {v}")
    print()
    if risks:
        print("determinism risks:")
        for r in risks:
            print(f"  - {r}")
    else:
        print("determinism risks: none found")
    if clusters:  # only inside a cluster's environment that JAX will not join
        print()
        print("cluster environment that JAX will not detect:")
        for note in clusters:
            print(f"  - {note}")
    return 0
