"""Tests of snippets/recipes/ (included by docs/recipes.md).

Each recipe runs as a real process (``sys.executable``, the repository root as
working folder, a checkpoint or log folder in ``tmp_path`` where it takes one)
and the test checks the claims it prints. Recipes that need a process of their own
(flags read when JAX starts, a two-process distributed run) get one; the
others run one after another in a single process (one JAX start-up, not
ten). Where it is cheap a recipe is also imported and its functions checked
directly, including with inputs that must make it fail.

Only claims are checked (``True``/``False``, steps, leaf paths, shapes,
integers drawn from keys): float-derived bits depend on the CPU.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from docs_tools import REPO_ROOT

NNX_TRAIN_LOOP = "snippets/recipes/nnx_train_loop.py"
LINEN_TRAIN_LOOP = "snippets/recipes/linen_train_loop.py"
ORBAX_FULL_STATE = "snippets/recipes/orbax_full_state.py"
STATELESS_SHUFFLE = "snippets/recipes/stateless_shuffle.py"
GRAIN_PIPELINE = "snippets/recipes/grain_pipeline.py"
PYTREE_HASH = "snippets/recipes/pytree_hash.py"
DIVERGENCE_FINDER = "snippets/recipes/divergence_finder.py"
RESUME_CHECK = "snippets/recipes/resume_check.py"
MULTIHOST_SEEDS = "snippets/recipes/multihost_seeds.py"
GRAD_ACCUMULATION = "snippets/recipes/grad_accumulation.py"
SHARDED_INIT = "snippets/recipes/sharded_init.py"
GPU_DETERMINISM = "snippets/recipes/gpu_determinism.py"

TIMEOUT_S = 300
KEPT_FLAG = "--xla_cpu_enable_fast_math=false"  # the default: changes nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs recipes one after another in one process, as `python recipe.py ARGS` would
# (`__main__`, sys.argv), and records what each printed: one JAX start-up for
# all the recipes that set no process-wide flag before JAX starts.
_BATCH_RUNNER = """
import contextlib, io, json, runpy, sys, traceback
jobs, results = json.loads(sys.argv[1]), {}
for name, argv in jobs.items():
    out, error = io.StringIO(), None
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out):
            if argv[0] == "pytest":
                import pytest
                code = pytest.main(argv[1:])
                error = None if code == 0 else f"pytest exited {int(code)}"
            else:
                runpy.run_path(argv[0], run_name="__main__")
    except BaseException:
        error = traceback.format_exc()
    results[name] = {"stdout": out.getvalue(), "error": error}
