"""The ``jpr`` command: ``run``, ``compare``, ``doctor`` and friends.

Bad input anywhere is reported as one line on stderr with exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from jpr.errors import JprError

__all__ = ["Parser", "build_parser", "guarded", "main"]


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`JprError` (one line, exit 2) on bad usage.

    Example:
        >>> from jpr.cli import Parser
        >>> from jpr.errors import JprError
        >>> p = Parser(prog="demo")
        >>> _ = p.add_argument("--steps", type=int)
        >>> try:
        ...     p.parse_args(["--steps", "abc"])
        ... except JprError as e:
        ...     print(e)
        argument --steps: invalid int value: 'abc'
    """

    def error(self, message: str):  # type: ignore[override]
        raise JprError(message)


def guarded(fn: Callable[[], int], *, prog: str = "jpr") -> int:
    """Run ``fn``; turn :class:`JprError` into ``prog: error: …`` and exit code 2.

    A run stopped by SIGTERM/SIGINT (:class:`jpr.signals.Stopped`) prints its
    message and exits with 128 + the signal number. Orbax's own log lines
    (absl warnings, asyncio's "Task exception was never retrieved" after a
    failed read) are silenced: every failure is reported here, once.

    Example:
        >>> from jpr.cli import guarded
        >>> from jpr.errors import JprError
        >>> def bad():
        ...     raise JprError("no such step")
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = guarded(bad, prog="jpr run")
        >>> code, err.getvalue().strip()
        (2, 'jpr run: error: no such step')
    """
    from jpr.signals import Stopped

    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return fn()
    except Stopped as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code
    except JprError as e:
        from jpr.distributed import exit_now_if_distributed, reported_elsewhere

        if not reported_elsewhere(e):  # a check every process failed: process 0 says it
            print(f"{prog}: error: {e}", file=sys.stderr)
        # Multi-process: a lone failure never waits for its peers at shutdown;
        # a failure every process shares shuts down together, in order.
        exit_now_if_distributed(2, together=getattr(e, "collective", False))
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _doctor(args: argparse.Namespace) -> int:
    if args.program is not None:
        from jpr.explain import doctor_program

        return doctor_program(args.program, as_json=args.json)
    from jpr.envinfo import determinism_risks, environment

    env = environment()
    risks = determinism_risks(env)
    if args.json:
        print(json.dumps({"env": env, "risks": risks}, indent=2))
        return 0
    width = max(map(len, env))
    for k, v in env.items():
        print(f"{k:<{width}}  {v}")
    print()
    if risks:
        print("determinism risks:")
        for r in risks:
            print(f"  - {r}")
    else:
        print("determinism risks: none found")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``jpr`` command.

    Example:
        >>> from jpr.cli import build_parser
        >>> build_parser().parse_args(["compare", "a.json", "b.json"]).command
        'compare'
    """
    from jpr import __version__
    from jpr.compare import add_compare_arguments
    from jpr.run_repro import add_run_arguments

    p = Parser(prog="jpr", description="JAX PRNG Reproducibility Playbook")
    p.add_argument("--version", action="version", version=f"jpr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    add_run_arguments(sub.add_parser("run", help="train, checkpoint, resume, write a record"))
    add_compare_arguments(sub.add_parser("compare", help="compare two run records"))
    from jpr.verify import add_verify_arguments

    add_verify_arguments(
        sub.add_parser("verify", help="check checkpoints against their stored hashes")
    )
    d = sub.add_parser("doctor", help="environment fingerprint and determinism risks")
    d.add_argument("--json", action="store_true", help="print as JSON")
    d.add_argument(
        "--program",
        nargs="?",
        const="jpr",
        metavar="MODULE:FUNCTION",
        help="list the operations of a program that are nondeterministic on some backend "
        "(default: jpr's training step; FUNCTION returns (fn, args))",
    )
    from jpr.explain import add_explain_arguments

    add_explain_arguments(
        sub.add_parser("explain", help="name the operation where two runs first diverge")
    )
    from jpr.launch import add_launch_arguments

    add_launch_arguments(
        sub.add_parser("launch", help="run N local processes as one jax.distributed job")
    )
    return p


def _dispatch(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from jpr.run_repro import run

        run(args)
        return 0
    if args.command == "compare":
        from jpr.compare import run

        return run(args)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "verify":
        from jpr.verify import run

        return run(args)
    if args.command == "explain":
        from jpr.explain import run

        return run(args)
    if args.command == "launch":
        from jpr.launch import run

        return run(args)
    raise JprError(f"unknown command {args.command}")  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jpr`` console script; returns the exit status.

    Example:
        >>> import contextlib, io
        >>> from jpr.cli import main
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = main(["run", "--steps", "0"])
        >>> code, err.getvalue().strip()
        (2, 'jpr run: error: --steps must be at least 1, got 0')
    """
    prog = "jpr"
    if argv is None:
        argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):
        prog = f"jpr {argv[0]}"
    return guarded(lambda: _dispatch(argv), prog=prog)
