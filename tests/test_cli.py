"""End to end: the original README's commands, the ``jpr`` command, verify_setup.py.

The Quick Start and Basic Usage commands of the original product run here as
written, in real processes, in a fresh folder. Everything else that does not
need a real process runs in-process through ``jpr.cli.main``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pty
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from expected_risks import assert_default_risks, risks_in_text

from jpr import cli
from jpr.compare import MATCH_LINE
from jpr.record import read_record

REPO = Path(__file__).resolve().parents[1]

# The original README, section "Basic Usage", verbatim (line continuations joined).
SAME_SEED = [
    "python -m jpr.run_repro --steps 50 --batch-size 64 --seed 0 --out runs/test1.json",
    "python -m jpr.run_repro --steps 50 --batch-size 64 --seed 0 --out runs/test2.json",
]
SAME_SEED_COMPARE = "python -m jpr.compare runs/test1.json runs/test2.json"
FULL = "python -m jpr.run_repro --steps 60 --batch-size 64 --seed 123 --out runs/full.json"
PHASE1 = (
    "python -m jpr.run_repro --steps 40 --batch-size 64 --seed 123 "
    "--checkpoint-dir checkpoints/demo --save-at 40 --out runs/phase1.json"
)
RESUMED = (
    "python -m jpr.run_repro --steps 60 --batch-size 64 --seed 123 "
    "--checkpoint-dir checkpoints/demo --restore-from 40 --out runs/resumed.json"
)
RESUME_COMPARE = "python -m jpr.compare runs/full.json runs/resumed.json"


def argv(command: str) -> list[str]:
    """A README command line as an argv for this interpreter."""
    words = shlex.split(command)
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    if words[0] == "jpr":
        return [console_script(), *words[1:]]
    raise ValueError(command)


def console_script() -> str:
    found = shutil.which("jpr", path=str(Path(sys.executable).parent))
    assert found, "the jpr console script is not installed next to this Python"
    return found


def start(command: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        argv(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return finish(start(command, cwd))


def sh_on_terminal(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run with stderr on a pseudo-terminal; ``stderr`` is what the terminal showed."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs, so a full terminal buffer never blocks it
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    try:
        p = subprocess.Popen(argv(command), cwd=cwd, stdout=subprocess.PIPE, stderr=slave,
                             text=True)
        os.close(slave)
        reader.start()
        out, _ = p.communicate(timeout=300)
        reader.join(timeout=60)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(p.args, p.returncode, out, b"".join(chunks).decode())


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Run the README's commands in a fresh folder; independent ones side by side."""
    cwd = tmp_path_factory.mktemp("readme")
    procs = {c: start(c, cwd) for c in [PHASE1, *SAME_SEED, FULL]}
    results = {PHASE1: finish(procs.pop(PHASE1))}
    # RESUMED needs PHASE1's checkpoint. Its stderr is a terminal, as when a person types it.
    resumed = threading.Thread(
        target=lambda: results.__setitem__(RESUMED, sh_on_terminal(RESUMED, cwd))
    )
    resumed.start()
    results.update({c: finish(p) for c, p in procs.items()})
    results[SAME_SEED_COMPARE] = sh(SAME_SEED_COMPARE, cwd)
    resumed.join()
    results[RESUME_COMPARE] = sh(RESUME_COMPARE, cwd)
    return cwd, results


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------- README, Basic Usage 1


def test_same_seed_runs_match(readme):
    cwd, results = readme
    for c in SAME_SEED:
        out = ok(results[c])
        assert re.search(r"^hash       [0-9a-f]{64}$", out, re.M)
    # Output: ✅ MATCH: hashes (and metrics if requested) are equal.
    assert ok(results[SAME_SEED_COMPARE]) == MATCH_LINE + "\n"
    a, b = read_record(cwd / "runs/test1.json"), read_record(cwd / "runs/test2.json")
    assert (a["hash"], a["state_hash"]) == (b["hash"], b["state_hash"])
    assert a["trajectory"] == b["trajectory"] and a["final"] == b["final"]


def test_seed_record_keys(readme):
    cwd, _ = readme
    rec = read_record(cwd / "runs/test1.json")
    assert (rec["steps"], rec["batch_size"], rec["seed"]) == (50, 64, 0)
    assert {"hash", "lr", "backend"} <= set(rec) and {"loss", "acc"} <= set(rec["final"])


