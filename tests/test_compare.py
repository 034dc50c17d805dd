"""``jpr compare``: exit codes, where two runs first diverge, and no JAX import."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jpr import compare, run_repro
from jpr.compare import MATCH_LINE, compare_records, format_result, ulp_distance
from jpr.record import SCHEMA, write_json_atomic

LEAVES = ("fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel")


def entry(step: int, *, loss: float | None, tag: str = "", changed: tuple[str, ...] = ()):
    leaves = {k: f"{k}@{step}{tag if k in changed else ''}" for k in LEAVES}
    return {
        "step": step,
        "loss": None if loss is None else float(np.float32(loss)).hex(),
        "params_hash": "|".join(leaves.values()),
        "leaves": leaves,
    }


def record(*, diverge_at: int | None = None, steps: int = 6, every: int = 1, **extra) -> dict:
    """A well-formed record whose trajectory changes fc1/kernel from ``diverge_at`` on."""
    traj = []
    for s in range(0, steps + 1, every):
        changed = ("fc1/kernel",) if diverge_at is not None and s >= diverge_at else ()
        traj.append(entry(s, loss=None if s == 0 else 1.0 / s, tag="*", changed=changed))
    final_hash = traj[-1]["params_hash"]
    rec = {
        "schema": SCHEMA,
        "hash": final_hash,
        "state_hash": "state:" + final_hash,
        "steps": steps,
        "final": {"loss": 0.5, "acc": 0.75},
        "trajectory": traj,
        "config": {"seed": 0, "lr": 0.001},
        "env": {"jax": "0.10.2", "backend": "cpu"},
        "leaf_hashes": {f"params/{k}": v for k, v in traj[-1]["leaves"].items()},
    }
    rec.update(extra)
    return rec


def write(tmp_path, name, rec) -> str:
    return str(write_json_atomic(tmp_path / name, rec))


def run_main(capsys, *argv):
    code = compare.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- programmatic records


def test_identical_records_match_with_exit_0(tmp_path, capsys):
    a, b = write(tmp_path, "a.json", record()), write(tmp_path, "b.json", record())
    code, out, err = run_main(capsys, a, b)
    assert (code, out, err) == (0, MATCH_LINE + "\n", "")


def test_mismatch_exit_1_names_step_and_leaf(tmp_path, capsys):
    a = write(tmp_path, "a.json", record())
    b = write(tmp_path, "b.json", record(diverge_at=3))
    code, out, err = run_main(capsys, a, b)
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("❌ MISMATCH: hash ")
    assert "state_hash differs" in lines[0]
    assert "first divergence: step 3 in params/fc1/kernel; train loss 0 ULP apart" in lines
    assert "final state: 1 of 4 leaves differ: params/fc1/kernel" in lines


def test_divergence_between_traced_steps(tmp_path, capsys):
    a = write(tmp_path, "a.json", record(every=2))
    b = write(tmp_path, "b.json", record(diverge_at=3, every=2))
    code, out, _ = run_main(capsys, a, b)
    assert code == 1
    assert "first divergence: between step 2 and step 4 in params/fc1/kernel" in out


def test_divergence_at_step_zero(tmp_path, capsys):
    a = write(tmp_path, "a.json", record())
    b = write(tmp_path, "b.json", record(diverge_at=0))
    code, out, _ = run_main(capsys, a, b)
    assert code == 1
    assert "first divergence: step 0 in params/fc1/kernel" in out


def test_loss_ulps_are_reported():
    a, b = record(), record()
    one_up = np.nextafter(np.float32(1.0 / 3), np.float32(1), dtype=np.float32)
    three_up = one_up
    for _ in range(2):
        three_up = np.nextafter(three_up, np.float32(1), dtype=np.float32)
    b["trajectory"][3]["loss"] = float(three_up).hex()
    b["hash"] = "other"
    r = compare_records(a, b)
    assert r["first_divergence"]["step"] == 3
    assert r["first_divergence"]["leaves"] == []
    assert r["first_divergence"]["loss_ulps"] == 3
    assert "train loss 3 ULP apart" in format_result(r)


def test_divergence_outside_the_trajectory():
    a, b = record(), record(hash="different")
    text = format_result(compare_records(a, b))
    assert "first divergence: not in the recorded trajectories" in text


def test_check_metrics(tmp_path, capsys):
    a = write(tmp_path, "a.json", record())
    b = write(tmp_path, "b.json", record(final={"loss": 0.5000001, "acc": 0.75}))
    assert run_main(capsys, a, b)[0] == 0
    code, out, _ = run_main(capsys, a, b, "--check-metrics")
    assert code == 1
    assert "metrics differ (loss 0.5 vs 0.5000001)" in out
    c = write(tmp_path, "c.json", record())
    code, out, _ = run_main(capsys, a, c, "--check-metrics")
    assert (code, out) == (0, MATCH_LINE + "\n")


def test_json_output(tmp_path, capsys):
    a = write(tmp_path, "a.json", record())
    b = write(tmp_path, "b.json", record(diverge_at=2, config={"seed": 1, "lr": 0.001}))
    code, out, _ = run_main(capsys, a, b, "--json")
    assert code == 1
    r = json.loads(out)
    assert r["match"] is False and r["hash_equal"] is False
    assert r["first_divergence"]["step"] == 2
    assert r["first_divergence"]["last_equal_step"] == 1
    assert r["first_divergence"]["leaves"] == ["params/fc1/kernel"]
    assert r["leaves_differ"] == ["params/fc1/kernel"]
    assert r["config_diff"] == ["seed: 0 -> 1"]
    code, out, _ = run_main(capsys, a, a.replace("a.json", "b.json"), "--json", "--check-metrics")
    assert json.loads(out)["metrics_checked"] is True


def test_environment_differences_are_reported(tmp_path, capsys):
    a = write(tmp_path, "a.json", record())
    b = write(tmp_path, "b.json", record(env={"jax": "0.10.3", "backend": "cpu"}))
    code, out, _ = run_main(capsys, a, b)
    assert code == 0
    assert out.splitlines() == [MATCH_LINE, "note: environment differs: jax: '0.10.2' -> '0.10.3'"]
    c = write(tmp_path, "c.json", record(diverge_at=5, env={"jax": "0.10.3", "backend": "cpu"}))
    code, out, _ = run_main(capsys, a, c)
    assert code == 1 and "environment differs: jax: '0.10.2' -> '0.10.3'" in out


def test_different_lengths(tmp_path, capsys):
    a = write(tmp_path, "a.json", record(steps=6))
    b = write(tmp_path, "b.json", record(steps=8))
    code, out, _ = run_main(capsys, a, b)
    assert code == 1
    assert "steps differ: 6 vs 8" in out


# ---------------------------------------------------------------- bad input: exit 2


def test_same_file_twice_is_exit_2(tmp_path, capsys, monkeypatch):
    a = write(tmp_path, "a.json", record())
    code, out, err = run_main(capsys, a, a)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "same file" in err
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "a.json", "./a.json")
    assert code == 2 and "same file" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.json", "b.json"], "missing.json: no such file"),
        (["a.json"], "the following arguments are required: b"),
        ([], "the following arguments are required: a, b"),
        (["a.json", "b.json", "--bogus"], "unrecognized arguments: --bogus"),
        (["a.json", "bad.json"], "bad.json: not valid JSON"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.json", record())
    write(tmp_path, "b.json", record())
    (tmp_path / "bad.json").write_text('{"schema": ')
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("jpr compare: error: ") and err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- ulp_distance


def test_ulp_distance():
    one = np.float32(1.0)
    up = np.nextafter(one, np.float32(2), dtype=np.float32)
    down = np.nextafter(one, np.float32(0), dtype=np.float32)
    assert ulp_distance(float(one), float(up)) == 1
    assert ulp_distance(float(down), float(up)) == 2
    assert ulp_distance(float(up), float(down)) == 2
    tiny = float(np.float32(1.4e-45))  # smallest subnormal
    assert ulp_distance(-tiny, tiny) == 2
    assert ulp_distance(-0.0, 0.0) == 0
    assert ulp_distance(1.5, 1.5) == 0


# ---------------------------------------------------------------- real runs


def train(out, *flags: str) -> dict:
    argv = ["--steps", "6", "--seed", "3", "--out", str(out), "--no-progress", *flags]
    return run_repro.run(run_repro.build_parser().parse_args(argv), out=lambda *a, **k: None)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare-runs")
    train(d / "base.json")
    train(d / "again.json")
    train(d / "perturbed.json", "--perturb-at", "3")
    return d


def test_real_identical_runs_match(real_runs, capsys):
    code, out, _ = run_main(
        capsys, str(real_runs / "base.json"), str(real_runs / "again.json"), "--check-metrics"
    )
    assert (code, out) == (0, MATCH_LINE + "\n")


def test_real_perturbed_run_names_step_and_leaf(real_runs, capsys):
    code, out, _ = run_main(capsys, str(real_runs / "base.json"), str(real_runs / "perturbed.json"))
    assert code == 1
    assert "first divergence: step 3 in params/fc1/kernel; train loss 0 ULP apart" in out
    code, out, _ = run_main(
        capsys, str(real_runs / "base.json"), str(real_runs / "perturbed.json"), "--json"
    )
    d = json.loads(out)["first_divergence"]
    assert (d["step"], d["last_equal_step"], d["leaves"]) == (3, 2, ["params/fc1/kernel"])


def test_real_perturbation_with_sparse_trace(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    train(a, "--trace-every", "2")
    train(b, "--trace-every", "2", "--perturb-at", "3")
    code, out, _ = run_main(capsys, str(a), str(b), "--json")
    d = json.loads(out)["first_divergence"]
    assert code == 1
    assert (d["step"], d["last_equal_step"]) == (4, 2)
    assert "params/fc1/kernel" in d["leaves"]


def test_compare_does_not_import_jax(real_runs):
    code = (
        "import jpr.compare, sys\n"
        "rc = jpr.compare.main(sys.argv[1:])\n"
        "print('jax' in sys.modules, rc)\n"
    )
    a, b = str(real_runs / "base.json"), str(real_runs / "perturbed.json")
    out = subprocess.run([sys.executable, "-c", code, a, b], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("❌ MISMATCH")
    assert lines[-1] == "False 1"


def test_no_cpu_blame_when_the_probes_agree():
    """A pinned run and an unpinned one whose probes agree computed alike: a
    mismatch between them is not put down to the CPU target (issue 19's report:
    "float results differ for that reason alone", then MATCH)."""
    target = {"arch": "x86_64", "effective": "AVX2", "source": "jpr", "host_isa": "AVX512",
              "probe": "0b13b6991b110f06", "probe_families": {"dot": "01", "fma": "02"}}
    native = {**target, "effective": "AVX512", "source": "native"}

    def record(t, h):
        return {"hash": h, "state_hash": h, "final": {}, "trajectory": [], "config": {},
                "leaf_hashes": {}, "env": {"cpu_target": t}}

    text = format_result(compare_records(record(target, "aa"), record(native, "bb")))
    assert "MISMATCH" in text and "CPU" not in text and "reason alone" not in text
    text = format_result(compare_records(record(target, "aa"), record(native, "aa")))
    assert text.splitlines() == [MATCH_LINE]
    moved = {**native, "probe": "902751b676fe8020", "probe_families": {"dot": "09", "fma": "02"}}
    text = format_result(compare_records(record(target, "aa"), record(moved, "bb")))
    assert text.splitlines()[0].endswith("the probe differs in: dot; float results can differ "
                                         "for that reason alone")
