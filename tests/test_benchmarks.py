"""Smoke tests of benchmarks/: every script runs in --quick mode and prints its ratios.

No timing is asserted here (the machines are noisy; the scripts print ratios
against a baseline measured in the same process). The committed results must
render to the committed Markdown that the Performance page includes.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the slow tier: `pytest --all` runs it

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RATIO_RE = re.compile(r"^RATIO [\w.]+: (\d+\.\d\dx|n/a) \(target .+\)( met| MISSED)?$", re.M)


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        return importlib.import_module(name)

    yield load
    for name in [m for m in sys.modules if m.startswith("bench_") or m in ("_common", "run_all")]:
        sys.modules.pop(name, None)


# bench_suite runs pytest in a subprocess: here only on one small file, one worker, per tier.
QUICK_ARGS = {
    "bench_hashing": ["--quick"],
    "bench_resume": ["--quick"],
    "bench_train_loop": ["--quick"],
    "bench_startup": ["--quick"],
    "bench_suite": ["--quick", "--tiers", "default,slow"],
    "bench_cpu_target": ["--quick"],
    "bench_trace": ["--quick"],
    "bench_explain": ["--quick"],
    "bench_preempt": ["--quick"],
}


@pytest.mark.parametrize("name", sorted(QUICK_ARGS))
def test_benchmark_runs_quick_and_prints_ratios(name, bench, capsys, tmp_path):
    module = bench(name)
    out = tmp_path / "out.json"
    data = module.main([*QUICK_ARGS[name], "--json", str(out)])
    printed = capsys.readouterr().out
    lines = RATIO_RE.findall(printed)
    assert lines, f"{name} printed no RATIO line:\n{printed}"
    assert len(RATIO_RE.findall(printed)) == len(data["ratios"])
    for r in data["ratios"]:  # None: a --quick timing that noise swamped (printed as n/a)
        assert r["ratio"] is None or (math.isfinite(r["ratio"]) and r["ratio"] > 0), r
    assert json.loads(out.read_text()) == data


def test_a_figure_that_noise_swamped_is_recorded_as_null(bench, capsys, tmp_path):
    """Seen in CI: a --quick per-step time came out nan (long run minus short run
    below zero), and the written JSON (NaN) did not read back equal."""
    c = bench("_common")
    args = c.parser("t").parse_args(["--quick", "--json", str(tmp_path / "r.json")])
    rep = c.Report("t", args)
    rep.figure("step_us", float("nan"), "n/a")
    rep.figure("steps", "450 - 50")
    data = rep.finish()
    text = (tmp_path / "r.json").read_text()
    assert data["figures"] == {"step_us": None, "steps": "450 - 50"}
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == data


def test_every_benchmark_script_is_run_by_run_all_and_smoke_tested(bench):
    run_all = bench("run_all")
    scripts = {p.name for p in BENCH.glob("bench_*.py")}
    assert scripts == set(run_all.BENCHES.values())
    assert {s.removesuffix(".py") for s in scripts} == set(QUICK_ARGS)


def test_committed_results_render_to_the_included_markdown(bench):
    run_all = bench("run_all")
    results = json.loads((BENCH / "results" / "latest.json").read_text(encoding="utf-8"))
    assert not results["quick"], "the committed numbers must come from a full run"
    assert results["benches"] and set(results["benches"]) <= set(run_all.BENCHES)
    md = (BENCH / "results" / "latest.md").read_text(encoding="utf-8")
    assert run_all.render(results) == md
    assert "benchmarks/results/latest.md" in (REPO / "docs" / "performance.md").read_text()
