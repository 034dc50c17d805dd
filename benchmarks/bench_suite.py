"""Wall time of the test suite's tiers, and of ``mkdocs build --strict``.

The budgets, on the 2-core machine the project is developed on:

- the README's test command, ``pytest`` (unit tests, CLI end-to-end tests,
  every executed docs page and snippet): at most 90 s;
- the slow tier, ``pytest -m slow`` (real multi-process jobs killed and
  resumed, cluster software, the site in Chromium, the benchmarks' smoke
  runs, the CPU canary on this host and on two emulated CPUs): at most 150 s.

Each tier is run as a reader runs it, in a fresh process from the repository
root with pyproject's own options (``-n auto --dist loadfile``), ``--repeat``
times (default 3), and the median is compared with the budget; every run's
time is printed too. Each run of the default tier takes a census of the
Python processes it starts (``_census.py``); the median run's is reported: how
many processes, which imported JAX, the CPU of each kind, and the CPU the JAX
processes would need to do nothing but import JAX, Flax and optax (measured
here, in fresh processes), against the budget spread over the cores. The
tier ``slow_native`` (``pytest -m "slow and not emulated"``: the slow tier
without the canaries under qemu, several minutes each) and ``mkdocs build
--strict`` (``--site``) are reported with no budget.

    python benchmarks/bench_suite.py [--repeat 3] [--tiers default,slow,slow_native] [--site]

``--quick`` runs one small test file once per tier (a smoke test of this script).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import _census
import _common as c

#: Wall-time budgets in seconds (None: reported only).
BUDGETS = {"default": 90.0, "slow": 150.0, "slow_native": None}
#: What each tier adds to `pytest` (the default tier is the bare command).
TIER_ARGS = {"default": [], "slow": ["-m", "slow"],
             "slow_native": ["-m", "slow and not emulated"]}


def _summary(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|deselected)", ln):
            return ln.strip("= ").strip()
    return lines[-1] if lines else ""


def _children_cpu() -> float:
    """CPU seconds (user and system) of every process this one has waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class _Run(NamedTuple):
    wall: float  # seconds
    cpu: float  # CPU seconds of every process it waited for
    census: _census.Census | None
    summary: str  # pytest's last line
    ok: bool


def _run_counted(argv: list[str], *, census: bool) -> _Run:
    """One run of ``argv``, with a census of its processes if ``census``."""
    folder = tempfile.mkdtemp(prefix="jpr-census-")
    try:
        env = _census.census_env(folder, c.child_env()) if census else c.child_env()
        cpu = _children_cpu()
        wall, proc = c.run_child(argv, cwd=c.REPO, env=env)
        cpu = _children_cpu() - cpu
        counted = _census.summarize(_census.read_log(folder)) if census else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _Run(wall, cpu, counted, _summary(proc.stdout + proc.stderr), proc.returncode == 0)


