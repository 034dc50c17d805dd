"""Tests of snippets/pitfalls/ (included by docs/pitfalls.md)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
from docs_tools import REPO_ROOT, shared_runs

from jpr import platform

CPU_OUTPUTS = "snippets/pitfalls/cpu_outputs.py"


def outputs(**env: str) -> dict[str, str]:
    """cpu_outputs.py --quick in a fresh process with `env` added (once per setting)."""
    return dict(_outputs(tuple(sorted(env.items()))))


@functools.cache
def _outputs(env: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    drop = ("XLA_FLAGS", "_JPR_PINNED_FLAGS", "ONEDNN_MAX_CPU_ISA")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    proc = subprocess.run(
        [sys.executable, CPU_OUTPUTS, "--quick"], cwd=REPO_ROOT, env={**base, **dict(env)},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(json.loads(proc.stdout).items())


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


SHARD_MAP_KEYS = "snippets/pitfalls/shard_map_keys.py"
LOADER_WORKERS = "snippets/pitfalls/loader_workers.py"


def run_snippet(path: str) -> str:
    """What `python path` prints, run once per test run with the page's block (shared)."""
    proc = shared_runs.run_once([sys.executable, path], cwd=REPO_ROOT,
                                env=shared_runs.terminal_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def test_a_replicated_key_gives_every_shard_the_same_draws():
    lines = run_snippet(SHARD_MAP_KEYS).splitlines()
    assert lines[0] == "devices: 2, one shard of 8 draws each"
    shards = {line.split(":")[0]: line.split(":", 1)[1].split("|") for line in lines[1:4]}
    same, folded, whole = shards.values()
    assert same[0].strip() == same[1].strip()
    assert folded[0].strip() != folded[1].strip()
    assert whole[0].strip() != whole[1].strip()
    assert lines[4].endswith("True")


def test_only_a_seed_per_record_survives_loader_workers():
    out = dict(line.split(":", 1) for line in run_snippet(LOADER_WORKERS).splitlines())
    assert out["global state, 0 workers, twice equal"].strip() == "True"
    assert out["global state, 2 workers, twice equal"].strip() == "False"
    assert out["seed per record, 0 vs 2 workers equal"].strip() == "True"
    first, second = out["forked workers' draws"].split(" and ")
    assert first.strip() == second.strip()


SAMPLERS = "snippets/pitfalls/samplers.py"


def test_samplers_saves_the_draws_of_each(tmp_path):
    """The script's mechanics, on 10,000 draws (the page runs the million, twice)."""
    import numpy as np

    out = tmp_path / "draws.npz"
    proc = subprocess.run(
        [sys.executable, SAMPLERS, str(out), "10000"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"10 samplers, saved to {out}\n"
    draws = dict(np.load(out))
    assert draws["uniform [0, 1)"].shape == (10_000,)
    assert draws["categorical(100 logits)"].shape == (1_000,)
    assert draws["uniform [0, 1)"].min() >= 0 and draws["uniform [0, 1)"].max() < 1
    assert draws["categorical(100 logits)"].max() < 100