def test_runs_are_quiet_on_stderr_when_piped(readme):
    _, results = readme
    for c in [*SAME_SEED, FULL, PHASE1]:
        assert results[c].stderr == "", (c, results[c].stderr)


def test_progress_on_a_terminal(readme):
    """With stderr on a terminal, a run shows progress without being asked."""
    _, results = readme
    shown = results[RESUMED].stderr
    assert "step 60/60 loss " in shown
    assert "step 40/60" not in shown  # it resumed after step 40
    assert "step 60/60 loss" not in results[RESUMED].stdout  # never mixed into the results


# ---------------------------------------------------------------- README, Basic Usage 2


def test_resumed_run_matches_the_uninterrupted_run(readme):
    cwd, results = readme
    assert "saved step 40 to checkpoints/demo" in ok(results[PHASE1])
    assert re.search(
        r"^restored step 40 from checkpoints/demo \(state_hash [0-9a-f]{16} verified\)$",
        ok(results[RESUMED]), re.M,
    )
    # Output: ✅ MATCH: hashes (and metrics if requested) are equal.
    assert ok(results[RESUME_COMPARE]) == MATCH_LINE + "\n"
    full, resumed = read_record(cwd / "runs/full.json"), read_record(cwd / "runs/resumed.json")
    assert (full["hash"], full["state_hash"]) == (resumed["hash"], resumed["state_hash"])
    assert full["trajectory"] == resumed["trajectory"]
    phase1 = read_record(cwd / "runs/phase1.json")
    assert phase1["hash"] != full["hash"]  # 40 steps are not 60 steps
    assert phase1["hash"] == full["trajectory"][40]["params_hash"]


def test_compare_check_metrics_as_in_the_readme(readme):
    cwd, _ = readme
    r = sh("python -m jpr.compare runs/full.json runs/resumed.json --check-metrics", cwd)
    assert ok(r) == MATCH_LINE + "\n"


def test_resume_from_latest_after_save_every(readme, tmp_path, capsys):
    cwd, _ = readme
    ck = str(tmp_path / "ck")
    assert cli.main(["run", "--steps", "35", "--seed", "123", "--checkpoint-dir", ck,
                     "--save-every", "10", "--out", str(tmp_path / "part.json")]) == 0
    out = capsys.readouterr().out
    assert [int(s) for s in re.findall(r"^saved step (\d+)", out, re.M)] == [10, 20, 30]
    assert cli.main(["run", "--steps", "60", "--seed", "123", "--checkpoint-dir", ck,
                     "--restore-from", "latest", "--out", str(tmp_path / "resumed.json")]) == 0
    assert "restored step 30 from" in capsys.readouterr().out
    assert cli.main(["compare", str(cwd / "runs/full.json"), str(tmp_path / "resumed.json"),
                     "--check-metrics"]) == 0
    assert capsys.readouterr().out == MATCH_LINE + "\n"