def _time_tier(rep: c.Report, tier: str, *, repeat: int, quick: bool) -> None:
    tier_args = TIER_ARGS[tier]
    if quick:  # one small file in one process; its tests are in no tier but the default
        tier_args = [*(["-m", "not slow"] if tier_args else []), "tests/test_config.py", "-n", "0"]
    argv = [sys.executable, "-m", "pytest", "-q", *tier_args]
    done = [_run_counted(argv, census=tier == "default") for _ in range(repeat)]
    walls = [r.wall for r in done]
    summaries = [r.summary for r in done]
    ok = all(r.ok for r in done)
    med = statistics.median(walls)
    runs = ", ".join(f"{w:.1f}" for w in walls)
    rep.figure(f"pytest_{tier}_s", round(med, 1),
               f"median {med:.1f} s of {repeat} ({runs} s; {summaries[-1]})")
    rep.figure(f"pytest_{tier}_ok", ok)
    budget = BUDGETS[tier]
    rep.ratio(
        f"suite.{tier}",
        med / budget if budget else med / BUDGETS["default"],
        target=f"<= 1.0x of {budget:.0f} s" if budget else "report only",
        met=None if quick else (ok and (budget is None or med <= budget)),
        baseline=f"budget {budget:.0f} s" if budget else "the default tier's budget, for scale",
        jpr=f"{med:.1f} s (median of {repeat}: {runs})" + ("" if ok else f" ({summaries[-1]})"),
        what=f"pytest {' '.join(TIER_ARGS[tier])}".strip() + ", fresh process, 2 xdist workers"
        " on 2 cores",
    )
    if tier == "default":
        middle = sorted(range(repeat), key=lambda i: walls[i])[repeat // 2]
        _report_census(rep, done[middle].census, done[middle].cpu, repeat=1 if quick else 3)


def _import_cpu(statement: str, *, repeat: int) -> float:
    """Median CPU seconds of a fresh Python process that runs ``statement``."""
    cpus = []
    for _ in range(repeat):
        cpu = _children_cpu()
        c.run_child([sys.executable, "-c", statement], cwd=c.REPO)
        cpus.append(_children_cpu() - cpu)
    return statistics.median(cpus)


def _report_census(rep: c.Report, census: _census.Census, cpu: float, *, repeat: int) -> None:
    """Where the median default-tier run's CPU went, and what its JAX processes cost to start."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    budget = BUDGETS["default"]
    jax_s = _import_cpu("import jax", repeat=repeat)
    flax_s = _import_cpu(c.IMPORT_FLOOR, repeat=repeat)
    floor = census.imports_floor(jax_s=jax_s, flax_s=flax_s)
    children = census.cpu_logged - census.cpu_workers - census.cpu_root
    jax_children = sum(jax_n for _, _, jax_n in census.children.values())
    rep.figure("census_processes", {"python": census.processes, "with JAX": census.jax_processes,
                                    "xdist workers": census.workers})
    rep.figure("census_cpu_s", {"every process (getrusage)": round(cpu, 1),
                                "logged at exit": round(census.cpu_logged, 1),
                                "pytest": round(census.cpu_root, 1),
                                "xdist workers": round(census.cpu_workers, 1),
                                "processes they started": round(children, 1)})
    rep.figure("census_children_by_cpu", census.top(10))
    rep.figure("import_cpu_s", {"jax": round(jax_s, 2), "jax, flax.nnx, optax": round(flax_s, 2)})
    rep.ratio("suite.cpu", cpu / cores / budget, target="report only", met=None,
              baseline=f"budget {budget:.0f} s",
              jpr=f"{cpu:.0f} CPU-s / {cores} cores = {cpu / cores:.0f} s",
              what=f"the default tier's CPU (every process), spread evenly over {cores} cores")
    rep.ratio("suite.imports", floor / cores / budget, target="report only", met=None,
              baseline=f"budget {budget:.0f} s",
              jpr=f"{jax_children} processes x {jax_s:.2f}-{flax_s:.2f} s = {floor:.0f} CPU-s"
              f" / {cores} cores = {floor / cores:.0f} s",
              what="the JAX processes the default tier starts (workers aside), each doing "
              "nothing but import JAX (and Flax and optax where it did)")


def _time_site(rep: c.Report) -> None:
    site = Path(tempfile.mkdtemp(prefix="jpr-site-"))
    try:
        wall, proc = c.run_child(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
            cwd=c.REPO, env=c.child_env(),
        )
    finally:
        shutil.rmtree(site, ignore_errors=True)
    ok = proc.returncode == 0
    rep.figure("mkdocs_build_strict_s", round(wall, 1), f"{wall:.1f} s (ok: {ok})")
    rep.ratio("suite.mkdocs", wall / BUDGETS["default"], target="report only", met=ok,
              baseline="the default tier's budget, for scale", jpr=f"{wall:.1f} s",
              what="mkdocs build --strict, notebooks executed")


def main(argv: list[str] | None = None) -> dict:
    p = c.parser(__doc__.split("\n")[0])
    p.add_argument("--tiers", default="default,slow",
                   help="tiers to time: default, slow, slow_native")
    p.add_argument("--site", action="store_true", help="also time mkdocs build --strict once")
    args = p.parse_args(argv)
    rep = c.Report("suite", args)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    unknown = sorted(set(tiers) - set(TIER_ARGS))
    repeat = 1 if args.quick else (3 if args.repeat is None else args.repeat)
    if unknown or repeat < 1:
        p.error(f"unknown tier {unknown[0]!r}" if unknown else "--repeat must be at least 1")
    for tier in tiers:
        _time_tier(rep, tier, repeat=repeat, quick=args.quick)
    if args.site and not args.quick:
        _time_site(rep)
    return rep.finish()


if __name__ == "__main__":
    main()
