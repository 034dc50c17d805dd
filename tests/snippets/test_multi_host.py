"""Tests of snippets/multi_host/ (included by docs/multi-host.md).

The page runs the script with the checkpoint of a real two-process run; here
it runs on its own (1, 2, 4 and 8 simulated devices, few steps) and its
``ulps`` helper is checked against values worked out by hand.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys

import numpy as np
from docs_tools import REPO_ROOT

TOPOLOGY_TABLE = "snippets/multi_host/topology_table.py"


def test_topology_table_microbatched_bits_do_not_move():
    # Start from a conflicting device count: the snippet must set its own.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [sys.executable, TOPOLOGY_TABLE, "--steps", "3"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["topology", *["params", "hash", "diverges", "ULPs"] * 2]
    rows = [re.split(r"\s{2,}", line) for line in lines[2:]]
    assert [r[0] for r in rows] == ["1 device", "2 devices", "4 devices", "8 devices"]
    micro = {(r[1], r[2], r[3]) for r in rows}
    assert len(micro) == 1 and micro.pop()[1:] == ("-", "0")  # one hash, no divergence
    plain = [(r[4], r[5], int(r[6])) for r in rows]
    assert plain[0][1:] == ("-", 0)
    assert all(d == "1" and u > 0 for _, d, u in plain[1:])  # moves at the first step
    assert len({h for h, _, _ in plain}) == 4


def test_ulps_counts_representable_floats_between(monkeypatch):
    # Loading the script sets XLA_FLAGS for its own process: undo that afterwards.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    ulps = runpy.run_path(str(REPO_ROOT / TOPOLOGY_TABLE), run_name="snippet")["ulps"]
    one = np.float32(1.0)
    assert ulps(np.array([one]), np.array([np.nextafter(one, np.float32(2))])) == 1
    assert ulps(np.array([np.float32(0.0)]), np.array([np.float32(-0.0)])) == 0
    tiny = np.float32(1e-45)  # the smallest subnormal: -tiny, -0, +0, tiny are 2 apart
    assert ulps(np.array([-tiny]), np.array([tiny])) == 2
    assert ulps(np.arange(3, dtype=np.float32), np.arange(3, dtype=np.float32)) == 0
