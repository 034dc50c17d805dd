"""Shared helpers of the benchmark scripts: timing, the machine, and the output.

Every script measures its baseline in the same process as jpr, interleaving
the two so that a noisy neighbour slows both alike, and prints one ``RATIO``
line per target::

    RATIO hashing.parallel: 1.83x (target >= 1.5x) met

``--json PATH`` also writes the results (``benchmarks/run_all.py`` collects
them into the Performance page). Timings are the best of several repeats (the
least disturbed one) unless a script says otherwise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: What every process that trains jpr's model must import first: its start-up floor.
IMPORT_FLOOR = "import jax, flax.nnx, optax"


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--quick``, ``--repeat`` and ``--json``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a figure")
    p.add_argument("--repeat", type=int, default=None, help="repeats of each timing")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn``."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(
    fns: dict[str, Callable[[], Any]], repeat: int, *, alternate: bool = False
) -> dict[str, list[float]]:
    """Time each function ``repeat`` times, round-robin, so that load hits all alike.

    ``alternate``: every other round runs the functions in reverse order, so
    that neither always runs right after the other (a cache or the clock
    warmed by one would otherwise favour the next).
    """
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat):
        order = list(fns.items())
        for k, fn in reversed(order) if alternate and r % 2 else order:
            out[k].append(timed(fn))
    return out


def best(times: list[float]) -> float:
    """The least disturbed of several timings."""
    return min(times)


def median(times: list[float]) -> float:
    """The median of several timings."""
    return statistics.median(times)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on (and how busy it was when they were)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
        },
        "loadavg": load,
    }


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def ratio_line(name: str, value: float, *, target: str, met: bool | None) -> str:
    """``RATIO name: 1.23x (target <= 1.15x) met``; ``n/a`` when noise swamped the figure."""
    status = "" if met is None else (" met" if met else " MISSED")
    shown = f"{value:.2f}x" if math.isfinite(value) and value > 0 else "n/a"
    return f"RATIO {name}: {shown} (target {target}){status}"


class Report:
    """Collects a script's figures, prints them, and writes ``--json``."""

    def __init__(self, bench: str, args: argparse.Namespace):
        self.bench, self.args = bench, args
        self.data: dict[str, Any] = {
            "bench": bench,
            "quick": bool(args.quick),
            "started": now(),
            "machine": machine(),
            "figures": {},
            "ratios": [],
        }

    def figure(self, key: str, value: Any, text: str | None = None) -> None:
        """Record a raw figure (seconds, MiB/s, ...) and print it.

        A float that is not finite (a ``--quick`` timing that noise swamped) is
        recorded as ``None``, as :meth:`ratio` records such a ratio: the JSON
        then reads back equal, and stays JSON (``NaN`` is not).
        """
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        self.data["figures"][key] = value
        shown = text if text is not None else value
        print(f"  {key}: {shown}")

    def ratio(
        self,
        name: str,
        value: float,
        *,
        target: str,
        met: bool | None,
        baseline: str,
        jpr: str,
        what: str,
    ) -> None:
        """Record and print one target: the ratio, the two sides and the verdict."""
        self.data["ratios"].append(
            {
                "name": name,
                "what": what,
                "baseline": baseline,
                "jpr": jpr,
                "ratio": round(value, 3) if math.isfinite(value) and value > 0 else None,
                "target": target,
                "met": met,
            }
        )
        print(ratio_line(name, value, target=target, met=met), flush=True)

    def finish(self) -> dict[str, Any]:
        """Stamp the end time and write ``--json`` if asked; returns the results."""
        self.data["finished"] = now()
        self.data["loadavg_after"] = machine()["loadavg"]
        if self.args.json is not None:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")
        return self.data


def child_env(**extra: str | None) -> dict[str, str]:
    """``os.environ`` for a child process, with ``extra`` set (``None`` removes a key)."""
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_child(
    argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command; returns its wall seconds and the completed process."""
    t = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=cwd, env=env or child_env(), capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"{argv!r} exited with {proc.returncode}")
    return wall, proc


def ms(seconds: float) -> str:
    """``12.3 ms``."""
    return f"{seconds * 1e3:.1f} ms"


def us(seconds: float) -> str:
    """``123.4 µs``."""
    return f"{seconds * 1e6:.1f} µs"
