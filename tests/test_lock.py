"""One writer per checkpoint folder: real ``jpr run`` processes, real locks, real signals.

The first run is held inside its save of step 20 (test_faults.PAUSE_HOOK: every
file written, before the rename), which is where the two runs of the original
report both died. While it waits there, a second run on the same folder must
refuse at once, naming the first, and touch nothing; the first then finishes
with the bits of an uninterrupted run. A holder killed with SIGKILL leaves its
lock file behind (the kernel drops the lock itself): the next run takes it over
and says so.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import Proc, checkpoints, jpr, one_error_line, reference_record, snapshot

from jpr.checkpoint import Checkpointer
from jpr.errors import JprError
from jpr.lock import LOCK_NAME, FolderLock, FolderLocked, folder_lock, holder, releasing

STEPS = 60
RUN = ["run", "--steps", str(STEPS), "--seed", "3", "--save-every", "10",
       "--checkpoint-dir", "ck", "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in-process (checkpoints do not change the bits)."""
    return reference_record(tmp_path_factory.mktemp("ref"), STEPS)


def matches(reference: Path, record: Path, capsys) -> bool:
    code, out, _ = jpr(capsys, "compare", reference, record)
    return code == 0 and out.startswith("✅ MATCH")


@pytest.mark.slow
def test_a_second_run_on_the_folder_is_refused_at_once(tmp_path, reference, capsys, monkeypatch):
    go = tmp_path / "go"
    first = Proc(tmp_path, [*RUN, "--out", "first.json"], pause="commit:20", release=go)
    try:
        assert first.wait_for(r"@@paused commit 20", 120), first.stderr
        lock = json.loads((tmp_path / "ck" / LOCK_NAME).read_text())
        assert lock["pid"] == first.p.pid and lock["host"] == socket.gethostname()
        assert lock["command"] == "python -c ... " + " ".join(RUN) + " --out first.json"
        before = snapshot(tmp_path / "ck")

        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "jpr", *RUN, "--out", "second.json"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        took = time.monotonic() - t0
        assert second.returncode == 2 and second.stdout == "", second
        msg = one_error_line(second.stderr, "jpr run")
        assert msg.startswith(
            f"checkpoint dir ck is in use by another run: pid {first.p.pid} on "
            f"{socket.gethostname()}, started {lock['started']} ("
        ), msg
        assert msg.endswith("); wait for it to finish, or use another --checkpoint-dir"), msg
        assert took < 60, took  # it never waits for the holder (which waits for us)
        assert snapshot(tmp_path / "ck") == before  # its step 20 in progress: untouched
        assert not (tmp_path / "second.json").exists()

        # Read-only commands need no lock: verify runs beside the writer, and says so.
        monkeypatch.chdir(tmp_path)
        code, out, err = jpr(capsys, "verify", "ck")
        assert (code, err) == (0, ""), out
        lines = out.splitlines()
        assert lines[0].startswith(f"ck is being written by pid {first.p.pid} on ")
        assert lines[1] == (
            "step 20: incomplete save (interrupted, or still being written): not a checkpoint"
        )
        assert lines[2].startswith("step 10: ok (15 leaves, state_hash ")
        assert snapshot(tmp_path / "ck") == before
    finally:
        go.touch()
    assert first.finish(120) == 0, first.stderr
    assert "saved step 60 to ck" in first.stdout
    assert matches(reference, tmp_path / "first.json", capsys)
    assert not (tmp_path / "ck" / LOCK_NAME).exists()  # released: nothing left behind
    assert checkpoints(tmp_path / "ck") == ([10, 20, 30, 40, 50, 60], [])


