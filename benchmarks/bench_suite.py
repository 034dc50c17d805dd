"""Wall time of the whole test suite and of ``mkdocs build --strict``.

The suite as ``pytest`` runs it (unit tests, CLI end-to-end tests, every
executed docs page and snippet; not the slow tier, which only ``--all`` or
``-m slow`` runs) must stay under 90 seconds on the 2-core machine it is
developed on. The slow tier's own wall time (``pytest -m slow -n 2``) is
reported too, with no budget.
Measured as a reader would run it, in a fresh process from the repository
root, once per worker setting (``-n 0``: one process; ``-n 2``: two
pytest-xdist workers, ``--dist loadfile`` so that a page's blocks stay together).
The ratio is the wall time over that 90-second budget.

``mkdocs build --strict`` builds the site (executing the notebook pages) into
a temporary folder; its wall time is reported, with no budget.

    python benchmarks/bench_suite.py [--quick] [--workers 0,2] [--json out.json]

``--quick`` runs one small test file and skips the site build (a smoke test).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import _common as c

BUDGET_S = 90.0


def _summary(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error)", ln):
            return ln.strip("= ").strip()
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> dict:
    p = c.parser(__doc__.split("\n")[0])
    p.add_argument("--workers", default="0,2", help="pytest-xdist worker counts to try")
    args = p.parse_args(argv)
    rep = c.Report("suite", args)
    py = sys.executable
    env = c.child_env()
    targets = ["tests/test_config.py"] if args.quick else []
    for n in [int(w) for w in args.workers.split(",") if w.strip()]:
        # -n always: pyproject's addopts say -n auto, which -n 0 must override.
        argv_ = [py, "-m", "pytest", "-q", *targets, "-n", str(n)]
        if n:
            # loadfile, not loadgroup: a page's blocks must stay in one worker, in
            # order, and pytest-xdist's loadgroup does not group on pytest 9.2
            # (pytest-dev/pytest-xdist#1386).
            argv_ += ["--dist", "loadfile"]
        wall, proc = c.run_child(argv_, cwd=c.REPO, env=env)
        summary = _summary(proc.stdout + proc.stderr)
        rep.figure(f"pytest_n{n}_s", round(wall, 1), f"{wall:.1f} s ({summary})")
        ok = proc.returncode == 0
        rep.figure(f"pytest_n{n}_ok", ok)
        rep.ratio(
            f"suite.pytest_n{n}",
            wall / BUDGET_S,
            target=f"<= 1.0x of {BUDGET_S:.0f} s",
            met=(ok and wall <= BUDGET_S) if not args.quick else None,
            baseline=f"budget {BUDGET_S:.0f} s",
            jpr=f"{wall:.1f} s" + ("" if ok else f" ({summary})"),
            what=f"the test suite (not the slow tier), pytest -n {n}"
            + (" --dist loadfile" if n else "")
            + ", fresh process",
        )
    if not args.quick:
        wall, proc = c.run_child([py, "-m", "pytest", "-q", "-m", "slow", "-n", "2", "--dist",
                                  "loadfile"], cwd=c.REPO, env=env)
        summary = _summary(proc.stdout + proc.stderr)
        rep.figure("pytest_slow_tier_n2_s", round(wall, 1), f"{wall:.1f} s ({summary})")
        rep.ratio(
            "suite.slow_tier",
            wall / BUDGET_S,
            target="report only",
            met=proc.returncode == 0,
            baseline=f"budget {BUDGET_S:.0f} s (the suite's, for scale)",
            jpr=f"{wall:.1f} s",
            what="the slow tier, pytest -m slow -n 2 --dist loadfile",
        )
        site = Path(tempfile.mkdtemp(prefix="jpr-site-"))
        try:
            wall, proc = c.run_child(
                [py, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                cwd=c.REPO,
                env=env,
            )
        finally:
            shutil.rmtree(site, ignore_errors=True)
        ok = proc.returncode == 0
        rep.figure("mkdocs_build_strict_s", round(wall, 1), f"{wall:.1f} s (ok: {ok})")
        rep.ratio(
            "suite.mkdocs",
            wall / BUDGET_S,
            target="report only",
            met=ok,
            baseline=f"budget {BUDGET_S:.0f} s (the suite's, for scale)",
            jpr=f"{wall:.1f} s",
            what="mkdocs build --strict, notebooks executed",
        )
    return rep.finish()


if __name__ == "__main__":
    main()
