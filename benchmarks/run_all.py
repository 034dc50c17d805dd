"""Run every benchmark and write the numbers the Performance page shows.

Each script runs in a fresh process (``--json``), one after the other; the
results are merged into ``benchmarks/results/latest.json`` and rendered as
``benchmarks/results/latest.md``, which ``docs/performance.md`` includes. Run
it on a quiet machine, then commit both files::

    python benchmarks/run_all.py                  # all of them, ~20 minutes on 2 cores
    python benchmarks/run_all.py --only hashing,resume
    python benchmarks/run_all.py --quick --out-dir "$(mktemp -d)"   # smoke test
    python benchmarks/run_all.py --render         # latest.md again from latest.json

With ``--only``, the other benchmarks' previous results are kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as c

BENCHES = {
    "hashing": "bench_hashing.py",
    "resume": "bench_resume.py",
    "train_loop": "bench_train_loop.py",
    "startup": "bench_startup.py",
    "suite": "bench_suite.py",
    "cpu_target": "bench_cpu_target.py",
    "trace": "bench_trace.py",
    "explain": "bench_explain.py",
    "preempt": "bench_preempt.py",
}
RESULTS = c.REPO / "benchmarks" / "results"


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _verdict(met) -> str:
    return {True: "met", False: "**missed**", None: "(reported)"}[met]


def render(results: dict) -> str:
    """The Markdown that the Performance page includes."""
    m = results["machine"]
    v = m["versions"]
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    load = ", ".join(
        f"{name} {r['machine']['loadavg'][0]}"
        for name, r in results["benches"].items()
        if r["machine"].get("loadavg")
    )
    lines = [
        f"Measured on **{m['cpu']}**, {m['cores']} cores, {m['memory_gib']} GiB of memory, "
        f"{m['os']} ({m['machine']}); Python {m['python']}, {versions}. "
        f"Run finished {results['finished']} (UTC) by `python benchmarks/run_all.py`"
        f"{' --quick' if results['quick'] else ''}.",
        "",
        f"How busy the machine was: the 1-minute load average as each benchmark started: {load}.",
        "",
        "| Target | Measured | Baseline | jpr | Ratio | Goal | |",
        "| --- | --- | --- | --- | ---: | --- | --- |",
    ]
    for r in results["benches"].values():
        for x in r["ratios"]:
            lines.append(
                f"| `{x['name']}` | {x['what']} | {x['baseline']} | {x['jpr']} | "
                f"{_ratio(x['ratio'])} | {x['target']} | {_verdict(x['met'])} |"
            )
    lines += ["", '??? note "Every figure of this run"', ""]
    for name, r in results["benches"].items():
        lines.append(f"    **{name}** (`benchmarks/{BENCHES[name]}`)")
        lines.append("")
        for k, val in r["figures"].items():
            lines.append(f"    - `{k}`: {_fmt(val)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where to write the results")
    p.add_argument(
        "--render", action="store_true", help="only re-render latest.md from latest.json"
    )
    args = p.parse_args(argv)
    if args.render:
        results = json.loads((args.out_dir / "latest.json").read_text(encoding="utf-8"))
        (args.out_dir / "latest.md").write_text(render(results), encoding="utf-8")
        return 0
    names = list(BENCHES) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")

    out_json = args.out_dir / "latest.json"
    previous = {}
    if args.only and out_json.exists():
        previous = json.loads(out_json.read_text(encoding="utf-8")).get("benches", {})
    benches = dict(previous)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            target = Path(tmp) / f"{name}.json"
            script = c.REPO / "benchmarks" / BENCHES[name]
            cmd = [sys.executable, str(script), "--json", str(target)]
            if args.quick:
                cmd.append("--quick")
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, cwd=c.REPO, env=c.child_env(), check=False)
            if proc.returncode != 0:
                print(f"{name} failed with exit status {proc.returncode}", file=sys.stderr)
                return proc.returncode
            benches[name] = json.loads(target.read_text(encoding="utf-8"))
    ordered = {n: benches[n] for n in BENCHES if n in benches}
    results = {
        "machine": c.machine(),
        "finished": c.now(),
        "quick": args.quick,
        "benches": ordered,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out_dir / "latest.md").write_text(render(results), encoding="utf-8")
    print(f"wrote {out_json} and latest.md")
    missed = [x["name"] for r in ordered.values() for x in r["ratios"] if x["met"] is False]
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