print(json.dumps(results))
"""


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def runs(work):
    """name -> a future of (returncode, stdout, stderr) of each recipe run.

    Recipes that set process-wide flags before JAX starts (device count,
    XLA_FLAGS) or join a distributed run get a process each; the others share
    one (see _BATCH_RUNNER). All processes start together.
    """
    port = _free_port()
    mh = [MULTIHOST_SEEDS, f"127.0.0.1:{port}", "2"]
    batch = {
        "nnx": [NNX_TRAIN_LOOP],
        "linen": [LINEN_TRAIN_LOOP],
        "orbax": [ORBAX_FULL_STATE, str(work / "orbax")],
        "grain": [GRAIN_PIPELINE, str(work / "grain")],
        "shuffle": [STATELESS_SHUFFLE],
        "hash": [PYTREE_HASH],
        "divergence": [DIVERGENCE_FINDER, str(work / "logs")],
        "accumulation": [GRAD_ACCUMULATION],
        "multihost_single": [MULTIHOST_SEEDS],
        # The pytest recipe, collected and run by pytest (without this repository's
        # conftest.py and addopts, as in a user's project).
        "resume": ["pytest", "-q", "-s", "--noconftest", "-o", "addopts=", "-p",
                   "no:cacheprovider", "--basetemp", str(work / "pytest"), RESUME_CHECK],
    }
    # A conflicting setting in the environment: each recipe must set its own.
    own = {
        # The two processes of the multi-host run must be up at the same time.
        "multihost_0": ([*mh, "0"], None),
        "multihost_1": ([*mh, "1"], None),
        "sharded": ([SHARDED_INIT], {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
        "gpu": ([GPU_DETERMINISM], {"XLA_FLAGS": f"--xla_gpu_autotune_level=4 {KEPT_FLAG}"}),
    }
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(own) + 1)
    batch_future = pool.submit(_run, ["-c", _BATCH_RUNNER, json.dumps(batch)])
    futures = {name: pool.submit(_run, argv, env) for name, (argv, env) in own.items()}

    def unpack(name):
        proc = batch_future.result()
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.splitlines()[-1])[name]
        return 1 if result["error"] else 0, result["stdout"], result["error"] or ""

    for name in batch:
        futures[name] = pool.submit(unpack, name)
    yield futures
    pool.shutdown(wait=True)


def _result(runs, name: str) -> tuple[int, str, str]:
    result = runs[name].result()
    if isinstance(result, subprocess.CompletedProcess):
        return result.returncode, result.stdout, result.stderr
    return result


def _out(runs, name: str) -> str:
    code, stdout, stderr = _result(runs, name)
    assert code == 0, f"{name} failed ({code}):\n{stdout}\n{stderr}"
    return stdout


def _module(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, REPO_ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ training loops


@pytest.mark.parametrize("name", ["nnx", "linen"])
def test_training_loops_resume_bit_exact(runs, name):
    out = _out(runs, name)
    assert out.splitlines() == [
        "trained: 10 steps straight, and 5 + restart + 5",
        "resumed == uninterrupted: True",
        "training changed the params: True",
    ]


# ------------------------------------------------------------------- checkpoints


def test_orbax_saves_typed_keys_and_rng_state(runs, work):
    out = _out(runs, "orbax").splitlines()
    assert out == [
        "restored step: 4, key dtype: key<fry>",
        "restored == saved (typed key, RngState included): True",
        "dropout stream calls after resuming: 8",
        "resumed == uninterrupted: True",
    ]
    # A real checkpoint on disk, and the key's impl is recorded in its metadata.
    step_dir = work / "orbax" / "ckpt" / "4"
    assert (step_dir / "_CHECKPOINT_METADATA").is_file()
    metadata = (step_dir / "default" / "array_metadatas" / "process_0").read_text()
    assert '"random_key_impl": "threefry2x32"' in metadata


def test_grain_iterator_resumes_at_the_exact_batch(runs, work):
    out = _out(runs, "grain").splitlines()
    assert out[0] == "process 0 of 1: 20 batches"
    assert re.fullmatch(r"saved after batch 7, next batch after restore: \[[\d, ]+\]", out[1])
    assert out[2:] == [
        "resumed == uninterrupted: True",
        "2 processes read disjoint shards: True",
        "epoch 2 is a new order of the same examples: True",
        "seed 1234's epoch 2 == seed 1235's epoch 1: True",
    ]
    state = json.loads((work / "grain" / "ckpt" / "7" / "data" / "process_0-of-1.json")
                       .read_text())
    assert state  # Grain's own iterator state, as JSON


def test_grain_pipeline_shuffles_and_shards():
    grain_recipe = _module(GRAIN_PIPELINE)
    shard = grain_recipe.pipeline(0, 1)
    every = grain_recipe.batches(iter(shard.to_iter_dataset()), len(shard))
    assert sorted(grain_recipe.flat(every[:10])) == list(range(40))  # one epoch = 10 batches
    assert grain_recipe.flat(every[:10]) != list(range(40))  # shuffled
    halves = [set(grain_recipe.flat(grain_recipe.batches(
        iter(grain_recipe.pipeline(p, 2).to_iter_dataset()), 5))) for p in (0, 1)]
    assert halves[0] | halves[1] == set(range(40)) and not halves[0] & halves[1]


def test_resume_check_passes_on_a_good_loop(runs):
    out = _out(runs, "resume")
    assert "6 steps straight vs 3 + save/restore + 3: resumed == uninterrupted: True" in out
    assert re.search(r"^1 passed", out, re.MULTILINE), out


def test_resume_check_fails_on_a_loop_with_hidden_state(tmp_path):
    check = _module(RESUME_CHECK)
    import jax

    check.test_resume_is_bit_exact(tmp_path / "good")  # the recipe's own loop passes
    calls = []

    def leaky_step(state):  # its key depends on how many steps this process has run
        calls.append(1)
        out = check.train_step({**state, "key": jax.random.fold_in(state["key"], len(calls))})
        return {**out, "key": state["key"]}

    with pytest.raises(AssertionError):
        check.test_resume_is_bit_exact(tmp_path / "leaky", step_fn=leaky_step)


# ------------------------------------------------------------------------ data


def test_stateless_shuffle(runs):
    out = _out(runs, "shuffle").splitlines()
    assert out[0] == "steps per epoch: 6, steps: 18"
    assert out[1] == "seek(t) == t-th batch of the loop, every t: True"
    step13 = json.loads(out[2].removeprefix("step 13's batch: "))
    assert len(step13) == 8 and len(set(step13)) == 8
    assert out[3:] == [
        "epochs are different orders: True",
        "each epoch is a permutation: True",
        "batch rows: (8, 3)",
    ]


def test_stateless_shuffle_functions():
    shuffle = _module(STATELESS_SHUFFLE)
    import jax

    key = jax.random.key(0)
    walked = list(shuffle.iterate(key, epochs=2))
    for t in (0, 5, 6, 11):
        assert np.array_equal(shuffle.batch_indices(key, t), walked[t])
    assert not np.array_equal(shuffle.batch_indices(key, 0), shuffle.batch_indices(key, 6))
    assert not np.array_equal(shuffle.epoch_order(jax.random.key(1), 0),
                              shuffle.epoch_order(key, 0))


# ---------------------------------------------------------------------- hashing


def test_pytree_hash_claims(runs):
    out = _out(runs, "hash").splitlines()
    assert re.fullmatch(r"hash: [0-9a-f]{16}", out[0])
    assert out[1] == "same values, big-endian array: same hash: True"
    assert len(out) == 8 and all(line.endswith(": True") for line in out[1:])


def test_pytree_hash_function():
    recipe = _module(PYTREE_HASH)
    import jax

    tree = {"a": np.arange(3, dtype=np.int32), "k": jax.random.key(7)}
    assert recipe.tree_hash(tree) == recipe.tree_hash(dict(tree))
    assert recipe.tree_hash(tree) != recipe.tree_hash({**tree, "k": jax.random.key(8)})
    assert recipe.tree_hash([1, 2]) != recipe.tree_hash([2, 1])
    assert recipe.tree_hash({"a": np.zeros(2, np.float32)}) != recipe.tree_hash(
        {"a": np.zeros(2, np.float64)})


def test_divergence_finder(runs, work):
    out = _out(runs, "divergence").splitlines()
    assert out == [
        "run A vs run A again: None",
        "run A vs run B: first divergent step 6, leaf ['dense']['b']",
    ]
    rows = [json.loads(line) for line in (work / "logs" / "b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10))
    assert set(rows[0]["leaves"]) == {"['dense']['b']", "['dense']['w']"}


def test_first_divergence_on_hand_written_logs(tmp_path):
    finder = _module(DIVERGENCE_FINDER)

    def log(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"step": s, "leaves": lv}) + "\n" for s, lv in rows))
        return path

    a = log("a", [(0, {"x": "1", "y": "1"}), (1, {"x": "2", "y": "2"}), (2, {"x": "3", "y": "3"})])
    b = log("b", [(0, {"x": "1", "y": "1"}), (1, {"x": "2", "y": "9"}), (2, {"x": "0", "y": "0"})])
    c = log("c", [(0, {"x": "1", "y": "1"}), (1, {"x": "2"})])  # a leaf missing at step 1
    d = log("d", [(5, {"x": "1", "y": "1"})])
    assert finder.first_divergence(a, a) is None
    assert finder.first_divergence(a, b) == (1, "y")
    assert finder.first_divergence(a, c) == (1, "y")
    with pytest.raises(ValueError, match="not aligned"):
        finder.first_divergence(a, d)


# ------------------------------------------------------------------- multi-host


def multihost_claims(global_rows: int) -> list[str]:
    """What the multi-host recipe prints on each process (after ``process i of n: ``)."""
    return [
        "the seed is the same on all processes: True",
        "the init key is the same on all processes: True",
        "the data keys differ between processes: True",
        f"global batch ({global_rows}, 3), this process holds its own rows: True",
    ]


def test_multihost_single_process(runs):
    out = _out(runs, "multihost_single").splitlines()
    assert out == [f"process 0 of 1: {claim}" for claim in multihost_claims(4)]


@pytest.mark.parametrize("pid", [0, 1])
def test_multihost_two_real_processes(runs, pid):
    out = _out(runs, f"multihost_{pid}")
    mine = [ln for ln in out.splitlines() if ln.startswith(f"process {pid} of 2:")]
    assert [ln.split(": ", 1)[1] for ln in mine] == multihost_claims(8), out


# --------------------------------------------------------------- numerics, devices


def test_grad_accumulation(runs):
    out = _out(runs, "accumulation").splitlines()
    assert out[0] == "4 x 8 accumulated == 1 x 32 full batch: True"
    measured = [re.fullmatch(r".* \(measured\): (True|False)", line) for line in out[1:]]
    assert len(measured) == 3 and all(measured), out


def test_multisteps_running_mean_is_not_sum_over_k():
    # Why MultiSteps promises no bits: its accumulator is a running mean,
    # acc + (g - acc) / (n + 1), and that rounds differently from sum / k.
    import jax.numpy as jnp
    import optax

    grads = [np.float32(v) for v in (0.1, 0.7, 0.3, 0.9)]
    opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=4)
    state = opt.init(jnp.float32(0))
    for g in grads:
        update, state = opt.update(jnp.float32(g), state, jnp.float32(0))
    running = np.float32(0)
    for n, g in enumerate(grads):
        running = running + (g - running) / np.float32(n + 1)
    assert np.float32(-update) == running  # MultiSteps is exactly this formula
    # ...which is not sum / k (the numbers docs/recipes.md quotes; IEEE float32 on any machine).
    assert running == np.float32(0.49999997)
    assert sum(grads, np.float32(0)) / np.float32(4) == np.float32(0.5)


def test_sharded_init_same_bits(runs):
    out = _out(runs, "sharded").splitlines()
    assert out == [
        "devices: 4, mesh: {'data': 2, 'model': 2}",
        "jax_threefry_partitionable: True",
        "['dense']['b']     (128,) -> shards (64,)",
        "['dense']['w']     (32, 128) -> shards (32, 64)",
        "['embed']          (64, 32) -> shards (32, 16)",
        "sharded init == unsharded init, every leaf: True",
    ]


def test_gpu_determinism_on_cpu(runs):
    out = _out(runs, "gpu").splitlines()
    assert out == [
        # The environment's other flags are kept, its autotune level replaced.
        f"XLA_FLAGS: {KEPT_FLAG} --xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0",
        "jax_default_matmul_precision: highest",
        "backend: cpu",
        "two runs, recompiled in between, identical: True",
        "on cpu the GPU flags had no effect: XLA:CPU is deterministic without them",
    ]
