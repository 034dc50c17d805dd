"""What the coordinated stop costs a multi-process run (issue 13).

In a run of several processes, ``jpr run`` asks every process at each chunk
boundary (a chunk is at most 256 steps, and ends at every save) whether any of
them got SIGTERM or SIGINT: one all-gather of a byte
(:func:`jpr.distributed.stop_requested_anywhere`). This script starts a real
2-process job on 127.0.0.1 (``jpr launch -n 2``) and, in process 0:

* times the all-gather alone, ``--calls`` times (the median);
* times one chunk of training as ``jpr run`` does it with ``--microbatches 8``:
  (a run of 50 + 256 steps) - (a run of 50 steps), repeated, the best.
  That difference is 256 steps and one agreement.

* baseline: the chunk without its agreement (chunk - median agreement);
* jpr: the chunk as it runs.

Target: <= 1.01x (1 %). Saving more often (``--save-every``) makes chunks
shorter, so the agreement weighs more: its cost per step is printed too.

    python benchmarks/bench_preempt.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import json
import sys

import _common as c

CHILD = r"""
import json, statistics, sys, time
from jpr import distributed
distributed.initialize()
import jax
from jpr.run_repro import build_parser, run

repeat, calls = int(sys.argv[1]), int(sys.argv[2])
argv = ["--microbatches", "8", "--no-progress"]

def train(steps):
    t = time.perf_counter()
    run(build_parser().parse_args(["--steps", str(steps), *argv]), out=lambda *a: None)
    return time.perf_counter() - t

def agree():
    t = time.perf_counter()
    distributed.stop_requested_anywhere(None)
    return time.perf_counter() - t

train(50)  # compile and warm
chunks = []
for _ in range(repeat):
    short = train(50)
    chunks.append(train(50 + 256) - short)
agreements = [agree() for _ in range(calls)]
if jax.process_index() == 0:
    print(json.dumps({"chunk": min(chunks), "agree": statistics.median(agreements),
                      "agree_p90": sorted(agreements)[int(0.9 * len(agreements))]}))
"""


def main(argv: list[str] | None = None) -> dict:
    args = c.parser(__doc__.split("\n")[0]).parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    calls = 20 if args.quick else 500
    report = c.Report("preempt", args)
    job = [sys.executable, "-m", "jpr", "launch", "-n", "2", "--", "python", "-c", CHILD,
           str(repeat), str(calls)]
    _, proc = c.run_child(job)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"the 2-process job exited with {proc.returncode}")
    line = next(s for s in proc.stdout.splitlines() if s.startswith("[0] {"))
    got = json.loads(line[len("[0] "):])
    chunk, agree = got["chunk"], got["agree"]
    report.figure("agreement_median_s", agree, c.us(agree))
    report.figure("agreement_p90_s", got["agree_p90"], c.us(got["agree_p90"]))
    report.figure("chunk_256_steps_s", chunk, c.ms(chunk))
    report.figure("agreement_per_step_s", agree / 256, c.us(agree / 256))
    baseline = chunk - agree
    ratio = chunk / baseline if baseline > 0 else float("nan")
    report.ratio("preempt.agreement", ratio, target="<= 1.01x",
                 met=None if args.quick else ratio <= 1.01, baseline=c.ms(baseline),
                 jpr=c.ms(chunk), what="2 processes, 256 steps with --microbatches 8")
    return report.finish()


if __name__ == "__main__":
    main()
