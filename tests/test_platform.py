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


PIN_VARS = ("XLA_FLAGS", "_JPR_PINNED_FLAGS", "ONEDNN_MAX_CPU_ISA")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without the pin it inherited."""
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}
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


def test_pin_adds_every_setting_once_and_says_they_are_jprs():
    env: dict[str, str] = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    first = platform.pin_cpu_target(env)
    again = platform.pin_cpu_target(env)
    pin = platform.PIN[platform._arch()]
    flags = [s.word for s in pin if s.is_flag]
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *flags]
    for s in pin:
        if not s.is_flag:
            assert env[s.name] == s.value
    assert first == again and first.source == "jpr" and first.user == ()
    assert first.settings == {s.name: s.value for s in pin}
    if platform._arch() == "x86_64":
        assert first.max_isa == "AVX2"
        assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        assert first.is_reference == (HOST in ("AVX2+FMA", "AVX512"))


@pytest.mark.parametrize("setting", [s.name for s in platform.PIN.get(platform._arch(), ())])
def test_a_users_own_value_of_any_setting_wins_and_is_recorded_as_theirs(setting):
    mine = "AVX" if "isa" in setting.lower() else "true"
    env = ({"XLA_FLAGS": f"{setting}={mine}"} if setting.startswith("--")
           else {setting: mine})
    target = platform.pin_cpu_target(env)
    assert target.settings[setting] == mine
    assert (target.source, target.user, target.is_reference) == ("user", (setting,), False)
    others = [s for s in platform.PIN[platform._arch()] if s.name != setting]
    assert all(target.settings[s.name] == s.value for s in others)  # the rest still pinned


def test_native_turns_the_whole_pin_off_even_when_a_parent_pinned():
    env: dict[str, str] = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    platform.pin_cpu_target(env)  # a parent process pinned ...
    child = {**env, "JPR_CPU_TARGET": "native"}  # ... and its child asks for the host's own
    target = platform.pin_cpu_target(child)
    assert child["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert "ONEDNN_MAX_CPU_ISA" not in child and "_JPR_PINNED_FLAGS" not in child
    assert (target.max_isa, target.source, target.is_reference) == (None, "native", False)
    assert set(target.settings.values()) <= {None}


def test_native_in_a_child_of_a_pinned_process_takes_out_every_setting():
    code = (
        "import os, subprocess, sys\n"
        "from jpr.platform import pin_cpu_target\n"
        "pin_cpu_target()\n"
        "child = ('import os; from jpr.platform import pin_cpu_target; t = pin_cpu_target(); '\n"
        "         'print(t.source, os.environ.get(\"ONEDNN_MAX_CPU_ISA\"), '\n"
        "         'os.environ.get(\"XLA_FLAGS\"))')\n"
        "env = {**os.environ, 'JPR_CPU_TARGET': 'native'}\n"
        "print(subprocess.run([sys.executable, '-c', child], env=env, capture_output=True,\n"
        "                     text=True, check=True).stdout.strip())\n"
    )
    proc = python(code, clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["native", "None", "--xla_force_host_platform_device_count=2"]


def test_a_childs_own_value_is_its_own_even_under_a_pinned_parent():
    env: dict[str, str] = {}
    platform.pin_cpu_target(env)  # the parent pinned; its child replaces one setting
    child = {**env, "XLA_FLAGS": "--xla_cpu_max_isa=AVX"}
    target = platform.pin_cpu_target(child)
    if platform._arch() == "x86_64":
        assert (target.source, target.user) == ("user", ("--xla_cpu_max_isa",))


def test_native_keeps_a_users_own_settings():
    env = {"JPR_CPU_TARGET": "native", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    target = platform.pin_cpu_target(env)
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    if "ONEDNN_MAX_CPU_ISA" in target.settings:
        assert target.source == "user"


def test_a_bad_setting_is_one_clear_error():
    with pytest.raises(JprError, match="JPR_CPU_TARGET='avx9'"):
        platform.pin_cpu_target({"JPR_CPU_TARGET": "avx9"})


X86_PIN = {s.name: s.value for s in platform.PIN["x86_64"]}


@pytest.mark.parametrize(
    ("host", "cap", "effective", "reference"),
    [
        ("AVX512", "AVX2", "AVX2", True),  # the whole pin brings every kernel to AVX2
        ("AVX2+FMA", "AVX2", "AVX2", True),
        ("AVX", "AVX2", "AVX", False),  # a host below the cap cannot reach it
        ("AVX512", None, "AVX512", False),
    ],
)
def test_the_effective_target_is_the_lower_of_host_and_cap(host, cap, effective, reference):
    settings = {**X86_PIN, "--xla_cpu_max_isa": cap}
    t = platform.CpuTarget("x86_64", host, cap, "jpr", "", settings)
    assert (t.effective, t.is_reference) == (effective, reference)


@pytest.mark.parametrize("missing", list(X86_PIN))
def test_the_reference_needs_every_setting(missing):
    settings = {**X86_PIN, missing: None}
    t = platform.CpuTarget("x86_64", "AVX512", settings["--xla_cpu_max_isa"], "user", "",
                           settings)
    assert not t.is_reference


def test_pinning_after_the_backend_started_is_refused():
    code = (
        "import jax; jax.numpy.zeros(1).block_until_ready()\n"
        "from jpr.platform import pin_cpu_target\n"
        "try:\n    pin_cpu_target()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = python(code, clean_env()).stdout
    assert out.startswith("JprError the JAX backend already started without jpr's CPU target")


PROBE = "from jpr.platform import pin_cpu_target, probe; pin_cpu_target(); print(probe())"


FAMILIES = (
    "from jpr.platform import pin_cpu_target, probe_families; pin_cpu_target(); "
    "import json; print(json.dumps(probe_families()))"
)


def _families(**env: str) -> dict[str, str]:
    proc = python(FAMILIES, clean_env(**env))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_fma_host
def test_the_probe_sees_each_setting_of_the_pin():
    pinned = _families()
    explicit = _families(XLA_FLAGS=" ".join(platform.reference_flags()),
                         ONEDNN_MAX_CPU_ISA="AVX2")
    no_fma = _families(XLA_FLAGS="--xla_cpu_max_isa=AVX")
    assert pinned == explicit  # the pin is exactly these settings
    assert pinned["fma"] != no_fma["fma"]  # XLA's own code generation moves
    # a weight gradient left to the library follows oneDNN's own cap (on an AVX-512
    # host), the same product rewritten by jpr.portable does not
    if HOST == "AVX512":
        wide = _families(ONEDNN_MAX_CPU_ISA="AVX512_CORE")
        assert wide["dot_library"] != pinned["dot_library"]
        assert wide["dot_portable"] == pinned["dot_portable"]
        assert wide["conv_library"] != pinned["conv_library"]  # convolutions too
        assert wide["conv_portable"] == pinned["conv_portable"]
    # and YNNPACK's reduce kernels are another family than XLA's loops
    ynn_reduce = _families(XLA_FLAGS=" ".join(
        f for f in platform.reference_flags() if "ynn_fusion_type" not in f
    ) + " --xla_cpu_experimental_ynn_fusion_type=+reduce")
    assert ynn_reduce["reduce"] != pinned["reduce"]


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
    # AVX2 and AVX-512 hosts are both the reference under the whole pin
    assert (ta["effective"], ta["source"], ta["reference"]) == ("AVX2", "jpr", True)
    assert ta["settings"] == X86_PIN and ta["user"] == []
    assert (tb["effective"], tb["source"], tb["reference"]) == ("AVX", "user", False)
    assert tb["user"] == ["--xla_cpu_max_isa"]
    proc = cli("jpr", "compare", "pinned.json", "lower.json")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("different CPU code generation: x86_64 AVX2 (pinned by jpr")
    assert "vs x86_64 AVX (set by you" in lines[0]
    assert lines[1].startswith("❌ MISMATCH")


def test_doctor_lists_an_unpinned_target_as_a_risk(cli):
    proc = cli("jpr", "doctor", "--json", env=clean_env(JPR_CPU_TARGET="native"))
    risks = json.loads(proc.stdout)["risks"]
    assert any(r.startswith("CPU target ") and "the pin is off (JPR_CPU_TARGET=native)" in r
               for r in risks), risks


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
