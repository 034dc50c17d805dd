"""Faults and bad input: killed mid-save, corrupted, misconfigured.

Nothing here is mocked. ``jpr run`` processes are killed with real signals,
some of them while Orbax is writing a checkpoint; checkpoints are real Orbax
folders with real bytes flipped or cut off; bad input goes through the real
command line. To land a kill *inside* a save every time (rather than when the
timing happens to allow it), the killed processes run ``jpr`` through
``PAUSE_HOOK``: it makes Orbax stop at a chosen point of a chosen save and say
so on stderr, then the test sends the signal. The pause changes when the
signal arrives, not what the process does with it.

The kill test runs 4 processes (~4 s each); everything else runs in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jpr import cli
from jpr.checkpoint import Checkpointer, CorruptCheckpoint
from jpr.config import RunConfig
from jpr.errors import JprError
from jpr.hashing import hash_pytree
from jpr.record import write_json_atomic
from jpr.rng import root_key
from jpr.train import TrainState, init_state

STEPS, EVERY = 24, 4
#: The one command a preemptible job re-runs until it finishes.
RESUMABLE = ["run", "--steps", str(STEPS), "--save-every", str(EVERY),
             "--checkpoint-dir", "ck", "--restore-from", "latest"]
LEAVES = {
    "params/fc1/kernel", "params/fc1/bias", "params/fc2/kernel", "params/fc2/bias",
    "rng", "step", "opt_state/0/count",
    *(f"opt_state/0/{m}/{layer}/{w}" for m in ("mu", "nu") for layer in ("fc1", "fc2")
      for w in ("kernel", "bias")),
}
LEFTOVER = "ignoring an incomplete save of step 28 in ck (interrupted)\n"
LEAF = "(?:" + "|".join(map(re.escape, sorted(LEAVES, key=len, reverse=True))) + ")"

# Runs `jpr` with Orbax paused at one point of one save: JPR_TEST_PAUSE is
# "mkdir:<step>" (just after Orbax created the step's temporary folder, nothing
# written yet) or "commit:<step>" (every file written, before the rename that
# makes the step count); <step> may be "*". The process prints "@@paused ..."
# on stderr and waits until the file JPR_TEST_RELEASE exists (forever if unset).
PAUSE_HOOK = r"""
import os, re, sys, time
spec, release = os.environ.get("JPR_TEST_PAUSE", ""), os.environ.get("JPR_TEST_RELEASE")
if spec:
    from orbax.checkpoint._src.path import atomicity
    point, want = spec.split(":")

    def pause(what):
        print("@@paused " + what, file=sys.stderr, flush=True)
        while not (release and os.path.exists(release)):
            time.sleep(0.005)

    create_tmp = atomicity._create_tmp_directory

    async def create(fn, tmp_dir, *a, **kw):
        out = await create_tmp(fn, tmp_dir, *a, **kw)
        m = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", tmp_dir.name)
        if point == "mkdir" and m and want in ("*", m.group(1)):
            pause("mkdir " + m.group(1))
        return out

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def commit(self, *a, **kw):
        name = self._final_path.name
        if point == "commit" and name.isdigit() and want in ("*", name):
            pause("commit " + name)
        return await finalize(self, *a, **kw)

    atomicity._create_tmp_directory = create
    atomicity.AtomicRenameTemporaryPath.finalize = commit
from jpr.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ------------------------------------------------------------------ helpers


def jpr(capsys, *argv) -> tuple[int, str, str]:
    """``jpr ARGV`` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, prog: str) -> str:
    """The single ``prog: error: ...`` line of ``err`` (fails on anything else)."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return err[len(f"{prog}: error: ") : -1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a digest of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def reference_record(folder: Path, steps: int, seed: int = 3) -> Path:
    """An uninterrupted ``jpr run`` in this process; returns its record's path."""
    import contextlib
    import io

    from jpr import cli

    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["run", "--steps", str(steps), "--seed", str(seed), "--no-progress",
                         "--out", str(folder / "ref.json")])
    assert code == 0
    return folder / "ref.json"


