"""``python -m jpr.run_repro`` in-process: the record, resume, and bad flags."""

from __future__ import annotations

import json
import re

import pytest

from jpr import run_repro
from jpr.config import RunConfig
from jpr.record import SEED_KEYS, read_record

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def run(argv: list[str], capsys=None):
    """Run the training CLI in-process; returns (exit code, stdout, stderr)."""
    code = run_repro.main(argv)
    if capsys is None:
        return code, "", ""
    out, err = capsys.readouterr()
    return code, out, err


def ok(argv: list[str], capsys) -> str:
    code, out, err = run(argv, capsys)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 6-step run (seed 5) traced every 2 steps, with checkpoints every 2 steps."""
    d = tmp_path_factory.mktemp("base")
    argv = ["--steps", "6", "--seed", "5", "--trace-every", "2", "--no-progress",
            "--checkpoint-dir", str(d / "ckpt"), "--save-every", "2", "--out", str(d / "r.json")]
    assert run_repro.main(argv) == 0
    return d, read_record(d / "r.json")


# ---------------------------------------------------------------- the record


def test_record_keeps_the_seed_keys_and_adds_evidence(base):
    _, rec = base
    assert set(SEED_KEYS) <= set(rec)
    assert (rec["steps"], rec["batch_size"], rec["seed"], rec["lr"]) == (6, 64, 5, 1e-3)
    assert rec["backend"] == "cpu"
    assert set(rec["final"]) >= {"loss", "acc"}
    assert 0 <= rec["final"]["acc"] <= 1 and rec["final"]["loss"] > 0
    assert float.fromhex(rec["final"]["loss_hex"]) == rec["final"]["loss"]
    assert HEX64.match(rec["hash"]) and HEX64.match(rec["state_hash"])
    assert rec["hash"] != rec["state_hash"]
    cfg = RunConfig.from_dict(rec["config"])
    assert cfg == RunConfig(seed=5)
    assert rec["config_fingerprint"] == cfg.fingerprint()
    assert rec["env"]["jax"] and rec["env"]["process_count"] == 1
    assert rec["resumed_from"] is None and rec["perturb_at"] is None


def test_trajectory_every_k_steps_plus_the_last(base):
    _, rec = base
    traj = rec["trajectory"]
    assert [e["step"] for e in traj] == [0, 2, 4, 6]
    assert traj[0]["loss"] is None  # step 0 is the initial state
    assert all(float.fromhex(e["loss"]) > 0 for e in traj[1:])
    assert traj[-1]["params_hash"] == rec["hash"]
    assert sorted(traj[-1]["leaves"]) == ["fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel"]
    assert len({e["params_hash"] for e in traj}) == len(traj)
    assert float.fromhex(traj[-1]["loss"]) == float.fromhex(rec["final"]["train_loss_hex"])


def test_trace_every_default_and_odd_lengths(tmp_path, capsys):
    ok(["--steps", "5", "--trace-every", "2", "--out", str(tmp_path / "a.json")], capsys)
    assert [e["step"] for e in read_record(tmp_path / "a.json")["trajectory"]] == [0, 2, 4, 5]


def test_leaf_hashes_cover_the_whole_state(base):
    _, rec = base
    paths = set(rec["leaf_hashes"])
    assert {"rng", "step", "params/fc1/kernel", "params/fc2/bias"} <= paths
    assert any(p.startswith("opt_state/") for p in paths)


def test_stdout_lines(tmp_path, capsys):
    out = ok(["--steps", "3", "--seed", "5", "--out", str(tmp_path / "r.json")], capsys)
    lines = out.splitlines()
    assert re.fullmatch(r"final step 3: eval loss \d+\.\d{4} acc \d\.\d{4}", lines[0])
    rec = read_record(tmp_path / "r.json")
    assert lines[1] == f"hash       {rec['hash']}"
    assert lines[2] == f"state_hash {rec['state_hash']}"
    assert lines[3] == f"wrote {tmp_path / 'r.json'}"
    assert len(lines) == 4


def test_without_out_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ok(["--steps", "2"], capsys)
    assert "wrote" not in out
    assert list(tmp_path.iterdir()) == []


def test_same_config_same_bits_other_seed_other_bits(base, tmp_path, capsys):
    _, rec = base
    argv = ["--steps", "6", "--seed", "5", "--trace-every", "2", "--out", str(tmp_path / "a.json")]
    ok(argv, capsys)
    again = read_record(tmp_path / "a.json")
    assert (again["hash"], again["state_hash"]) == (rec["hash"], rec["state_hash"])
    assert again["trajectory"] == rec["trajectory"]
    assert again["final"] == rec["final"]
    ok(["--steps", "6", "--seed", "6", "--out", str(tmp_path / "b.json")], capsys)
    other = read_record(tmp_path / "b.json")
    assert other["hash"] != rec["hash"] and other["state_hash"] != rec["state_hash"]


# ---------------------------------------------------------------- checkpoints and resume


def test_save_every_writes_the_checkpoints(base):
    d, rec = base
    assert [c["step"] for c in rec["checkpoints_saved"]] == [2, 4, 6]
    assert sorted(p.name for p in (d / "ckpt").iterdir() if p.name.isdigit()) == ["2", "4", "6"]


@pytest.mark.parametrize("restore", ["2", "4", "latest"])
def test_resume_equals_uninterrupted(base, tmp_path, capsys, restore):
    d, full = base
    out = ok(["--steps", "6", "--seed", "5", "--trace-every", "2", "--checkpoint-dir",
              str(d / "ckpt"), "--restore-from", restore, "--out", str(tmp_path / "r.json")],
             capsys)
    step = 6 if restore == "latest" else int(restore)
    assert re.search(rf"^restored step {step} from .* \(state_hash [0-9a-f]{{16}} verified\)$",
                     out, re.M)
    rec = read_record(tmp_path / "r.json")
    assert (rec["hash"], rec["state_hash"]) == (full["hash"], full["state_hash"])
    assert rec["trajectory"] == full["trajectory"]  # the checkpoint carried the history
    assert rec["final"] == full["final"]
    assert rec["resumed_from"]["step"] == step


def test_resume_from_latest_after_a_shorter_run(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    ok(["--steps", "4", "--seed", "5", "--save-every", "3", "--checkpoint-dir", ck,
        "--out", str(tmp_path / "short.json")], capsys)
    out = ok(["--steps", "6", "--seed", "5", "--checkpoint-dir", ck, "--restore-from", "latest",
              "--out", str(tmp_path / "resumed.json")], capsys)
    assert "restored step 3 " in out
    ok(["--steps", "6", "--seed", "5", "--out", str(tmp_path / "full.json")], capsys)
    a, b = read_record(tmp_path / "resumed.json"), read_record(tmp_path / "full.json")
    assert (a["hash"], a["state_hash"]) == (b["hash"], b["state_hash"])


def test_latest_in_an_empty_folder_starts_from_zero(tmp_path, capsys):
    ck = tmp_path / "fresh"
    out = ok(["--steps", "2", "--checkpoint-dir", str(ck), "--restore-from", "latest"], capsys)
    assert f"no complete checkpoint in {ck} yet: starting from step 0" in out


def test_save_at_zero_and_identical_resave(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    out = ok(["--steps", "2", "--checkpoint-dir", ck, "--save-at", "0", "--save-at", "2"], capsys)
    assert re.search(r"^saved step 0 to .* \(state_hash [0-9a-f]{16}\)$", out, re.M)
    assert "saved step 2 to" in out
    out = ok(["--steps", "2", "--checkpoint-dir", ck, "--save-at", "2"], capsys)
    assert f"checkpoint step 2 already in {ck} (identical)" in out


def test_resave_with_a_different_state_is_refused(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    ok(["--steps", "2", "--checkpoint-dir", ck, "--save-at", "2"], capsys)
    code, _, err = run(["--steps", "2", "--seed", "1", "--checkpoint-dir", ck,
                          "--save-at", "2"], capsys)
    assert code == 2
    assert "checkpoint step 2 already exists" in err and "with a different state" in err
    assert err.count("\n") == 1


def test_restore_with_another_config_names_the_field(base, capsys):
    d, _ = base
    code, _, err = run(["--steps", "6", "--seed", "5", "--lr", "0.01", "--checkpoint-dir",
                        str(d / "ckpt"), "--restore-from", "4"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "checkpoint step 4 was made with a different config: lr: 0.001 -> 0.01" in err


def test_restore_of_a_missing_step_lists_the_available_ones(base, capsys):
    d, _ = base
    code, _, err = run(["--steps", "6", "--seed", "5", "--checkpoint-dir", str(d / "ckpt"),
                        "--restore-from", "3"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "no checkpoint at step 3" in err and "(available: 2, 4, 6)" in err


def test_restore_from_a_missing_folder(tmp_path, capsys):
    code, _, err = run(["--steps", "4", "--checkpoint-dir", str(tmp_path / "nope"),
                        "--restore-from", "2"], capsys)
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------- other features


def test_perturb_at_changes_the_bits_and_says_so(base, tmp_path, capsys):
    _, rec = base
    out = ok(["--steps", "6", "--seed", "5", "--trace-every", "2", "--perturb-at", "3",
              "--out", str(tmp_path / "p.json")], capsys)
    assert "perturbed params/fc1/kernel[0, 0] by one ULP after step 3" in out
    p = read_record(tmp_path / "p.json")
    assert p["perturb_at"] == 3
    assert p["hash"] != rec["hash"]
    assert p["trajectory"][:2] == rec["trajectory"][:2]  # steps 0 and 2 untouched


def test_a_diverged_run_is_still_recorded_and_reproducible(tmp_path, capsys):
    """lr=1e30 blows up to NaN: the record stores null, not invalid JSON."""
    for name in ("a", "b"):
        ok(["--steps", "3", "--lr", "1e30", "--out", str(tmp_path / f"{name}.json")], capsys)
    a, b = read_record(tmp_path / "a.json"), read_record(tmp_path / "b.json")
    assert a["final"]["loss"] is None and a["final"]["loss_hex"] == "nan"
    json.loads((tmp_path / "a.json").read_text())  # strict JSON, no NaN literal
    assert "NaN" not in (tmp_path / "a.json").read_text()
    assert (a["hash"], a["state_hash"]) == (b["hash"], b["state_hash"])


def test_progress_only_when_asked_or_on_a_terminal(tmp_path, capsys):
    code, _, err = run(["--steps", "3", "--progress"], capsys)
    assert code == 0
    assert "\rstep 3/3 loss " in err
    code, _, err = run(["--steps", "3"], capsys)  # capsys is not a terminal
    assert code == 0 and err == ""


# ---------------------------------------------------------------- bad flags


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
        (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
        (["--batch-size", "0"], "batch_size must be positive"),
        (["--lr", "nan"], "lr must be a positive finite number"),
        (["--dropout", "1"], "dropout must be in [0, 1)"),
        (["--batch-size", "64", "--microbatches", "3"], "must be divisible by microbatches (3)"),
        (["--batch-size", "8192"], "dataset_size (4096) must be at least batch_size (8192)"),
        (["--trace-every", "0"], "--trace-every must be at least 1"),
        (["--save-every", "0", "--checkpoint-dir", "ck"], "--save-every must be at least 1"),
        (["--steps", "5", "--save-at", "6", "--checkpoint-dir", "ck"], "--save-at 6 is outside"),
        (["--save-at", "3"], "need --checkpoint-dir"),
        (["--restore-from", "latest"], "need --checkpoint-dir"),
        (["--restore-from", "soon", "--checkpoint-dir", "ck"], "must be a step number or 'latest'"),
        (["--restore-from", "-2", "--checkpoint-dir", "ck"], "must be non-negative"),
        (["--steps", "5", "--restore-from", "9", "--checkpoint-dir", "ck"], "past --steps 5"),
        (["--steps", "5", "--perturb-at", "6"], "--perturb-at must be in [1, --steps 5]"),
        (["--perturb-at", "0"], "--perturb-at must be in [1"),
        (["--out", "."], "--out . is a directory"),
        (["--num-processes", "2"], "go together"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("jpr run: error: ") and err.count("\n") == 1, err
    assert message in err
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_a_run_of_several_chunks_compiles_its_chunk_once(tmp_path, capsys):
    # A chunk returns the state replicated on the mesh; the fresh state (and a
    # restored one) is placed so from the start, so the second chunk is the
    # same program as the first, not a second compilation.
    from jpr import train

    ck = str(tmp_path / "ck")
    argv = ["--steps", "6", "--seed", "17", "--save-every", "2", "--checkpoint-dir", ck]
    ok([*argv, "--out", str(tmp_path / "a.json")], capsys)  # 3 chunks of 2 steps
    cfg = RunConfig(seed=17)
    graphdef, _ = train.init_state(cfg)
    chunk_fn = train.make_train_chunk(
        cfg, graphdef, mesh=train.make_mesh(), width=run_repro._chunk_width(cfg, 1)
    )
    assert chunk_fn._cache_size() == 1
    ok(["--steps", "8", "--seed", "17", "--save-every", "2", "--checkpoint-dir", ck,
        "--restore-from", "latest", "--out", str(tmp_path / "b.json")], capsys)
    assert chunk_fn._cache_size() == 1  # the restored state too
