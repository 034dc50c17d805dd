"""Run records: atomic writes and reads that fail with one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jpr.errors import JprError
from jpr.record import SCHEMA, SEED_KEYS, read_record, write_json_atomic


def minimal_record(**overrides) -> dict:
    rec = {
        "schema": SCHEMA,
        "hash": "a" * 64,
        "state_hash": "b" * 64,
        "steps": 3,
        "batch_size": 64,
        "seed": 0,
        "lr": 1e-3,
        "backend": "cpu",
        "final": {"loss": 1.0, "acc": 0.5},
        "trajectory": [{"step": 0}],
        "env": {},
        "config": {},
    }
    rec.update(overrides)
    return rec


def one_line_error(path) -> str:
    with pytest.raises(JprError) as info:
        read_record(path)
    text = str(info.value)
    assert "\n" not in text and text.strip() == text and text
    return text


# ---------------------------------------------------------------- writing


def test_write_creates_parents_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "runs" / "deep" / "r.json"
    write_json_atomic(target, minimal_record())
    assert read_record(target)["hash"] == "a" * 64
    write_json_atomic(target, minimal_record(hash="c" * 64))  # overwrite
    assert read_record(target)["hash"] == "c" * 64
    assert sorted(os.listdir(target.parent)) == ["r.json"]
    assert target.read_text().endswith("\n")


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(JprError, match="cannot write"):
        write_json_atomic(target, {"v": float("nan")})  # JSON has no NaN
    with pytest.raises(JprError, match="cannot write"):
        write_json_atomic(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_failed_rename_removes_the_temp_file(tmp_path):
    blocker = tmp_path / "taken"
    blocker.mkdir()
    (blocker / "inside").write_text("x")  # a non-empty folder cannot be replaced by a file
    with pytest.raises(JprError) as info:
        write_json_atomic(blocker, {"v": 1})
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == ["taken"]
    assert os.listdir(blocker) == ["inside"]


def test_unwritable_parent_is_one_line(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(JprError, match="cannot write") as info:
        write_json_atomic(afile / "sub" / "r.json", {"v": 1})
    assert "\n" not in str(info.value)


def test_reader_never_sees_half_a_file(tmp_path):
    """A writer in another process replaces the file many times while we read it."""
    target = tmp_path / "r.json"
    big = minimal_record(trajectory=[{"step": i, "pad": "x" * 200} for i in range(2000)])
    write_json_atomic(target, big)
    code = (
        "import sys; from jpr.record import write_json_atomic; import json\n"
        "rec = json.loads(open(sys.argv[1]).read())\n"
        "for i in range(20):\n"
        "    rec['steps'] = i; write_json_atomic(sys.argv[1], rec)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)])
    reads = 0
    while writer.poll() is None or reads < 5:
        rec = read_record(target)  # raises on a partial file
        assert len(rec["trajectory"]) == 2000
        reads += 1
    assert writer.wait() == 0
    assert read_record(target)["steps"] == 19
    assert os.listdir(tmp_path) == ["r.json"]


# ---------------------------------------------------------------- reading


def test_seed_keys_are_the_original_products():
    assert SEED_KEYS == ("hash", "steps", "batch_size", "seed", "lr", "backend", "final")


def test_missing_file(tmp_path):
    assert "no such file" in one_line_error(tmp_path / "nope.json")


def test_directory(tmp_path):
    assert "is a directory" in one_line_error(tmp_path)


@pytest.mark.parametrize("content", [b"", b"   \n\n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "r.json"
    p.write_bytes(content)
    assert "empty file" in one_line_error(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "r.json"
    full = json.dumps(minimal_record(), indent=2)
    p.write_text(full[: len(full) // 2])
    assert "not valid JSON" in one_line_error(p)


@pytest.mark.parametrize("content", [b"hello", b"\xff\xfe\x00garbage", b"{'a': 1}"])
def test_not_json(tmp_path, content):
    p = tmp_path / "r.json"
    p.write_bytes(content)
    assert "not valid JSON" in one_line_error(p)


@pytest.mark.parametrize("top", [[], [1, 2], "text", 3])
def test_top_level_not_an_object(tmp_path, top):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(top))
    assert "top level is not an object" in one_line_error(p)


def test_no_schema(tmp_path):
    p = tmp_path / "r.json"
    rec = minimal_record()
    del rec["schema"]
    p.write_text(json.dumps(rec))
    assert "no schema field" in one_line_error(p)


def test_wrong_schema(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(minimal_record(schema="jpr.run/999")))
    text = one_line_error(p)
    assert "'jpr.run/999' is not supported" in text and SCHEMA in text


@pytest.mark.parametrize(
    "field", ["hash", "state_hash", "steps", "final", "trajectory", "env", "config"]
)
def test_missing_fields(tmp_path, field):
    p = tmp_path / "r.json"
    rec = minimal_record()
    del rec[field]
    p.write_text(json.dumps(rec))
    assert f"missing '{field}'" in one_line_error(p)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hash": 5}, "'hash' is not a string"),
        ({"trajectory": {}}, "'trajectory' is not a list"),
        ({"final": [1]}, "'final' is not an object"),
        ({"trajectory": [{"loss": "0x1p+0"}]}, "bad trajectory entry"),
        ({"trajectory": [3]}, "bad trajectory entry"),
    ],
)
def test_wrong_field_types(tmp_path, overrides, message):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(minimal_record(**overrides)))
    assert message in one_line_error(p)


def test_errors_name_the_file(tmp_path):
    p = tmp_path / "some-run.json"
    p.write_text("")
    assert str(p) in one_line_error(p)


def test_record_module_does_not_import_jax():
    code = "import sys, jpr.record; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
