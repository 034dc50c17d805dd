"""Processes that several tests and pages start alike, run once per test run.

The same script with the same arguments and environment prints the same thing
wherever it runs, so a docs page's ``$ python snippets/…`` block and the
snippet's own test need not both pay for it: the first to ask runs it, the
others (in any pytest-xdist worker) wait for it and read what it printed.

- The store is one folder per test run (the root ``conftest.py`` makes it,
  passes it to the workers in ``JPR_SHARED_RUNS`` and removes it at the end),
  so nothing outlives the run and no result can be stale: versions, the CPU
  target and the sources do not change while the suite runs.
- A result's key is the command (``sys.executable`` written as ``python``),
  the environment except pytest's per-worker variables, and the contents of
  every file the command names (read from its working folder).
- Only processes that read and write no other files may be shared (the
  snippets in :data:`PRINT_ONLY`, whose output is the same in any folder); a
  process that writes files for later blocks must run where they are needed.
- :func:`terminal_env` is the environment a console block gives its
  commands; a test that passes it shares the page's run.
- Without ``JPR_SHARED_RUNS`` (a test run by hand outside pytest), every call
  runs its process.

Example:

    >>> import sys
    >>> proc = run_once([sys.executable, "-c", "print(6 * 7)"], cwd=".")
    >>> proc.returncode, proc.stdout
    (0, '42\\n')
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["ENV", "PRINT_ONLY", "run_once", "terminal_env"]

#: The environment variable naming the test run's shared folder.
ENV = "JPR_SHARED_RUNS"

#: Snippets that only print: the same command gives the same output in any folder.
PRINT_ONLY = frozenset(
    {
        "snippets/pitfalls/loader_workers.py",
        "snippets/pitfalls/shard_map_keys.py",
    }
)

_VOLATILE = ("PYTEST_", "COV_CORE_")


def terminal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment as a console block runs a command in it.

    Args:
        extra: variables the command line sets (``NAME=value cmd``).

    Returns:
        A new dict: the environment, unbuffered output, 80 columns, no colour.

    Example:

        >>> terminal_env({"A": "1"})["A"], terminal_env()["COLUMNS"]
        ('1', '80')
    """
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",  # stdout and stderr interleave as in a terminal
            "COLUMNS": "80",  # argparse wraps help text the same everywhere
            "NO_COLOR": "1",
        }
    )
    env.update(extra or {})
    return env


def _key(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> str:
    named = {}
    for arg in argv[1:]:
        path = cwd / arg
        if path.is_file():
            named[arg] = hashlib.sha256(path.read_bytes()).hexdigest()
    stable_env = {k: v for k, v in env.items() if not k.startswith(_VOLATILE)}
    words = ["python" if a == sys.executable else a for a in argv]
    text = json.dumps([words, sorted(stable_env.items()), named])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_once(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``, or return the earlier run's result.

    Its output is captured as a terminal shows it: stdout and stderr together
    (in ``stdout``; ``stderr`` is None), as a page's console block expects.

    Args:
        argv: the command; ``sys.executable`` stands for ``python``.
        cwd: the folder it runs in; the files the command names are read from it
            for the key (the folder itself is not part of it).
        env: its whole environment (default: this process's).
        timeout: seconds before the process is killed (then it raises, as
            :func:`subprocess.run` does, and nothing is stored).

    Returns:
        The completed process, its output as text in ``stdout``.
    """
    env = dict(os.environ if env is None else env)
    cwd = Path(cwd)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, check=False)

    folder = os.environ.get(ENV)
    if not folder or not Path(folder).is_dir():
        return run()
    key = _key(argv, env, cwd)
    result = Path(folder) / f"{key}.json"
    with _locked(Path(folder) / f"{key}.lock"):
        if result.is_file():
            saved = json.loads(result.read_text())
            return subprocess.CompletedProcess(list(argv), saved["returncode"], saved["stdout"])
        proc = run()
        saved = {"returncode": proc.returncode, "stdout": proc.stdout}
        result.with_suffix(".tmp").write_text(json.dumps(saved))
        result.with_suffix(".tmp").replace(result)
        return proc