@pytest.mark.slow
def test_a_killed_holders_lock_is_taken_over_and_the_run_resumes(
    tmp_path, reference, capsys, monkeypatch
):
    first = Proc(tmp_path, [*RUN, "--restore-from", "latest"], pause="commit:30")
    assert first.wait_for(r"@@paused commit 30", 120), first.stderr
    first.p.send_signal(signal.SIGKILL)
    assert first.finish() == -signal.SIGKILL
    left = json.loads((tmp_path / "ck" / LOCK_NAME).read_text())
    assert left["pid"] == first.p.pid  # the file stays; the kernel dropped the lock
    assert holder(tmp_path / "ck") is None  # nobody holds it

    monkeypatch.chdir(tmp_path)
    code, out, err = jpr(capsys, *RUN, "--restore-from", "latest", "--out", "resumed.json")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == [
        f"ck: taking over a lock left by pid {first.p.pid} (no longer running)",
        "ignoring an incomplete save of step 30 in ck (interrupted)",
        lines[2],
    ]
    assert lines[2].startswith("restored step 20 from ck (state_hash ")
    assert matches(reference, tmp_path / "resumed.json", capsys)
    assert not (tmp_path / "ck" / LOCK_NAME).exists()
    assert checkpoints(tmp_path / "ck") == ([10, 20, 30, 40, 50, 60], [])


def test_a_failed_run_leaves_no_lock_behind(tmp_path, capsys, monkeypatch):
    """In-process: the error path releases the lock (the next run is not refused)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    for _ in range(2):
        code, _, err = jpr(capsys, "run", "--steps", "5", "--checkpoint-dir", "ck",
                           "--restore-from", "3")
        assert code == 2 and one_error_line(err, "jpr run").startswith("no checkpoint at step 3")
    assert os.listdir(tmp_path / "ck") == []


def test_the_api_refuses_a_second_writer_and_lets_readers_in(tmp_path):
    d = tmp_path / "ck"
    with Checkpointer(d) as writer:
        assert writer.lock.held and holder(d)["pid"] == os.getpid()
        with pytest.raises(FolderLocked, match="in use by another writer in this process"):
            Checkpointer(d)
        reader = Checkpointer(d, read_only=True)  # never locks
        assert reader.lock is None and reader.steps() == []
        reader.close()
        with pytest.raises(FolderLocked):
            folder_lock(d).acquire()
    assert not (d / LOCK_NAME).exists()
    with folder_lock(d, command="my tool") as lock:
        assert json.loads(lock.path.read_text())["command"] == "my tool"
        with pytest.raises(FolderLocked, match="in use by another writer"):
            Checkpointer(d)
    assert Checkpointer(d, lock=False).lock is None


def test_a_lock_file_naming_a_dead_process_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(gone.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "started": "x", "command": "jpr run"}))
    with FolderLock(tmp_path, shown="ck") as lock:
        assert lock.previous["pid"] == pid
        assert lock.notice == f"ck: taking over a lock left by pid {pid} (no longer running)"
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with FolderLock(tmp_path) as lock:
        assert lock.previous is None and lock.notice is None


def test_a_lock_file_removed_under_a_waiting_writer_is_not_shared(tmp_path):
    """The file locked must be the one at the path: a releasing holder removes it."""
    first = FolderLock(tmp_path).acquire()
    stale_fd = os.open(first.path, os.O_RDWR)  # opened before the holder lets go
    first.release()
    second = FolderLock(tmp_path).acquire()
    import fcntl

    fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old, removed file: no conflict
    assert not second._same_file(stale_fd)  # ...so holding it is not holding the lock
    os.close(stale_fd)
    with pytest.raises(FolderLocked):
        FolderLock(tmp_path).acquire()
    second.release()


def test_releasing_drops_only_the_locks_taken_inside(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    outer = FolderLock(tmp_path / "a").acquire()
    with pytest.raises(JprError), releasing():
        inner = FolderLock(tmp_path / "b").acquire()
        raise JprError("boom")
    assert outer.held and not inner.held
    outer.release()


def test_orbax_and_verify_ignore_the_lock_file_and_other_files(tmp_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp

    from jpr.config import RunConfig
    from jpr.rng import root_key
    from jpr.train import init_state

    d = tmp_path / "ck"
    cfg = RunConfig()
    with Checkpointer(d) as c:
        c.save(init_state(cfg)[1], root=root_key(0), cfg=cfg)
        (d / "notes.txt").write_text("a file of mine\n")
        (d / "7.txt").write_text("digits, but a file\n")
        plain = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(read_only=True))
        assert list(plain.all_steps()) == [0]  # Orbax lists step folders only
        plain.close()
        assert c.steps() == [0]
        monkeypatch.chdir(tmp_path)
        code, out, err = jpr(capsys, "verify", "ck")
        assert code == 0 and err == ""
        assert out.splitlines()[1].startswith("step 0: ok (15 leaves")
