"""Retention (``--keep N``, ``--keep-every K``) on real Orbax folders.

(A full disk: tests/snippets/test_faults.py, with the page's example.)

Old checkpoints are removed only after a newer one is saved and verified, by
renaming each to ``<step>.jpr-deleting`` (it stops being a step at once) and
then deleting it. The kill test stops real ``jpr run`` processes with SIGKILL
right after a save, in the middle of a removal (half of its files gone), and at
random moments, and checks each time that the folder still holds every complete
checkpoint it should, all verifying, and that the same command resumes to the
bits of the uninterrupted run.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import time
import types
from pathlib import Path

import pytest
from test_faults import Proc, checkpoints, jpr, one_error_line, reference_record

from jpr.checkpoint import Checkpointer, CorruptCheckpoint, retained
from jpr.config import RunConfig
from jpr.rng import root_key
from jpr.train import TrainState, init_state

STEPS = 100
KEEP = ["run", "--steps", str(STEPS), "--seed", "3", "--save-every", "10", "--keep", "3",
        "--checkpoint-dir", "ck", "--no-progress"]

# More pause points for test_faults.Proc (JPR_TEST_RETAIN): "retain:<step>" pauses
# right after step <step> is saved (committed; before it is verified and old steps
# removed); "delete:<step>" pauses inside the removal of step <step>, once it is
# renamed and half of its files are deleted. The process then waits to be killed.
RETAIN_HOOK = r"""
import os, pathlib, shutil, sys, time
_spec = os.environ.get("JPR_TEST_RETAIN", "")
if _spec:
    import jpr.checkpoint as _ck
    _point, _want = _spec.split(":")

    def _pause(what):
        print("@@paused " + what, file=sys.stderr, flush=True)
        while True:
            time.sleep(1)

    _apply = _ck.Checkpointer.apply_retention

    def _apply_retention(self, newest):
        if _point == "retain" and str(newest) == _want:
            _pause(f"retain {newest}")
        return _apply(self, newest)

    class _Shutil:
        def __getattr__(self, name):
            return getattr(shutil, name)

        @staticmethod
        def rmtree(path, *a, **kw):
            if _point == "delete" and pathlib.Path(path).name == _want + ".jpr-deleting":
                files = sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())
                for f in files[: len(files) // 2]:
                    f.unlink()
                _pause(f"delete {_want} ({len(files) // 2} of {len(files)} files deleted)")
            return shutil.rmtree(path, *a, **kw)

    _ck.Checkpointer.apply_retention = _apply_retention
    _ck.shutil = _Shutil()
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in-process."""
    return reference_record(tmp_path_factory.mktemp("ref"), STEPS)


def matches(reference: Path, record: Path | str, capsys) -> bool:
    code, out, _ = jpr(capsys, "compare", reference, record)
    return code == 0 and out.startswith("✅ MATCH")


def leftovers(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.iterdir() if not p.name.isdigit())


# ------------------------------------------------------------------ semantics


def test_retained_means_what_orbax_max_to_keep_and_keep_period_mean():
    """Same decisions as Orbax 0.12.8's own policies (LatestN + EveryNSteps, either keeps)."""
    from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

    rnd = random.Random(0)
    now = datetime.datetime.now()
    for _ in range(300):
        steps = sorted(rnd.sample(range(200), rnd.randint(0, 12)))
        keep, every = rnd.randint(1, 5), rnd.choice([None, 1, 3, 10, 50])
        policies = [pp.LatestN(n=keep)] + ([pp.EveryNSteps(every)] if every else [])
        infos = [types.SimpleNamespace(step=s, time=now, metrics=None) for s in steps]
        kept = pp.AnyPreservationPolicy(policies).should_preserve(
            infos, context=pp.PreservationContext()
        )
        orbax = [s for s, k in zip(steps, kept, strict=True) if k]
        assert retained(steps, keep, every) == orbax, (steps, keep, every)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep", "0"], "--keep must be at least 1, got 0"),
        (["--keep", "-2"], "--keep must be at least 1, got -2"),
        (["--keep", "3", "--keep-every", "0"], "--keep-every must be at least 1, got 0"),
        (["--keep-every", "50"],
         "--keep-every needs --keep (without --keep every checkpoint is kept)"),
        (["--keep", "three"], "argument --keep: invalid int value: 'three'"),
    ],
)
def test_bad_retention_values_are_one_line_exit_2(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = jpr(capsys, "run", "--steps", "20", "--save-every", "10",
                         "--checkpoint-dir", "ck", *flags)
    assert (code, out) == (2, "")
    assert one_error_line(err, "jpr run") == message
    assert not (tmp_path / "ck").exists()


# ------------------------------------------------------------------ in-process runs


@pytest.mark.slow
def test_keep_3_leaves_the_newest_3_and_keep_every_also_the_multiples(
    tmp_path, reference, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, out, err = jpr(capsys, *KEEP, "--out", "keep.json")
    assert code == 0, err
    assert checkpoints(tmp_path / "ck") == ([80, 90, 100], [])
    assert leftovers(tmp_path / "ck") == []  # no lock file, no half-removed step
    assert matches(reference, "keep.json", capsys)

    code, out, err = jpr(capsys, *KEEP[:-3], "--keep-every", "50", "--checkpoint-dir", "ck50",
                         "--no-progress", "--out", "k50.json")
    assert code == 0, err
    assert checkpoints(tmp_path / "ck50") == ([50, 80, 90, 100], [])
    code, out, _ = jpr(capsys, "verify", "ck50")
    assert code == 0 and [ln.split(":")[0] for ln in out.splitlines()] == [
        "step 50", "step 80", "step 90", "step 100", "4 of 4 checkpoints intact"]

    # Resuming from an older step with newer ones present: step 60 is really saved
    # (Orbax alone would skip a step older than its newest, silently), and only
    # steps older than a new, verified one are removed.
    code, out, err = jpr(capsys, *KEEP[:-3], "--keep-every", "50", "--checkpoint-dir", "ck50",
                         "--restore-from", "50", "--no-progress", "--out", "again.json")
    assert code == 0, err
    assert "saved step 60 to ck50" in out and "saved step 70 to ck50" in out
    assert "checkpoint step 80 already in ck50 (identical)" in out
    assert checkpoints(tmp_path / "ck50") == ([50, 70, 80, 90, 100], [])
    assert matches(reference, "again.json", capsys)


def test_nothing_is_removed_unless_the_new_step_verifies(tmp_path, monkeypatch):
    cfg = RunConfig()
    _, st = init_state(cfg)
    with Checkpointer(tmp_path / "ck", keep=1) as c:
        for step in (1, 2):
            c.save(TrainState(st.params, st.opt_state, step), root=root_key(0), cfg=cfg)
        assert c.steps() == [2] and c.removed == [1]

        def corrupt(step):
            raise CorruptCheckpoint(step, f"checkpoint step {step} is corrupt: test")

        monkeypatch.setattr(c, "verify", corrupt)
        with pytest.raises(CorruptCheckpoint):
            c.save(TrainState(st.params, st.opt_state, 3), root=root_key(0), cfg=cfg)
        assert c.steps() == [2, 3]  # step 2 stays: step 3 did not verify


# ------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
def test_sigkill_after_a_save_and_during_a_removal_loses_nothing(
    tmp_path, reference, capsys, monkeypatch
):
    seed = int(os.environ.get("JPR_KILL_SEED") or time.time_ns() % 2**32)
    why = f"(rerun with JPR_KILL_SEED={seed})"
    rnd = random.Random(seed)
    ck = tmp_path / "ck"
    job = [*KEEP, "--restore-from", "latest"]

    def start(pause: str) -> Proc:
        monkeypatch.setenv("JPR_TEST_RETAIN", pause)  # Proc passes the environment on
        return Proc(tmp_path, job, prelude=RETAIN_HOOK)

    # 1. Right after step 40 is committed, before it is verified and step 10 removed.
    p = start("retain:40")
    assert p.wait_for(r"@@paused retain 40", 120), p.stderr
    p.p.send_signal(signal.SIGKILL)
    assert p.finish() == -signal.SIGKILL
    assert checkpoints(ck) == ([10, 20, 30, 40], [])

    # 2. In the middle of removing step 20 (step 10 already gone), half its files deleted.
    p = start("delete:20")
    m = p.wait_for(r"@@paused delete 20 \((\d+) of (\d+) files deleted\)", 120)
    assert m and int(m.group(1)) > 0, p.stderr
    p.p.send_signal(signal.SIGKILL)
    assert p.finish() == -signal.SIGKILL
    assert "restored step 40 from ck" in p.stdout
    assert checkpoints(ck) == ([30, 40, 50], [])  # 20 is no longer a step, 50 verified
    assert leftovers(ck) == [".jpr-lock", "20.jpr-deleting"]
    monkeypatch.chdir(tmp_path)
    code, out, _ = jpr(capsys, "verify", "ck")
    assert code == 0, out
    assert out.splitlines()[0] == (
        "step 20: being removed (--keep), or its removal was cut short: not a checkpoint")

    # 3. At a random moment: the newest step saved before still verifies.
    newest = 50
    for _ in range(1):
        p = start("")
        assert p.wait_for(rf"restored step {newest} from ck", 120), p.stderr
        p.wait_for(r"@@never", rnd.uniform(0.0, 1.5))
        p.p.send_signal(signal.SIGKILL)
        p.finish()
        steps, _ = checkpoints(ck)  # every listed step verifies
        # Nothing complete is lost: the newest step is still there or superseded by a
        # newer verified one (once newer steps exist, --keep may remove the one resumed from).
        assert steps and steps[-1] >= newest, (steps, why)
        assert len(steps) <= 4, (steps, why)  # the newest 3, and one being replaced
        newest = steps[-1]

    # 4. The same command finishes the run: the uninterrupted bits, the newest 3 kept.
    code, out, err = jpr(capsys, *job, "--out", "final.json")
    assert code == 0, err
    assert checkpoints(ck) == ([80, 90, 100], []), why
    assert leftovers(ck) == [], why
    assert matches(reference, "final.json", capsys), why
