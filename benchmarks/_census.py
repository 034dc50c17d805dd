"""A census of the Python processes a command starts, and what their CPU went to.

:func:`census_env` gives a command an environment whose Python processes, the
command's own and every one it starts that keeps the environment, each append
one line to a log as they exit: command line, CPU seconds (user and system),
whether JAX and Flax were imported. :func:`summarize` reads the log back.
``bench_suite.py`` takes one with every run of the default tier, to show where
the tier's CPU goes and how much of it is only the start of the JAX processes
that the pages and tests run on purpose.

What a census cannot see: a process that is killed by a signal or leaves
through ``os._exit`` writes no line (the command's total CPU, read from
``getrusage``, counts it), and neither does one started with ``python -I``,
``-S`` or an environment of its own.

Example:

    >>> import subprocess, sys, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> env = census_env(folder)
    >>> _ = subprocess.run([sys.executable, "-c", "import subprocess, sys; "
    ...                     "subprocess.run([sys.executable, '-c', 'pass'])"], env=env)
    >>> c = summarize(read_log(folder))
    >>> c.processes, c.jax_processes, c.cpu_logged > 0
    (2, 0, True)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path

LOG = "census.jsonl"

# Written as the folder's sitecustomize.py, which Python imports at start-up
# when the folder is on PYTHONPATH. The first process to run it is the root.
_SITECUSTOMIZE = '''\
import atexit, json, os, sys

os.environ.setdefault("JPR_CENSUS_ROOT", str(os.getpid()))


def _jpr_census_line():
    t = os.times()
    line = json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "root": int(os.environ["JPR_CENSUS_ROOT"]),
        "argv": sys.argv[:3], "cpu": round(t.user + t.system, 3),
        "jax": "jax" in sys.modules, "flax": "flax" in sys.modules,
    })
    try:
        with open(os.environ["JPR_CENSUS_LOG"], "a", encoding="utf-8") as f:
            f.write(line + "\\n")
    except (KeyError, OSError):
        pass


atexit.register(_jpr_census_line)
'''


def census_env(folder: str | Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with a census that logs into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    out = dict(os.environ if env is None else env)
    out.pop("JPR_CENSUS_ROOT", None)
    out["JPR_CENSUS_LOG"] = str(folder / LOG)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), out.get("PYTHONPATH")) if p)
    return out


def read_log(folder: str | Path) -> list[dict]:
    """The census lines logged in ``folder``, one dict per process."""
    path = Path(folder) / LOG
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln]


def kind(argv: list[str]) -> str:
    """A short name for a process's command, with no folder of this machine in it."""
    if not argv or argv[0] in ("", "-c"):
        return "python -c"
    path = argv[0].replace("\\", "/")
    name = path.rsplit("/", 1)[-1]
    nxt = argv[1] if len(argv) > 1 and not argv[1].startswith("/") else ""
    if name == "jpr" or (name == "__main__.py" and path.endswith("jpr/__main__.py")):
        return f"jpr {nxt}".strip()
    if "/jpr/" in path and name.endswith(".py"):
        return f"python -m jpr.{name[:-3]} {nxt if nxt == '--worker' else ''}".strip()
    if name == "ipykernel_launcher.py":
        return "notebook kernel"
    if name == "pytest" or path.endswith("pytest/__main__.py"):
        return "pytest"
    return "/".join(path.split("/")[-2:])


@dataclasses.dataclass(frozen=True)
class Census:
    """What :func:`summarize` counts (CPU in seconds, user and system)."""

    processes: int
    jax_processes: int
    workers: int
    cpu_logged: float
    cpu_workers: float
    cpu_root: float
    #: The processes the root and the workers started:
    #: (kind, imported Flax?) -> [count, CPU, how many imported JAX].
    children: dict[tuple[str, bool], list]

    def imports_floor(self, *, jax_s: float, flax_s: float) -> float:
        """CPU the JAX children would need to do nothing but import (jax_s, or flax_s with Flax)."""
        return sum(jax_n * (flax_s if has_flax else jax_s)
                   for (_, has_flax), (_, _, jax_n) in self.children.items())

    def top(self, n: int) -> dict[str, str]:
        """The ``n`` kinds of child that used the most CPU: ``{kind: "count x, CPU s"}``."""
        merged: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        for (k, _), (count, cpu, _) in self.children.items():
            merged[k][0] += count
            merged[k][1] += cpu
        ranked = sorted(merged.items(), key=lambda kv: -kv[1][1])[:n]
        return {k: f"{count}x, {cpu:.1f} s" for k, (count, cpu) in ranked}


def summarize(records: list[dict]) -> Census:
    """Count the processes of one census: the root, its workers and the children."""
    roots = {r["root"] for r in records}
    # pytest-xdist starts its workers as `python -c`, straight from the root
    workers = [r for r in records if r["ppid"] in roots and r["argv"] == ["-c"]]
    main = [r for r in records if r["pid"] in roots]
    skip = {r["pid"] for r in workers + main}
    children: dict[tuple[str, bool], list] = collections.defaultdict(lambda: [0, 0.0, 0])
    for r in records:
        if r["pid"] not in skip:
            entry = children[(kind(r["argv"]), r["flax"])]
            entry[0] += 1
            entry[1] += r["cpu"]
            entry[2] += int(r["jax"])
    return Census(
        processes=len(records),
        jax_processes=sum(r["jax"] for r in records),
        workers=len(workers),
        cpu_logged=sum(r["cpu"] for r in records),
        cpu_workers=sum(r["cpu"] for r in workers),
        cpu_root=sum(r["cpu"] for r in main),
        children=dict(children),
    )
