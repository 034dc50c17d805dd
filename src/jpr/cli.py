"""The ``jpr`` command: ``run``, ``compare``, ``doctor`` and friends.

Bad input anywhere is reported as one line on stderr with exit code 2, never a
traceback.

Each subcommand lives in its own module, listed in :data:`COMMANDS` with its
one-line summary; the module has an ``add_<name>_arguments(parser)`` function
and ``run(args)``, which returns the exit status (or, for ``run``, the record).
Building the parser imports every subcommand's module; none imports JAX at its
top, so ``jpr compare`` never loads JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from jpr._cli_common import Parser, guarded

__all__ = ["COMMANDS", "Command", "Parser", "build_parser", "guarded", "main"]


class Command(NamedTuple):
    """A ``jpr`` subcommand: its module, its ``add_*_arguments`` function, its summary.

    Example:
        >>> from jpr.cli import COMMANDS
        >>> COMMANDS["compare"].module
        'jpr.compare'
    """

    module: str
    add_arguments: str
    summary: str


#: name -> subcommand, in the order ``jpr --help`` lists them.
COMMANDS: dict[str, Command] = {
    "run": Command(
        "jpr.run_repro", "add_run_arguments", "train, checkpoint, resume, write a record"
    ),
    "compare": Command("jpr.compare", "add_compare_arguments", "compare two run records"),
    "verify": Command(
        "jpr.verify", "add_verify_arguments", "check checkpoints against their stored hashes"
    ),
    "doctor": Command(
        "jpr.doctor", "add_doctor_arguments", "environment fingerprint and determinism risks"
    ),
    "launch": Command(
        "jpr.launch", "add_launch_arguments", "run N local processes as one jax.distributed job"
    ),
    "explain": Command(
        "jpr.explain", "add_explain_arguments", "name the operation where two runs first diverge"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``jpr`` command.

    Example:
        >>> from jpr.cli import build_parser
        >>> build_parser().parse_args(["compare", "a.json", "b.json"]).command
        'compare'
    """
    from jpr import __version__

    p = Parser(prog="jpr", description="JAX PRNG Reproducibility Playbook")
    p.add_argument("--version", action="version", version=f"jpr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, cmd in COMMANDS.items():
        add = getattr(importlib.import_module(cmd.module), cmd.add_arguments)
        add(sub.add_parser(name, help=cmd.summary))
    return p


def _dispatch(argv: list[str] | None) -> int:
    from jpr.platform import pin_cpu_target

    args = build_parser().parse_args(argv)
    pin_cpu_target()  # before any command starts JAX: the CPU target is part of the config
    code = importlib.import_module(COMMANDS[args.command].module).run(args)
    # `jpr run` returns its record: reaching here means it succeeded.
    return code if isinstance(code, int) else 0


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
