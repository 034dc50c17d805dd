"""The speed-ups keep the bits: fused training chunks, stacked batches, sliced hashing.

``jpr run`` trains up to 256 steps per dispatch (``train.make_train_chunk``),
builds the batches of a whole chunk at once (``data.get_batches``) and hashes
the trajectory straight from the stacked params (``hashing.hash_slices``).
Each must give exactly the bits of the one-step-at-a-time path, whatever the
fusion width, and the CLI's compilation cache must be configurable and off
when asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest

from jpr import data, hashing, run_repro, train
from jpr.config import RunConfig
from jpr.rng import root_key

STEPS = 70  # crosses the epoch boundary at step 64 (4096 examples / 64)


def _reference(cfg: RunConfig, steps: int, perturb_at: int | None = None):
    """(step, loss bits, params hash) after every step, one jitted step at a time."""
    graphdef, s = train.init_state(cfg)
    mesh = train.make_mesh(jax.devices()[:1])
    step_fn = train.make_train_step(cfg, graphdef, mesh=mesh)
    ds = data.make_dataset(cfg)
    root = root_key(cfg.seed)
    p, o = s.params, s.opt_state
    out = []
    for t in range(steps):
        x, y = data.get_batch(t, ds=ds, batch_size=cfg.batch_size)
        p, o, loss = step_fn(p, o, root, x, y, np.uint32(t))
        if perturb_at == t + 1:
            k = np.asarray(p["fc1"]["kernel"]).copy()
            k.view(np.uint32)[0, 0] ^= 1
            p = {**p, "fc1": {**p["fc1"], "kernel": jax.numpy.asarray(k)}}
        out.append((t + 1, float(loss).hex(), hashing.hash_pytree(p)))
    return out


def _fused(cfg: RunConfig, steps: int, width: int):
    graphdef, s = train.init_state(cfg)
    mesh = train.make_mesh(jax.devices()[:1])
    chunk_fn = train.make_train_chunk(cfg, graphdef, mesh=mesh, width=width)
    ds = data.make_dataset(cfg)
    root = root_key(cfg.seed)
    p, o = s.params, s.opt_state
    out = []
    for start in range(0, steps, width):
        n = min(width, steps - start)
        xs, ys = data.get_batches(start, n, ds=ds, batch_size=cfg.batch_size, pad_to=width)
        ids = np.arange(start, start + width, dtype=np.uint32)
        p, o, losses, hist = chunk_fn(p, o, root, xs, ys, ids, np.int32(n))
        hist = jax.tree.map(np.asarray, hist)
        for i, (h, _) in enumerate(hashing.hash_slices(hist, range(n))):
            out.append((start + i + 1, float(np.asarray(losses)[i]).hex(), h))
        assert out[-1][2] == hashing.hash_pytree(p)
    return out


@pytest.mark.parametrize(
    ("microbatches", "widths"), [(None, (1, 7)), (4, (7,))], ids=["data", "micro4"]
)
def test_bits_do_not_depend_on_the_fusion_width(microbatches, widths):
    cfg = RunConfig(seed=3, microbatches=microbatches)
    ref = _reference(cfg, STEPS)
    for width in widths:
        assert _fused(cfg, STEPS, width) == ref, f"width {width}"


def test_run_trajectory_matches_step_by_step_training(tmp_path):
    # Every step traced, a save inside a chunk and a one-ULP perturbation: the
    # chunked loop must record exactly what one step at a time computes.
    cfg = RunConfig(seed=5)
    ref = _reference(cfg, STEPS, perturb_at=33)
    argv = ["--steps", str(STEPS), "--seed", "5", "--perturb-at", "33"]
    argv += ["--checkpoint-dir", str(tmp_path / "ck"), "--save-at", "20"]
    rec = run_repro.run(run_repro.build_parser().parse_args(argv), out=lambda *a, **k: None)
    got = [(e["step"], e["loss"], e["params_hash"]) for e in rec["trajectory"][1:]]
    assert got == ref
    assert rec["hash"] == ref[-1][2]
    assert rec["checkpoints_saved"][0]["step"] == 20


def test_get_batches_is_get_batch_stacked():
    ds = data.make_dataset(RunConfig(seed=1))
    for pidx, pcount in [(0, 1), (1, 2), (3, 4)]:
        xs, ys = data.get_batches(
            60, 9, ds=ds, batch_size=64, process_index=pidx, process_count=pcount, pad_to=12
        )
        assert xs.shape == (12, 64 // pcount, 64) and ys.shape == (12, 64 // pcount)
        for i in range(9):
            x, y = data.get_batch(
                60 + i, ds=ds, batch_size=64, process_index=pidx, process_count=pcount
            )
            np.testing.assert_array_equal(xs[i], x)
            np.testing.assert_array_equal(ys[i], y)
        assert not xs[9:].any() and not ys[9:].any()
    far_x, _ = data.get_batches(10**9, 2, ds=ds, batch_size=64)
    np.testing.assert_array_equal(far_x[1], data.get_batch(10**9 + 1, ds=ds, batch_size=64)[0])


def test_get_batches_rejects_bad_arguments():
    ds = data.make_dataset(RunConfig(seed=1))
    with pytest.raises(ValueError, match="start"):
        data.get_batches(-1, 2, ds=ds, batch_size=64)
    with pytest.raises(ValueError, match="count"):
        data.get_batches(0, 5, ds=ds, batch_size=64, pad_to=4)
    with pytest.raises(ValueError, match="divisible"):
        data.get_batches(0, 1, ds=ds, batch_size=64, process_count=3)


def test_hash_slices_equals_hashing_each_slice():
    import ml_dtypes

    rng = np.random.default_rng(0)
    stacked = {
        "w": rng.standard_normal((4, 3, 2)).astype(np.float32),
        "half": rng.standard_normal((4, 5)).astype(ml_dtypes.bfloat16),
        "count": np.arange(4, dtype=">i8"),  # big-endian: canonicalised first
        "empty": np.zeros((4, 0), np.float32),
        "dev": jax.numpy.arange(8.0).reshape(4, 2),
    }
    got = hashing.hash_slices(stacked, [3, 0, 2])
    for i, g in zip([3, 0, 2], got, strict=True):
        one = jax.tree.map(lambda a, i=i: a[i], stacked)
        assert g == hashing.hash_pytree_and_leaves(one)
        assert g[0] == hashing.hash_pytree(one)
    with pytest.raises(ValueError, match="leading axis"):
        hashing.hash_slices({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}, [0])


def test_compilation_cache_dir_settings(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    with mock.patch.dict(os.environ, clean, clear=True):
        for off in ("0", "off", "false", "no"):
            os.environ["JPR_COMPILATION_CACHE"] = off
            assert run_repro.compilation_cache_dir() is None
        os.environ["JPR_COMPILATION_CACHE"] = str(tmp_path / "mine")
        where = run_repro.compilation_cache_dir()
        assert where.parent == tmp_path / "mine"
        assert where.name.startswith(f"{os.uname().machine}-")  # one folder per host kind
        del os.environ["JPR_COMPILATION_CACHE"]
        os.environ["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
        assert run_repro.compilation_cache_dir().parent == Path(tmp_path / "xdg/jpr/xla")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax")  # the user's own wins
        assert run_repro.compilation_cache_dir() is None
