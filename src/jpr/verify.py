"""``jpr verify DIR [--step N]``: check checkpoints against their stored hashes.

Nothing is trained and no config or model is needed: for each complete
checkpoint (or only step ``N``), the metadata is checked against its own
digest, every array is read with the same Orbax reader that a resume uses, and
every leaf is re-hashed and compared with the hash stored when it was saved.
Leftovers of interrupted saves, and of removals (``--keep``) cut short, are
listed (they never count as checkpoints); so is a run still writing into the
folder. No lock is taken: verify runs beside a writer. Nothing in the folder
is written or removed.

Exit status: 0 when every checkpoint checked is intact, 1 when one is corrupt,
2 on bad input (no such folder, no such step, no complete checkpoint at all).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jpr._cli_common import Parser, guarded
from jpr.errors import JprError

__all__ = ["add_verify_arguments", "format_problem", "main", "run"]


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``verify`` arguments to a parser.

    Example:
        >>> import argparse
        >>> from jpr.verify import add_verify_arguments
        >>> p = argparse.ArgumentParser()
        >>> add_verify_arguments(p)
        >>> p.parse_args(["ckpt", "--step", "40"]).step
        40
    """
    p.add_argument("directory", type=Path, metavar="DIR", help="checkpoint folder")
    p.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="check only step N (default: every complete checkpoint)",
    )


def format_problem(message: str, step: int) -> str:
    """The part of a corruption message after ``checkpoint step N is corrupt:``.

    Example:
        >>> from jpr.verify import format_problem
        >>> format_problem("checkpoint step 8 is corrupt: rng does not match the stored hash", 8)
        'rng does not match the stored hash'
        >>> format_problem("checkpoint step 8 holds step 9", 8)
        'holds step 9'
    """
    for prefix in (f"checkpoint step {step} is corrupt: ", f"checkpoint step {step} "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def run(args: argparse.Namespace, *, out=print) -> int:
    """Verify the checkpoints named in ``args``; returns the exit status.

    Example:
        >>> import argparse, tempfile
        >>> from jpr.checkpoint import Checkpointer
        >>> from jpr.config import RunConfig
        >>> from jpr.rng import root_key
        >>> from jpr.train import init_state
        >>> from jpr.verify import run
        >>> folder = tempfile.mkdtemp() + "/ckpt"
        >>> ckpt = Checkpointer(folder)
        >>> _ = ckpt.save(init_state(RunConfig())[1], root=root_key(0), cfg=RunConfig())
        >>> ckpt.close()
        >>> lines = []
        >>> run(argparse.Namespace(directory=folder, step=None), out=lines.append)
        0
        >>> lines[0].startswith("step 0: ok")
        True
    """
    from jpr.checkpoint import Checkpointer, CorruptCheckpoint
    from jpr.lock import describe, holder

    ckpt = Checkpointer(args.directory, read_only=True)
    try:
        writer = holder(args.directory)
        if writer is not None:
            out(f"{args.directory} is being written by {describe(writer)}: "
                "its newest steps may still change")
        steps = ckpt.steps()
        incomplete = ckpt.incomplete()
        if args.step is not None:
            if args.step not in steps:
                have = ", ".join(map(str, steps)) if steps else "none"
                note = "; its save was interrupted" if args.step in incomplete else ""
                raise JprError(
                    f"no checkpoint at step {args.step} in {args.directory} "
                    f"(available: {have}){note}"
                )
            todo = [args.step]
        else:
            todo = steps
            for s in incomplete:
                out(f"step {s}: incomplete save (interrupted, or still being written): "
                    "not a checkpoint")
            for s in ckpt.removing():
                out(f"step {s}: being removed (--keep), or its removal was cut short: "
                    "not a checkpoint")
        if not todo:
            raise JprError(f"no complete checkpoint in {args.directory}")
        bad = 0
        for step in todo:
            try:
                r = ckpt.verify(step)
            except CorruptCheckpoint as e:
                bad += 1
                out(f"step {step}: CORRUPT: {format_problem(str(e), step)}")
            else:
                out(f"step {step}: ok ({r['leaves']} leaves, state_hash {r['state_hash'][:16]})")
        if len(todo) > 1 or bad:
            out(f"{len(todo) - bad} of {len(todo)} checkpoints intact")
        return 1 if bad else 0
    finally:
        ckpt.close()


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m jpr.verify``.

    Example:
        >>> from jpr.verify import build_parser
        >>> str(build_parser().parse_args(["ckpt"]).directory)
        'ckpt'
    """
    p = Parser(prog="python -m jpr.verify", description=__doc__.split("\n")[0])
    add_verify_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m jpr.verify``; returns the exit status.

    Example:
        >>> import contextlib, io, tempfile
        >>> from jpr.verify import main
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = main([tempfile.mkdtemp() + "/missing"])
        >>> code, "does not exist" in err.getvalue()
        (2, True)
    """
    return guarded(lambda: run(build_parser().parse_args(argv)), prog="jpr verify")


if __name__ == "__main__":
    sys.exit(main())
