"""Tests of snippets/jax_prng/ (included by docs/jax-prng.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from docs_tools import REPO_ROOT

SHARDED_BITS = "snippets/jax_prng/sharded_bits.py"


def test_sharded_bits_are_the_same_bits():
    # Start from a conflicting device count: the snippet must set its own.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [sys.executable, SHARDED_BITS],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("devices: 4\n")
    one = re.findall(r"one device\s+([0-9a-f]{16})", out)
    four = re.findall(r"4 devices\s+([0-9a-f]{16})\s+shards \(2, 1024\) x 4", out)
    assert len(one) == len(four) == 2
    assert one == four  # sharded == unsharded, in both layouts
    assert one[0] != one[1]  # and the two layouts are different streams
    assert out.count("same bits:   True") == 2