def test_different_seed_differs(readme, tmp_path, capsys):
    cwd, _ = readme
    assert cli.main(["run", "--steps", "50", "--batch-size", "64", "--seed", "1",
                     "--out", str(tmp_path / "seed1.json")]) == 0
    capsys.readouterr()
    a, b = read_record(cwd / "runs/test1.json"), read_record(tmp_path / "seed1.json")
    assert a["hash"] != b["hash"] and a["state_hash"] != b["state_hash"]
    assert cli.main(["compare", str(cwd / "runs/test1.json"), str(tmp_path / "seed1.json")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("❌ MISMATCH: hash ")
    # Biases start at zero whatever the seed: the kernels differ from step 0.
    assert "first divergence: step 0 in params/fc1/kernel, params/fc2/kernel" in out.splitlines()
    assert "config differs: seed: 0 -> 1" in out


def test_jpr_run_is_the_same_as_run_repro(readme, tmp_path, capsys):
    cwd, _ = readme
    assert cli.main(["run", "--steps", "50", "--batch-size", "64", "--seed", "0",
                     "--out", str(tmp_path / "j.json")]) == 0
    capsys.readouterr()
    a, b = read_record(cwd / "runs/test1.json"), read_record(tmp_path / "j.json")
    assert (a["hash"], a["state_hash"]) == (b["hash"], b["state_hash"])


# ---------------------------------------------------------------- the jpr command


def test_console_script_help():
    r = subprocess.run([console_script(), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: jpr ")
    for command in ("run", "compare", "doctor"):
        assert re.search(rf"^\s+{command}\s", r.stdout, re.M), command


@pytest.mark.parametrize("command", ["run", "compare", "doctor"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: jpr {command}")


def test_version(capsys):
    from jpr import __version__

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"jpr {__version__}\n"


def test_doctor(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^backend\s+cpu$", out, re.M)
    assert re.search(r"^jax\s+\d+\.\d+\.\d+", out, re.M)
    assert re.search(r"^jax_threefry_partitionable\s+True$", out, re.M)
    assert_default_risks(risks_in_text(out))


def test_doctor_json(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"env", "risks"}
    assert d["env"]["backend"] == "cpu"
    assert_default_risks(d["risks"])
    import jax

    # A risky setting shows up (and is switched back at once).
    jax.config.update("jax_enable_x64", True)
    try:
        assert cli.main(["doctor", "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["env"]["jax_enable_x64"] is True
        assert any("jax_enable_x64 is on" in r for r in d["risks"])
        assert cli.main(["doctor"]) == 0
        assert "determinism risks:\n  - jax_enable_x64 is on" in capsys.readouterr().out
    finally:
        jax.config.update("jax_enable_x64", False)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "prog", "message"),
    [
        ([], "jpr", "the following arguments are required: COMMAND"),
        (["frobnicate"], "jpr frobnicate", "invalid choice: 'frobnicate'"),
        (["run", "--bogus"], "jpr run", "unrecognized arguments: --bogus"),
        (["run", "--steps", "-3"], "jpr run", "--steps must be at least 1, got -3"),
        (["run", "--seed", "x"], "jpr run", "argument --seed: invalid int value: 'x'"),
        (["compare", "a.json"], "jpr compare", "the following arguments are required: b"),
        (["compare", "a.json", "b.json"], "jpr compare", "a.json: no such file"),
        (["doctor", "--bogus"], "jpr doctor", "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_in_process(args, prog, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("python -m jpr.run_repro --steps abc", "jpr run: error: argument --steps: invalid int"),
        ("python -m jpr.compare runs/a.json runs/b.json", "jpr compare: error: runs/a.json: no"),
        ("jpr run --batch-size 0", "jpr run: error: batch_size must be positive, got 0"),
        ("jpr", "jpr: error: the following arguments are required: COMMAND"),
    ],
)
def test_bad_input_in_a_real_process(command, message, tmp_path):
    r = sh(command, tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(message), r.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- progress


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_flags(capsys, monkeypatch):
    assert cli.main(["run", "--steps", "3", "--progress"]) == 0
    assert "\rstep 3/3 loss " in capsys.readouterr().err  # forced while piped
    monkeypatch.setattr(sys, "stderr", _FakeTerminal())
    assert cli.main(["run", "--steps", "3", "--no-progress"]) == 0
    assert sys.stderr.getvalue() == ""  # switched off on a terminal
    assert cli.main(["run", "--steps", "3"]) == 0
    assert "step 3/3" in sys.stderr.getvalue()


# ---------------------------------------------------------------- verify_setup.py


def load_verify_setup():
    spec = importlib.util.spec_from_file_location("verify_setup", REPO / "verify_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verify_setup_passes(tmp_path, capsys, monkeypatch):
    """``python verify_setup.py`` (its main(), in-process: a process costs a JAX import)."""
    vs = load_verify_setup()
    monkeypatch.chdir(tmp_path)
    assert vs.main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "OK: jpr is set up and two runs gave the same bits (cpu)."
    assert not any(line.startswith("FAILED") for line in lines)
    assert list(tmp_path.iterdir()) == []  # it writes nothing


def test_verify_setup_checks_the_pins_of_pyproject():
    vs = load_verify_setup()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = vs.pinned_versions()
    assert pins == vs.parse_pins(deps)
    assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"} <= set(pins)
    assert vs.version_problems(pins) == []  # this environment is the pinned one
    wrong = {**pins, "numpy": "0.0.1"}
    assert vs.version_problems(wrong) == [f"numpy {pins['numpy']} is installed but jpr pins 0.0.1"]
    assert vs.version_problems({"no-such-dist-jpr": "1.0"}) == [
        "no-such-dist-jpr is not installed (jpr pins 1.0)"
    ]
    assert vs.import_problems(("json", "no_such_module_jpr"))[0].startswith(
        "cannot import no_such_module_jpr: ModuleNotFoundError"
    )
