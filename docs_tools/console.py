"""The ```console block convention, and how its commands are run.

A console block is a terminal transcript::

    $ jpr run --steps 20 --seed 0 --out runs/a.json
    ...everything the command prints, stdout and stderr together...
    $ jpr compare runs/a.json runs/missing.json
    error: runs/missing.json: no such file
    [exit 2]

- A line starting with ``$ `` is a command; a command line ending in ``\\``
  continues on the next line. Every line up to the next command is the
  expected output (stdout and stderr merged, as a terminal shows them).
- Executable commands are ``jpr …``, ``python -m jpr…`` and
  ``python snippets/….py``, optionally after ``NAME=value`` environment
  assignments. A block runs when all its commands are executable; a block with
  none (``$ pip install …``) is shown only; a mix is an error.
- Exit status: a command must exit 0, unless the last line of its output is
  ``[exit N]``, which says it must exit with status N.
- ``jpr run|compare|verify`` and ``python -m jpr.run_repro|jpr.compare`` are
  run in the test process through the same ``main(argv)`` entry point, for
  speed; ``JPR_DOCS_SUBPROCESS=1`` runs every command as a real process.
- Each page runs its commands in a fresh temporary folder (so ``runs/`` and
  ``checkpoints/`` never land in the repository), holding a link named
  ``snippets`` to the repository's ``snippets/`` folder. ``python`` is the
  interpreter running the tests; ``jpr`` is the console script beside it.
- Comparison is exact, after two normalisations only: paths (the temporary
  folder is removed from absolute paths, so ``<page folder>/runs/a.json`` reads
  ``runs/a.json``) and timings: ``<TIME>`` in an expected line matches a
  duration such as ``1.25s``, ``830ms``, ``12 µs`` or ``3.0 min``.
  Trailing whitespace and trailing blank lines are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from docs_tools import shared_runs

__all__ = [
    "TIME_PLACEHOLDER",
    "Command",
    "Result",
    "line_matches",
    "new_expected",
    "parse_commands",
    "render_commands",
    "run_command",
]

TIME_PLACEHOLDER = "<TIME>"
_TIME_RE = r"\d+(?:\.\d+)?(?:e[+-]?\d+)? ?(?:ns|µs|us|ms|s|sec|min|h)"
_EXIT_RE = re.compile(r"^\[exit (\d+)\]$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_TIMEOUT_S = 600


@dataclasses.dataclass
class Command:
    """One ``$`` command of a console block and what it should print."""

    lines: list[str]  # the command as written, continuation lines included
    expected: list[str]  # expected output lines ([exit N] removed)
    exit_code: int  # the expected exit status
    output_line_range: tuple[int, int]  # [a, b) lines of the block source

    @property
    def text(self) -> str:
        """The command with continuation lines joined (without ``$ ``)."""
        joined = " ".join(ln.rstrip().removesuffix("\\").strip() for ln in self.lines)
        return joined.removeprefix("$").strip()

    @property
    def executable(self) -> bool:
        try:
            argv = shlex.split(self.text)
        except ValueError:
            return False
        while argv and _ENV_RE.match(argv[0]):
            argv = argv[1:]
        if not argv:
            return False
        if argv[0] == "jpr":
            return True
        if argv[0] == "python" and len(argv) >= 2:
            if argv[1] == "-m" and len(argv) >= 3:
                return argv[2] == "jpr" or argv[2].startswith("jpr.")
            return argv[1].startswith("snippets/") and argv[1].endswith(".py")
        return False


@dataclasses.dataclass
class Result:
    """What a command did: exit status and normalised output lines."""

    exit_code: int
    output: list[str]


def parse_commands(source: str) -> list[Command]:
    """Split a console block's text into commands and expected outputs."""
    lines = source.splitlines()
    commands: list[Command] = []
    i = 0
    if lines and not lines[0].startswith("$ "):
        if any(ln.startswith("$ ") for ln in lines):
            raise ValueError("a console block must start with a '$ ' command line")
        return []
    while i < len(lines):
        cmd_lines = [lines[i]]
        while cmd_lines[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd_lines.append(lines[i])
        i += 1
        first_out = i
        while i < len(lines) and not lines[i].startswith("$ "):
            i += 1
        out = [ln.rstrip() for ln in lines[first_out:i]]
        while out and not out[-1]:
            out.pop()
        exit_code = 0
        if out and (m := _EXIT_RE.match(out[-1])):
            exit_code = int(m.group(1))
            out.pop()
            while out and not out[-1]:
                out.pop()
        commands.append(Command(cmd_lines, out, exit_code, (first_out, i)))
    return commands


def render_commands(commands: list[Command]) -> str:
    """The block text of ``commands`` (the inverse of :func:`parse_commands`)."""
    out: list[str] = []
    for c in commands:
        out.extend(c.lines)
        out.extend(c.expected)
        if c.exit_code:
            out.append(f"[exit {c.exit_code}]")
    return "\n".join(out) + "\n"


def _line_regex(expected: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in expected.split(TIME_PLACEHOLDER)]
    return re.compile(_TIME_RE.join(parts) + r"\Z")


def line_matches(expected: str, actual: str) -> bool:
    """Whether an output line matches an expected line (``<TIME>`` aware)."""
    if TIME_PLACEHOLDER not in expected:
        return expected == actual
    return _line_regex(expected).match(actual) is not None


def new_expected(expected: list[str], actual: list[str]) -> list[str]:
    """Expected lines rewritten from ``actual``, keeping lines that still match.

    Used by ``--update-docs``: lines that still match (``<TIME>`` lines included)
    stay as written, so the diff shows only what really changed.
    """
    out = []
    for i, line in enumerate(actual):
        if i < len(expected) and line_matches(expected[i], line):
            out.append(expected[i])
        else:
            out.append(line)
    return out


def _argv(text: str) -> tuple[list[str], dict[str, str]]:
    argv = shlex.split(text)
    env = {}
    while argv and _ENV_RE.match(argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "jpr":
        script = shutil.which("jpr", path=str(Path(sys.executable).parent))
        argv[:1] = [script] if script else [sys.executable, "-m", "jpr"]
    return argv, env


def normalise(output: str, cwd: Path) -> list[str]:
    """Output lines with the temporary folder removed from paths."""
    text = output.replace("\r\n", "\n")
    for root in {str(cwd), os.path.realpath(cwd)}:
        text = text.replace(root + os.sep, "").replace(root, ".")
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


# Commands whose entry point is called in the test process instead of a new
# one: the same `main(argv)` that the console script calls, with stdout and
# stderr captured together. A fresh Python process costs about 1.5 s of JAX
# import and start-up, and the site has dozens of these commands. Commands with
# environment assignments, `jpr launch` (which starts processes anyway) and
# snippets still run as real processes, as do all commands when
# JPR_DOCS_SUBPROCESS=1 is set.
_IN_PROCESS = {
    ("jpr", "run"): ("jpr.cli", True),
    ("jpr", "compare"): ("jpr.cli", True),
    ("jpr", "verify"): ("jpr.cli", True),
    ("-m", "jpr.run_repro"): ("jpr.run_repro", False),
    ("-m", "jpr.compare"): ("jpr.compare", False),
}


def _in_process_target(text: str) -> tuple[str, list[str]] | None:
    if os.environ.get("JPR_DOCS_SUBPROCESS") == "1":
        return None
    argv = shlex.split(text)
    if not argv or _ENV_RE.match(argv[0]):
        return None
    if argv[0] == "jpr" and len(argv) > 1 and ("jpr", argv[1]) in _IN_PROCESS:
        return "jpr.cli", argv[1:]
    if argv[0] == "python" and len(argv) > 2 and ("-m", argv[2]) in _IN_PROCESS:
        return argv[2], argv[3:]
    return None


def _run_in_process(module: str, args: list[str], cwd: Path) -> Result:
    import contextlib
    import importlib
    import io

    main = importlib.import_module(module).main
    buffer = io.StringIO()
    old_cwd, old_columns = os.getcwd(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps help text the same everywhere
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                code = main(args)
            except SystemExit as e:  # argparse's --help and --version
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(old_cwd)
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    return Result(int(code or 0), normalise(buffer.getvalue(), cwd))


def run_command(command: Command, cwd: Path) -> Result:
    """Run one command in ``cwd`` and return its exit status and output."""
    target = _in_process_target(command.text)
    if target is not None:
        return _run_in_process(*target, cwd)
    argv, extra_env = _argv(command.text)
    env = shared_runs.terminal_env(extra_env)
    if len(argv) >= 2 and argv[0] == sys.executable and argv[1] in shared_runs.PRINT_ONLY:
        # a script that only prints: its own test runs the same command (shared)
        proc = shared_runs.run_once(argv, cwd=cwd, env=env, timeout=_TIMEOUT_S)
        return Result(proc.returncode, normalise(proc.stdout, cwd))
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("utf-8", "replace")
        return Result(-1, [*normalise(out, cwd), f"<timed out after {_TIMEOUT_S} s>"])
    except OSError as e:
        return Result(-1, [f"<could not start {argv[0]}: {e}>"])
    return Result(proc.returncode, normalise(proc.stdout.decode("utf-8", "replace"), cwd))


def compare(command: Command, result: Result, *, checker: Any = None) -> str | None:
    """A readable report of how ``result`` differs from ``command``, or None.

    ``checker`` (a :class:`docs_tools.float_bound.PageChecker`) decides whether a
    line that differs only in float-bound values keeps the page's claims.
    """

    def same(e: str, a: str) -> bool:
        if line_matches(e, a):
            if checker is not None:
                checker.bind_equal(e)
            return True
        return checker is not None and checker.consistent(e, a)

    same_lines = len(command.expected) == len(result.output) and all(
        [same(e, a) for e, a in zip(command.expected, result.output, strict=True)]
    )
    if same_lines and command.exit_code == result.exit_code:
        return None
    report = [f"$ {command.text}"]
    if command.exit_code != result.exit_code:
        report.append(f"exit status: expected {command.exit_code}, got {result.exit_code}")
    if not same_lines:
        import difflib

        report.append("output differs (- expected, + got):")
        report.extend(
            "  " + d
            for d in difflib.unified_diff(
                command.expected, result.output, "expected", "got", lineterm="", n=2
            )
        )
    return "\n".join(report)
