"""benchmarks/gpu_determinism.py runs on CPU in its tiny mode and says what it measured.

The script is meant for a GPU machine; here it must still run both modes (one
process each, the second with ``--xla_gpu_deterministic_ops=true``), find every
result repeatable (the CPU backend is deterministic), and say plainly that the
flag is irrelevant on CPU. It imports only jpr's JAX-side modules (no orbax).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = REPO / "benchmarks" / "gpu_determinism.py"


@pytest.mark.slow
def test_tiny_mode_runs_on_cpu(tmp_path):
    out_json = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json", str(out_json)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "flag is irrelevant here" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("| default", "| deterministic"))]
    assert len(rows) == 2, out
    assert all("| equal (" in r for r in rows), out
    assert "cost of the flag" in out

    data = json.loads(out_json.read_text())
    by_mode = {r["mode"]: r for r in data["results"]}
    assert set(by_mode) == {"default", "deterministic"}
    assert by_mode["default"]["xla_flags"] == ""
    assert by_mode["deterministic"]["xla_flags"] == "--xla_gpu_deterministic_ops=true"
    for r in by_mode.values():
        assert r["backend"] == "cpu"
        assert r["train"]["equal"]
        assert r["scatter_add"]["distinct"] == 1
        assert r["column_sum"]["distinct"] == 1
        assert r["modules_loaded"]["orbax"] is False  # a GPU box may not have it
    # The flag changes nothing on CPU: both modes computed the same bits.
    d, g = by_mode["default"], by_mode["deterministic"]
    assert d["train"]["hashes"] == g["train"]["hashes"]
    assert d["scatter_add"]["hashes"] == g["scatter_add"]["hashes"]
