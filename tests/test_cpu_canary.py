"""The CPU canary on three CPU kinds: this host, an emulated AVX2 CPU, emulated arm64.

``scripts/cpu_canary.py --check scripts/cpu_canary.json`` pins the target,
trains the home page's 10 steps and ``jpr run --steps 5`` and fingerprints
every kernel family; the training values must equal the recorded ones on
every CPU, and so must the probe of the kernel families a portable step
reaches (the families left to a runtime library are recorded per CPU only). Emulation is
about 25 times slower than the host, so these are in the slow tier (the
emulated ones are also marked ``emulated``: ``pytest -m "slow and not emulated"``
leaves them out);
``scripts/emulated_canaries.sh setup`` installs qemu and builds the arm64 root
they need (``.ci/run`` does it, so CI runs all three). The arm64 one is in
``test_cpu_canary_arm64.py``, so that pytest-xdist runs the two emulations on
two workers at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jpr import platform

REPO = Path(__file__).resolve().parents[1]
RECORDED = json.loads((REPO / "scripts" / "cpu_canary.json").read_text(encoding="utf-8"))
ARM64_ROOT = Path(os.environ.get("JPR_ARM64_ROOT", Path.home() / ".cache/jpr/arm64-root"))


def _clean_env() -> dict[str, str]:
    # the canary compiles every program itself: no pin and no compilation cache inherited
    drop = ("XLA_FLAGS", "_JPR_PINNED_FLAGS", "ONEDNN_MAX_CPU_ISA", "JPR_CPU_TARGET",
            "JAX_COMPILATION_CACHE_DIR")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _missing(cpu: str) -> str | None:
    if os.geteuid() != 0 and cpu == "arm64":
        return "the arm64 root needs root (chroot)"
    if cpu == "haswell" and shutil.which("qemu-x86_64") is None:
        return "qemu-x86_64 is not installed"
    if cpu == "arm64" and not (ARM64_ROOT / "opt/venv/bin/python").exists():
        return f"no arm64 root at {ARM64_ROOT}"
    return None


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env={**_clean_env(), "JPR_COMPILATION_CACHE": "0"},
                          capture_output=True, text=True,
                          timeout=timeout, check=False)


def _assert_canary(proc: subprocess.CompletedProcess, where: str) -> dict:
    # the verdict is on stderr ("cpu canary (TARGET): ..."); under qemu the script
    # merges the streams to filter qemu's warnings
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    verdict = [line for line in lines if line.startswith("cpu canary (")]
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0 and verdict, f"{where}:\n{tail}"
    assert verdict[-1].endswith("every value equals the recorded one"), verdict
    got = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    assert got["home"] == RECORDED["training"]["home"]  # the check itself, once more
    assert got["probe"] == RECORDED["probe"]
    return got


def test_the_record_was_measured_on_three_cpu_kinds():
    assert set(RECORDED["training"]) == {"home", "home_steps", "run5"}
    assert set(RECORDED["families"]) == set(platform.PORTABLE_FAMILIES)
    cpus = " | ".join(RECORDED["library"])
    assert "AVX-512" in cpus and "Haswell" in cpus and "arm64" in cpus, cpus


@pytest.mark.slow
def test_this_cpu_prints_the_recorded_values():
    if platform._arch() == "x86_64" and platform.host_isa() not in ("AVX2+FMA", "AVX512"):
        pytest.skip(f"this CPU ({platform.host_isa()}) is below the reference target")
    _assert_canary(_run([sys.executable, "scripts/cpu_canary.py", "--check",
                         "scripts/cpu_canary.json"], timeout=600), "this host")


def emulated_canary(cpu: str) -> dict:
    """The canary under emulation (``haswell`` or ``arm64``), checked."""
    missing = _missing(cpu)
    if missing and os.environ.get("CI"):
        pytest.fail(f"{missing}: .ci/run must run scripts/emulated_canaries.sh setup first")
    if missing:
        pytest.skip(f"{missing}: run scripts/emulated_canaries.sh setup (as root)")
    return _assert_canary(_run(["bash", "scripts/emulated_canaries.sh", cpu], timeout=1500),
                          cpu)


@pytest.mark.slow
@pytest.mark.emulated  # also slow: `-m "slow and not emulated"` leaves the emulations out
def test_an_emulated_avx2_cpu_prints_the_recorded_values():
    got = emulated_canary("haswell")
    assert got["target"]["arch"] == "x86_64"  # qemu shows the host's /proc/cpuinfo
