"""The pinned CPU code-generation target (jpr.platform): pinning, records, compare, launch.

Subprocesses are real: XLA reads XLA_FLAGS once, when the backend starts, so
every target under test gets a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jpr import platform
from jpr.errors import JprError
from jpr.launch import free_port

HOST = platform.host_isa()
ABOVE_AVX = platform._arch() == "x86_64" and HOST in ("AVX2+FMA", "AVX512")
needs_fma_host = pytest.mark.skipif(
    not ABOVE_AVX, reason=f"needs an x86-64 host with AVX2+FMA (this one: {HOST})"
)


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without the pin it inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "_JPR_PINNED_FLAGS")}
    return {**env, **extra}


def python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("cpuinfo", "isa"),
    [
        ("flags : fpu sse2 sse4_2 avx avx2 fma avx512f avx512bw\n", "AVX512"),
        ("flags : fpu sse2 sse4_2 avx avx2 fma\n", "AVX2+FMA"),
        ("flags : fpu sse2 sse4_2 avx\n", "AVX"),
        ("flags : fpu sse2\n", "SSE2"),
        ("Features : fp asimd evtstrm aes\n", "NEON"),
        ("Features : fp asimd sve sve2\n", "SVE2"),
        ("", "unknown"),
    ],
)
def test_host_isa_reads_the_first_flags_line(cpuinfo, isa):
    assert platform.host_isa(cpuinfo) == isa


def test_pin_adds_the_reference_flag_once_and_says_it_is_jprs():
    env: dict[str, str] = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    first = platform.pin_cpu_target(env)
    again = platform.pin_cpu_target(env)
    if platform._arch() != "x86_64":
        assert first.source == "native"
        return
    assert env["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX2"
    )
    assert (first, again) == (again, first) and first.source == "jpr"
    assert first.max_isa == "AVX2"


def test_a_users_own_target_wins_and_is_recorded_as_theirs():
    env = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX"}
    target = platform.pin_cpu_target(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_max_isa=AVX"
    assert (target.max_isa, target.source, target.is_reference) == ("AVX", "user", False)


def test_native_turns_the_pin_off_even_when_a_parent_pinned():
    env: dict[str, str] = {}
    platform.pin_cpu_target(env)  # a parent process pinned ...
    env["JPR_CPU_TARGET"] = "native"  # ... and its child asks for the host's own target
    target = platform.pin_cpu_target(env)
    assert "xla_cpu_max_isa" not in env["XLA_FLAGS"]
    assert (target.max_isa, target.source, target.is_reference) == (None, "native", False)


def test_a_bad_setting_is_one_clear_error():
    with pytest.raises(JprError, match="JPR_CPU_TARGET='avx9'"):
        platform.pin_cpu_target({"JPR_CPU_TARGET": "avx9"})


@pytest.mark.parametrize(
    ("host", "cap", "effective", "reference"),
    [
        ("AVX512", "AVX2", "AVX2", False),  # kernels go past the cap there (measured)
        ("AVX2+FMA", "AVX2", "AVX2", True),
        ("AVX", "AVX2", "AVX", False),  # a host below the cap cannot reach it
        ("AVX512", None, "AVX512", False),
    ],
)
def test_the_effective_target_is_the_lower_of_host_and_cap(host, cap, effective, reference):
    t = platform.CpuTarget("x86_64", host, cap, "jpr", "")
    assert (t.effective, t.is_reference) == (effective, reference)


def test_pinning_after_the_backend_started_is_refused():
    code = (
        "import jax; jax.numpy.zeros(1).block_until_ready()\n"
        "from jpr.platform import pin_cpu_target\n"
        "try:\n    pin_cpu_target()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = python(code, clean_env()).stdout
    if platform._arch() != "x86_64":
        pytest.skip("nothing to pin on this architecture")
    assert out.startswith("JprError the JAX backend already started without jpr's CPU target")


PROBE = "from jpr.platform import pin_cpu_target, probe; pin_cpu_target(); print(probe())"


@needs_fma_host
def test_the_pin_is_the_target_xla_really_uses():
    pinned = python(PROBE, clean_env()).stdout.strip()
    explicit = python(PROBE, clean_env(XLA_FLAGS="--xla_cpu_max_isa=AVX2")).stdout.strip()
    no_fma = python(PROBE, clean_env(XLA_FLAGS="--xla_cpu_max_isa=AVX")).stdout.strip()
    assert len(pinned) == 16
    assert pinned == explicit  # the pin is exactly --xla_cpu_max_isa=AVX2
    assert pinned != no_fma  # and the probe sees code generation move


def _record(cli, name: str, env: dict[str, str]) -> dict:
    proc = cli("jpr", "run", "--steps", "5", "--out", f"{name}.json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads((cli.cwd / f"{name}.json").read_text())


@pytest.mark.slow
@needs_fma_host
def test_records_name_their_target_and_compare_says_so_first(cli):
    pinned = _record(cli, "pinned", clean_env())
    lower = _record(cli, "lower", clean_env(XLA_FLAGS="--xla_cpu_max_isa=AVX"))
    ta, tb = pinned["env"]["cpu_target"], lower["env"]["cpu_target"]
    # an AVX-512 host is not the reference even pinned (docs/pitfalls.md #15)
    assert (ta["effective"], ta["source"], ta["reference"]) == ("AVX2", "jpr", HOST == "AVX2+FMA")
    assert (tb["effective"], tb["source"], tb["reference"]) == ("AVX", "user", False)
    proc = cli("jpr", "compare", "pinned.json", "lower.json")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("different CPU code generation: x86_64 AVX2 (pinned by jpr")
    assert "vs x86_64 AVX (set in XLA_FLAGS" in lines[0]
    assert lines[1].startswith("❌ MISMATCH")


def test_doctor_lists_an_unpinned_target_as_a_risk(cli):
    proc = cli("jpr", "doctor", "--json", env=clean_env(JPR_CPU_TARGET="native"))
    risks = json.loads(proc.stdout)["risks"]
    assert any(r.startswith("CPU target not pinned") for r in risks), risks


@pytest.mark.slow
def test_processes_with_different_targets_refuse_to_start(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jpr.run_repro", "--steps", "2",
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i, env in enumerate([clean_env(), clean_env(XLA_FLAGS="--xla_cpu_max_isa=SSE4_2")])
    ]
    results = [p.communicate(timeout=240) for p in procs]
    if not ABOVE_AVX:
        pytest.skip(f"the two targets are the same code on this host ({HOST})")
    assert [p.returncode for p in procs] == [2, 2]
    err = results[0][1].strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("jpr run: error: the processes generate different CPU code")
    assert "process 0: x86_64 AVX2" in err[0] and "process 1: x86_64 SSE4_2" in err[0]
