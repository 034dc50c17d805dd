"""Tests of snippets/pitfalls/ (included by docs/pitfalls.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from docs_tools import REPO_ROOT

from jpr import platform

CPU_OUTPUTS = "snippets/pitfalls/cpu_outputs.py"


def outputs(**env: str) -> dict[str, str]:
    drop = ("XLA_FLAGS", "_JPR_PINNED_FLAGS", "ONEDNN_MAX_CPU_ISA")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    proc = subprocess.run(
        [sys.executable, CPU_OUTPUTS, "--quick"], cwd=REPO_ROOT, env={**base, **env},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_it_pins_the_target_and_prints_16_hex_digits_per_output():
    out = outputs()
    target = out.pop("target")
    assert target == platform.pin_cpu_target({}).describe()
    out.pop("seconds")
    assert len(out) == 12 and all(len(v) == 16 and int(v, 16) >= 0 for v in out.values())


@pytest.mark.skipif(
    platform.host_isa() not in ("AVX2+FMA", "AVX512"), reason="needs an x86-64 host with FMA"
)
def test_bits_hold_and_floats_move_without_fma():
    pinned, older = outputs(), outputs(XLA_FLAGS="--xla_cpu_max_isa=AVX")
    assert pinned["PRNG bits (canary: bits, split, fold_in)"] == older[
        "PRNG bits (canary: bits, split, fold_in)"
    ]
    assert pinned["10 training steps (home page, library)"] != older[
        "10 training steps (home page, library)"
    ]
