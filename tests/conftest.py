"""Shared fixtures for the library tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The persistent XLA compilation cache is configured in the root conftest.py.


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
