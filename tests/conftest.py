"""Shared fixtures for the library tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A persistent XLA compilation cache shared by this process and every
# subprocess the tests start: compiling the train step once per machine instead
# of once per process keeps the suite fast.
CACHE = REPO / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    """Run ``python -m <args>`` in ``cwd``; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli(tmp_path):
    """``cli("jpr", "run", ...)`` runs a module in a fresh folder."""

    def _run(*args: str, env: dict | None = None, timeout: float = 120):
        return run_cli(*args, cwd=tmp_path, env=env, timeout=timeout)

    _run.cwd = tmp_path
    return _run