def checkpoints(ck: Path) -> tuple[list[int], list[int]]:
    """(complete steps, interrupted saves); every complete step must verify."""
    c = Checkpointer(ck, read_only=True)
    try:
        steps, incomplete = c.steps(), c.incomplete()
        for s in steps:
            c.verify(s)  # a complete checkpoint is never half written
        return steps, incomplete
    finally:
        c.close()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def biggest_array_file(step_dir: Path) -> Path:
    """The OCDBT data file that holds most of a step's arrays."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


class Proc:
    """A real ``jpr`` process (through PAUSE_HOOK) whose output is read as it comes."""

    def __init__(self, cwd: Path, argv: list[str], pause: str = "", release: Path | None = None,
                 *, prelude: str = ""):
        # prelude: more code run before PAUSE_HOOK (other pause points, in other tests).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JPR_TEST_PAUSE": pause,
               "JPR_TEST_RELEASE": str(release or "")}
        self.p = subprocess.Popen(
            [sys.executable, "-c", prelude + PAUSE_HOOK, *argv], cwd=cwd, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._threads = [
            threading.Thread(target=self._read, args=(self.p.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.p.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        """The first new output line matching ``pattern``; ``None`` on timeout or exit."""
        deadline, eofs = time.monotonic() + timeout, 0
        while eofs < 2:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                eofs += 1
            elif m := re.search(pattern, line):
                return m
        return None

    def finish(self, timeout: float = 60) -> int:
        try:
            rc = self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        for t in self._threads:
            t.join(5)
        return rc

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """An uninterrupted run of the resumable command: its record and its checkpoints."""
    d = tmp_path_factory.mktemp("pristine")
    old = Path.cwd()
    os.chdir(d)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main([*RESUMABLE, "--out", "ref.json"]) == 0
    finally:
        os.chdir(old)
    record = json.loads((d / "ref.json").read_text())
    c = Checkpointer(d / "ck", read_only=True)
    hashes = {s: c.read_meta(s)["state_hash"] for s in c.steps()}
    c.close()
    assert sorted(hashes) == list(range(EVERY, STEPS + 1, EVERY))
    return d, record, hashes


@pytest.fixture
def ck(pristine, tmp_path, monkeypatch):
    """A private copy of the pristine checkpoints in ``./ck`` (cwd = tmp_path)."""
    shutil.copytree(pristine[0] / "ck", tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "ck"


# --------------------------------------------------- kill, stop and resume


@pytest.mark.slow
def test_kill_and_resume_at_any_moment_gives_the_uninterrupted_bits(
    pristine, tmp_path, monkeypatch, capsys
):
    """SIGKILL inside saves and at a random moment, SIGTERM inside a save, then resume."""
    _, ref, ref_hashes = pristine
    seed = int(os.environ.get("JPR_KILL_SEED") or time.time_ns() % 2**32)
    why = f"(rerun with JPR_KILL_SEED={seed})"
    rnd = random.Random(seed)
    ck = tmp_path / "ck"

    # 1. SIGKILL just after Orbax created step 8's temporary folder.
    p = Proc(tmp_path, RESUMABLE, pause="mkdir:8")
    assert p.wait_for(r"@@paused mkdir 8", 90), p.stderr
    p.p.send_signal(signal.SIGKILL)
    assert p.finish() == -signal.SIGKILL
    assert "no complete checkpoint in ck yet: starting from step 0" in p.stdout
    assert checkpoints(ck) == ([4], [8])

    # 2. SIGKILL with every file of step 12 written, before the rename that commits it.
    p = Proc(tmp_path, RESUMABLE, pause="commit:12")
    assert p.wait_for(r"@@paused commit 12", 90), p.stderr
    p.p.send_signal(signal.SIGKILL)
    assert p.finish() == -signal.SIGKILL
    assert "ignoring an incomplete save of step 8 in ck (interrupted)" in p.stdout
    assert "restored step 4 from ck" in p.stdout
    assert (ck / "12.orbax-checkpoint-tmp" / "state" / "manifest.ocdbt").is_file()
    assert checkpoints(ck) == ([4, 8], [12])  # all written, still not a checkpoint

    # 3. SIGKILL at a random moment of training (in the save of step 20 at the latest).
    p = Proc(tmp_path, RESUMABLE, pause="commit:20")
    assert p.wait_for(r"restored step 8 from ck", 90), p.stderr
    delay = rnd.uniform(0.0, 0.5)
    p.wait_for(r"@@paused", delay)
    p.p.send_signal(signal.SIGKILL)
    assert p.finish() == -signal.SIGKILL, why
    steps, _ = checkpoints(ck)
    assert steps[:2] == [4, 8] and set(steps) <= {4, 8, 12, 16}, (steps, delay, why)

    # 4. SIGTERM while a save is being committed: it completes, the run stops and says so.
    go = tmp_path / "go"
    p = Proc(tmp_path, RESUMABLE, pause="commit:*", release=go)
    m = p.wait_for(r"@@paused commit (\d+)", 90)
    assert m, p.stderr
    stopped_at = int(m.group(1))
    p.p.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # let the handler run before the save resumes
    go.touch()
    assert p.finish() == 128 + signal.SIGTERM, p.stderr
    assert p.stderr.splitlines()[-1] == (
        f"jpr run: stopped by SIGTERM after step {stopped_at}: step {stopped_at} is saved "
        "in ck; to resume, run the same command with --restore-from latest"
    ), why
    assert "Traceback" not in p.stderr
    steps, incomplete = checkpoints(ck)
    assert steps[-1] == stopped_at and not incomplete, why

    # 5. The same command once more runs to the end: the bits of the uninterrupted run.
    monkeypatch.chdir(tmp_path)
    code, out, err = jpr(capsys, *RESUMABLE, "--out", "final.json")
    assert code == 0, err
    assert f"restored step {stopped_at} from ck" in out
    final = json.loads((tmp_path / "final.json").read_text())
    assert (final["hash"], final["state_hash"]) == (ref["hash"], ref["state_hash"]), why
    assert final["trajectory"] == ref["trajectory"], why
    c = Checkpointer(ck, read_only=True)
    assert {s: c.read_meta(s)["state_hash"] for s in c.steps()} == ref_hashes, why
    c.close()
    code, out, _ = jpr(capsys, "compare", pristine[0] / "ref.json", "final.json")
    assert code == 0 and out.startswith("✅ MATCH")


def test_sigint_during_a_save_completes_it_and_says_how_to_resume(ck, capsys, monkeypatch):
    """A real SIGINT raised while step 8 is being committed (in-process)."""
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def commit(self, *a, **kw):
        if self._final_path.name == "8":
            signal.raise_signal(signal.SIGINT)
        return await finalize(self, *a, **kw)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", commit)
    shutil.rmtree(ck)
    handler = signal.getsignal(signal.SIGINT)
    code, out, err = jpr(capsys, *RESUMABLE)
    assert code == 128 + signal.SIGINT
    assert err == (
        "jpr run: stopped by SIGINT after step 8: step 8 is saved in ck; to resume, "
        "run the same command with --restore-from latest\n"
    )
    assert "saved step 8 to ck" in out
    assert checkpoints(ck) == ([4, 8], [])
    assert signal.getsignal(signal.SIGINT) is handler  # put back


def test_sigterm_before_the_first_step_saves_step_0_or_says_nothing_was_saved(
    tmp_path, capsys, monkeypatch
):
    """A real SIGTERM while the run is still setting up (in-process)."""
    from jpr import data

    make_dataset = data.make_dataset

    def sigterm_then_make_dataset(*a, **kw):
        signal.raise_signal(signal.SIGTERM)
        return make_dataset(*a, **kw)

    monkeypatch.setattr(data, "make_dataset", sigterm_then_make_dataset)
    monkeypatch.chdir(tmp_path)
    code, _, err = jpr(capsys, *RESUMABLE, "--out", "r.json")
    assert code == 128 + signal.SIGTERM
    assert err == (
        "jpr run: stopped by SIGTERM after step 0: step 0 is saved in ck; to resume, "
        "run the same command with --restore-from latest\n"
    )
    assert not (tmp_path / "r.json").exists()  # no record of an unfinished run
    assert checkpoints(tmp_path / "ck") == ([0], [])
    code, out, err = jpr(capsys, "run", "--steps", "5")
    assert code == 128 + signal.SIGTERM and out == ""
    assert err == (
        "jpr run: stopped by SIGTERM after step 0: nothing saved (no --checkpoint-dir): "
        "a rerun starts from step 0\n"
    )


def test_a_second_signal_stops_at_once(tmp_path):
    code = (
        "import os, signal, time\n"
        "from jpr.signals import GracefulStop\n"
        "with GracefulStop() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    print('asked to stop by', stop.name, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "    print('still running')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (-signal.SIGTERM, "asked to stop by SIGTERM\n")


def test_release_hands_a_received_signal_to_the_previous_handler():
    from jpr.signals import GracefulStop

    got = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        with GracefulStop(signals=(signal.SIGUSR1,)) as stop:
            signal.raise_signal(signal.SIGUSR1)
            assert stop.requested and got == []
            stop.release()  # what a multi-process `jpr run` does
            assert got == [signal.SIGUSR1] and not stop.requested
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ------------------------------------------------------------- corruption


def corrupt_meta_value(step_dir: Path) -> None:
    """Change one hex digit of the stored state_hash: still valid JSON."""
    meta = step_dir / "meta" / "metadata"
    text = meta.read_text()
    i = text.index('"state_hash": "') + len('"state_hash": "')
    meta.write_text(text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1 :])


CORRUPTIONS = {
    # name: (how, what verify says about step 8)
    "array file truncated": (
        lambda s: (f := biggest_array_file(s)).write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
        rf"{LEAF} unreadable \([A-Z_]+: .+\)",
    ),
    "OCDBT manifest flipped": (
        lambda s: flip_byte(s / "state" / "manifest.ocdbt", 10),
        r"array metadata unreadable \(DATA_LOSS reading ck/8/state/manifest\.ocdbt\)",
    ),
    "Orbax tree metadata cut": (
        lambda s: (f := s / "state" / "_METADATA").write_bytes(f.read_bytes()[:100]),
        r"array metadata unreadable \(.+\); damaged: ck/8/state/_METADATA",
    ),
    "meta value changed": (
        corrupt_meta_value,
        r"its metadata does not match its meta_digest, so the hashes stored in it cannot be"
        r" trusted",
    ),
    "meta JSON broken": (
        lambda s: flip_byte(s / "meta" / "metadata", 0),
        r"metadata unreadable \(Expecting value: line 1 column 1 \(char 0\)\)",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_caught_by_verify_naming_step_and_leaf(name, ck, capsys, pristine):
    how, says = CORRUPTIONS[name]
    how(ck / "8")
    before = snapshot(ck)
    code, out, err = jpr(capsys, "verify", "ck")
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"step 4: ok (15 leaves, state_hash {pristine[2][4][:16]})"
    assert re.match(rf"step 8: CORRUPT: {says}", lines[1]), lines[1]
    assert lines[-1] == "5 of 6 checkpoints intact"
    assert snapshot(ck) == before  # verify never writes


def flip_until_it_matters(step_dir: Path) -> tuple[int, str]:
    """Flip single bytes of the arrays' data file until one changes what a restore reads.

    A flip in a byte that Orbax never decodes (padding, an unused index)
    changes nothing that is restored: verify then says "ok", and rightly so
    (it re-hashes what a resume would get). Each flip that is not caught is
    checked to be such a harmless one and undone before the next is tried.
    """
    f = biggest_array_file(step_dir)
    size = f.stat().st_size
    c = Checkpointer(step_dir.parent, read_only=True)
    try:
        for offset in [0, *range(size // 2, size, max(1, size // 16))]:
            flip_byte(f, offset)
            try:
                c.verify(int(step_dir.name))
            except CorruptCheckpoint as e:
                return offset, str(e)
            flip_byte(f, offset)
    finally:
        c.close()
    raise AssertionError(f"no flip in {f} changed what a restore reads")


def test_flipped_bytes_in_array_data_are_caught_naming_step_and_leaf(ck, capsys):
    offset, message = flip_until_it_matters(ck / "8")
    assert re.fullmatch(
        rf"checkpoint step 8 is corrupt: {LEAF} (does not match the stored hash|unreadable \(.+\))"
        rf"(; {LEAF} (does not match the stored hash|unreadable \(.+\)))*",
        message,
    ), (offset, message)
    before = snapshot(ck)
    code, out, err = jpr(capsys, "run", "--steps", "12", "--checkpoint-dir", "ck",
                         "--restore-from", "8")
    assert (code, out) == (2, "")
    assert one_error_line(err, "jpr run") == message
    assert snapshot(ck) == before


@pytest.mark.parametrize("name", ["array file truncated", "meta value changed"])
def test_corruption_is_refused_on_restore_naming_step_and_leaf(name, ck, capsys):
    how, says = CORRUPTIONS[name]
    how(ck / "8")
    before = snapshot(ck)
    code, out, err = jpr(capsys, "run", "--steps", "12", "--checkpoint-dir", "ck",
                         "--restore-from", "8")
    msg = one_error_line(err, "jpr run")
    assert code == 2 and out == ""
    assert re.fullmatch(rf"checkpoint step 8 is corrupt: {says}(; .*)?", msg), msg
    assert snapshot(ck) == before


def test_latest_never_skips_a_corrupt_newest_checkpoint(ck, capsys, pristine, tmp_path):
    _, message = flip_until_it_matters(ck / "24")
    before = snapshot(ck)
    code, out, err = jpr(capsys, *RESUMABLE)
    assert (code, out) == (2, "")
    assert one_error_line(err, "jpr run") == (
        f"{message}; --restore-from latest does not skip it: older checkpoints: "
        "4, 8, 12, 16, 20; move ck/24 away and rerun to resume from step 20"
    )
    assert snapshot(ck) == before
    # Resuming from step 20 while the corrupt step 24 is still there stops at its save.
    code, out, err = jpr(capsys, *RESUMABLE[:-1], "20")
    assert code == 2 and one_error_line(err, "jpr run") == message
    # The way out it names: the same command then resumes from 20 and rewrites 24.
    shutil.move(ck / "24", tmp_path / "corrupt-24")
    code, out, err = jpr(capsys, *RESUMABLE, "--out", "r.json")
    assert code == 0, err
    assert "restored step 20 from ck" in out
    assert json.loads((tmp_path / "r.json").read_text())["state_hash"] == pristine[1]["state_hash"]


def test_verify_one_step_and_leftovers(ck, capsys, pristine):
    (ck / "28.orbax-checkpoint-tmp").mkdir()
    code, out, err = jpr(capsys, "verify", "ck", "--step", "12")
    assert (code, err) == (0, "")
    assert out == f"step 12: ok (15 leaves, state_hash {pristine[2][12][:16]})\n"
    code, out, _ = jpr(capsys, "verify", "ck")
    assert code == 0
    assert out.splitlines()[0] == (
        "step 28: incomplete save (interrupted, or still being written): not a checkpoint"
    )
    assert out.splitlines()[-1] == "6 of 6 checkpoints intact"
    assert (ck / "28.orbax-checkpoint-tmp").is_dir()  # read-only: left in place


# ----------------------------------------------------------- config drift


@pytest.mark.parametrize(
    "flags, diff",
    [
        (["--seed", "1"], "seed: 0 -> 1"),
        (["--batch-size", "32"], "batch_size: 64 -> 32"),
        (["--lr", "0.01"], "lr: 0.001 -> 0.01"),
        (["--dropout", "0.2"], "dropout: 0.1 -> 0.2"),
        (["--hidden", "16"], "hidden: 32 -> 16"),
        (["--microbatches", "4"], "microbatches: None -> 4"),
        (["--seed", "2", "--hidden", "8"], "hidden: 32 -> 8; seed: 0 -> 2"),
    ],
)
def test_resuming_with_another_config_is_refused_listing_the_fields(flags, diff, ck, capsys):
    (ck / "28.orbax-checkpoint-tmp").mkdir()  # a leftover: only a run that saves removes it
    before = snapshot(ck)
    where = "latest" if "--seed" in flags else "8"  # both ways of resuming, not every pair
    code, out, err = jpr(capsys, "run", "--steps", "30", "--checkpoint-dir", "ck",
                         "--restore-from", where, *flags)
    step = 24 if where == "latest" else 8
    assert code == 2 and out == LEFTOVER
    assert one_error_line(err, "jpr run") == (
        f"checkpoint step {step} was made with a different config: {diff}"
    )
    assert snapshot(ck) == before


def test_a_checkpoint_of_another_tree_is_refused_naming_the_path(tmp_path, capsys, monkeypatch):
    cfg = RunConfig()
    _, state = init_state(cfg)
    before = hash_pytree(state.params)
    c = Checkpointer(tmp_path / "ck")
    params = state.params
    variants = {
        1: {**params, "fc3": {"kernel": np.zeros((2, 2), np.float32)}},
        2: {"fc1": params["fc1"], "fc2": {"kernel": params["fc2"]["kernel"]}},
        3: {**params, "fc1": {**params["fc1"], "kernel": params["fc1"]["kernel"].astype("f2")}},
    }
    for step, p in variants.items():
        other = TrainState(params=p, opt_state=state.opt_state, step=step)
        c.save(other, root=root_key(0), cfg=cfg)
    expected = {
        1: "checkpoint step 1 has an unexpected leaf params/fc3/kernel",
        2: "checkpoint step 2 has no leaf params/fc2/bias; refusing to restore",
        3: "checkpoint step 3: leaf params/fc1/kernel is float16[64, 32], expected float32[64, 32]",
    }
    for step, message in expected.items():
        with pytest.raises(JprError) as e:
            c.restore(step, cfg=cfg, template=state)
        assert str(e.value) == message and not isinstance(e.value, CorruptCheckpoint)
    c.close()
    assert hash_pytree(state.params) == before  # nothing was restored into anything
    monkeypatch.chdir(tmp_path)
    code, _, err = jpr(capsys, "run", "--steps", "5", "--checkpoint-dir", "ck",
                       "--restore-from", "1")
    assert code == 2 and one_error_line(err, "jpr run") == expected[1]


# -------------------------------------------------------------- bad input


def _files(d: Path) -> None:
    (d / "afile").write_text("not a folder\n")
    (d / "adir").mkdir()
    (d / "empty").mkdir()
    (d / "empty.json").write_text("")
    (d / "broken.json").write_text("{not json")
    (d / "v2.json").write_text(json.dumps({"schema": "jpr.run/2", "hash": "ab"}))


BAD_INPUT = [
    (["run", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["run", "--steps", "-3"], "--steps must be at least 1, got -3"),
    (["run", "--steps", "10", "--save-at", "11", "--checkpoint-dir", "ck"],
     "--save-at 11 is outside [0, --steps 10]"),
    (["run", "--save-every", "0", "--checkpoint-dir", "ck"],
     "--save-every must be at least 1, got 0"),
    (["run", "--steps", "30", "--checkpoint-dir", "ck", "--restore-from", "5"],
     "no checkpoint at step 5 in ck (available: 4, 8, 12, 16, 20, 24)"),
    (["run", "--checkpoint-dir", "nowhere", "--restore-from", "4"],
     "checkpoint dir nowhere does not exist"),
    (["run", "--checkpoint-dir", "afile", "--save-every", "2"],
     "checkpoint dir afile is a file, not a folder"),
    (["run", "--restore-from", "soon", "--checkpoint-dir", "ck"],
     "argument --restore-from: must be a step number or 'latest', got 'soon'"),
    (["run", "--restore-from", "latest"],
     "--save-at, --save-every and --restore-from need --checkpoint-dir"),
    (["run", "--out", "afile/r.json"],
     "--out afile/r.json: cannot write there (afile is not a folder)"),
    (["run", "--out", "adir"], "--out adir is a directory"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["compare", "broken.json", "ref.json"],
     "broken.json: not valid JSON (Expecting property name enclosed in double quotes); "
     "truncated or not a run record?"),
    (["compare", "ref.json", "cut.json"], None),  # truncated: checked below
    (["compare", "empty.json", "ref.json"], "empty.json: empty file, not a jpr run record"),
    (["compare", "v2.json", "ref.json"],
     "v2.json: schema 'jpr.run/2' is not supported (this jpr reads 'jpr.run/1')"),
    (["compare", "ref.json", "ref.json"],
     "ref.json and ref.json are the same file; compare two different runs"),
    (["compare", "ref.json", "missing.json"], "missing.json: no such file"),
    (["verify", "nowhere"], "checkpoint dir nowhere does not exist"),
    (["verify", "empty"], "no complete checkpoint in empty"),
    (["verify", "ck", "--step", "5"],
     "no checkpoint at step 5 in ck (available: 4, 8, 12, 16, 20, 24)"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_damages_nothing(argv, message, ck, pristine, capsys):
    root = ck.parent
    _files(root)
    (ck / "28.orbax-checkpoint-tmp").mkdir()
    ref = (pristine[0] / "ref.json").read_text()
    (root / "ref.json").write_text(ref)
    (root / "cut.json").write_text(ref[: len(ref) // 2])
    before = snapshot(root)
    code, out, err = jpr(capsys, *argv)
    msg = one_error_line(err, f"jpr {argv[0]}")
    assert code == 2 and out in ("", LEFTOVER)
    if message is None:
        assert msg.startswith("cut.json: not valid JSON (") and msg.endswith(
            "); truncated or not a run record?"
        )
    else:
        assert msg == message
    assert snapshot(root) == before


def test_bad_input_in_a_real_process_is_one_line(tmp_path):
    (tmp_path / "broken.json").write_text('{"schema": "jpr.run/1", "hash": ')
    r = subprocess.run([sys.executable, "-m", "jpr", "compare", "broken.json", "broken.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (
        "jpr compare: error: broken.json and broken.json are the same file; "
        "compare two different runs\n"
    )
    (tmp_path / "other.json").write_text("[]")
    r = subprocess.run([sys.executable, "-m", "jpr", "compare", "broken.json", "other.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.startswith("jpr compare: error: broken.json: not valid JSON (")
    assert r.stderr.count("\n") == 1


# --------------------------------------------------------- atomic outputs


def test_a_record_being_rewritten_is_never_seen_half_written(tmp_path):
    path = tmp_path / "r.json"
    small, big = {"n": "small"}, {"n": "big", "pad": "x" * 300_000}
    write_json_atomic(path, small)
    done, seen, errors = threading.Event(), [], []

    def reader():
        while not done.is_set():
            try:
                seen.append(json.loads(path.read_bytes())["n"])
            except (ValueError, OSError) as e:
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            write_json_atomic(path, big if i % 2 else small)
    finally:
        done.set()
        t.join()
    assert not errors
    assert {"small", "big"} <= set(seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left


def test_a_failed_record_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(JprError, match="cannot write"):
        write_json_atomic(path, {"loss": float("nan")})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
