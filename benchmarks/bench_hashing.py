"""Hashing throughput: ``hash_pytree`` against one ``hashlib.sha256`` on one thread.

The tree is 256 MiB of float32 in 32 leaves (``jax.Array``). The baseline is
``hashlib.sha256`` over one contiguous 256 MiB buffer on one thread: the
speed of SHA-256 on one core, which no single-threaded hash can beat. jpr hashes
each leaf on a pool of threads (``hashlib`` releases the GIL) straight from the
array's memory (a ``memoryview``, no copy), so with two cores free it can
approach 2x. Also measured, each against the same baseline:

* ``naive``: ``sha256(leaf.tobytes())`` per leaf, what most code does (a copy of
  every leaf, one thread);
* one core free, two ways: the process pinned to one CPU (``taskset -c 0``,
  where jpr hashes on one thread), and both CPUs usable while a busy process
  spins on the other one.

Targets: parallel >= 1.5x, one core free >= 0.9x (both ways).

    python benchmarks/bench_hashing.py [--quick] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import tracemalloc

import _common as c
import jax
import numpy as np

from jpr.hashing import hash_pytree

LEAVES = 32


def make_tree(total_bytes: int) -> dict[str, jax.Array]:
    """``LEAVES`` float32 ``jax.Array`` leaves of ``total_bytes`` in all, not constant."""
    per = total_bytes // LEAVES // 4
    base = np.arange(per, dtype=np.float32)
    tree = {f"layer{i:02d}": jax.device_put(base * np.float32(i + 1)) for i in range(LEAVES)}
    jax.block_until_ready(tree)
    return tree


def naive(tree) -> list[bytes]:
    """What most code does: a copy of each leaf, hashed on one thread."""
    return [hashlib.sha256(np.asarray(v).tobytes()).digest() for v in tree.values()]


def peak_alloc(fn) -> int:
    """Bytes of the largest allocation peak (traced by tracemalloc) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _spinner(cpu: int) -> subprocess.Popen:
    """A process that keeps CPU ``cpu`` busy until killed (returns once it spins)."""
    code = (
        f"import os, sys\nos.sched_setaffinity(0, {{{cpu}}})\n"
        "print('spinning', flush=True)\nwhile True: pass"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    time.sleep(0.2)
    return proc


def main(argv: list[str] | None = None) -> dict:
    args = c.parser(__doc__.split("\n")[0]).parse_args(argv)
    total = (8 << 20) if args.quick else (256 << 20)
    repeat = args.repeat or (2 if args.quick else 15)
    rep = c.Report("hashing", args)
    mib = total / 2**20

    tree = make_tree(total)
    buf = np.frombuffer(np.random.default_rng(0).bytes(total), dtype=np.uint8)

    def baseline():
        return hashlib.sha256(memoryview(buf)).digest()

    def jpr():
        return hash_pytree(tree)

    jpr()  # warm: the first np.asarray of each leaf
    t = c.interleaved({"baseline": baseline, "naive": lambda: naive(tree), "jpr": jpr}, repeat)
    b, n, j = c.best(t["baseline"]), c.best(t["naive"]), c.best(t["jpr"])
    rep.figure("tree_mib", mib)
    rep.figure("cpus_usable", len(os.sched_getaffinity(0)))
    rep.figure("baseline_mib_s", round(mib / b), f"{mib / b:.0f} MiB/s (sha256, one thread)")
    rep.figure("naive_mib_s", round(mib / n), f"{mib / n:.0f} MiB/s (tobytes + sha256)")
    rep.figure("jpr_mib_s", round(mib / j), f"{mib / j:.0f} MiB/s (hash_pytree)")
    extra_jpr = peak_alloc(jpr)
    extra_naive = peak_alloc(lambda: naive(tree))
    rep.figure("jpr_peak_alloc_bytes", extra_jpr, f"{extra_jpr / 2**10:.0f} KiB allocated by jpr")
    rep.figure(
        "naive_peak_alloc_bytes", extra_naive, f"{extra_naive / 2**20:.1f} MiB allocated by naive"
    )
    rep.ratio(
        "hashing.naive",
        b / n,
        target="baseline to beat",
        met=None,
        baseline=f"{mib / b:.0f} MiB/s",
        jpr=f"{mib / n:.0f} MiB/s",
        what=f"sha256(leaf.tobytes()) per leaf, {LEAVES} leaves, {mib:.0f} MiB",
    )
    rep.ratio(
        "hashing.parallel",
        b / j,
        target=">= 1.5x",
        met=b / j >= 1.5 if not args.quick else None,
        baseline=f"{mib / b:.0f} MiB/s",
        jpr=f"{mib / j:.0f} MiB/s",
        what=f"hash_pytree, {LEAVES} leaves, {mib:.0f} MiB, all cores",
    )

    cpus = sorted(os.sched_getaffinity(0))
    # One core free (1): pinned to one CPU, as under `taskset -c 0`. The affinity
    # of this thread is inherited by the hashing threads created for each call.
    os.sched_setaffinity(0, {cpus[0]})
    try:
        t1 = c.interleaved({"baseline": baseline, "jpr": jpr}, repeat)
    finally:
        os.sched_setaffinity(0, cpus)
    b1, j1 = c.best(t1["baseline"]), c.best(t1["jpr"])
    rep.ratio(
        "hashing.one_core_pinned",
        b1 / j1,
        target=">= 0.9x",
        met=b1 / j1 >= 0.9 if not args.quick else None,
        baseline=f"{mib / b1:.0f} MiB/s",
        jpr=f"{mib / j1:.0f} MiB/s",
        what="process pinned to one CPU (taskset -c 0)",
    )

    # One core free (2): every CPU usable, but another process keeps one busy.
    if len(cpus) > 1:
        spin = _spinner(cpus[-1])
        try:
            t2 = c.interleaved({"baseline": baseline, "jpr": jpr}, repeat)
        finally:
            spin.kill()
            spin.wait()
        b2, j2 = c.best(t2["baseline"]), c.best(t2["jpr"])
        rep.ratio(
            "hashing.other_core_busy",
            b2 / j2,
            target=">= 0.9x",
            met=b2 / j2 >= 0.9 if not args.quick else None,
            baseline=f"{mib / b2:.0f} MiB/s",
            jpr=f"{mib / j2:.0f} MiB/s",
            what="all CPUs usable, a busy loop on one of them",
        )
    return rep.finish()


if __name__ == "__main__":
    main()
