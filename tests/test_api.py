"""The public API in a loop jpr did not write: traces, verified checkpoints, jpr.testing.

The first test is the issue's "done when": a script outside the repository,
with its own Flax NNX model and Optax loop and nothing but ``import jpr``,
writes traces that ``jpr compare`` (a real process) matches and names, and
resumes from a verified checkpoint in a fresh process, bit for bit.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpr
import jpr.testing
from jpr.compare import MATCH_LINE
from jpr.record import read_record

SRC = Path(__file__).resolve().parents[1] / "src" / "jpr"

SCRIPT = textwrap.dedent(
    '''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    import jpr

    class Net(nnx.Module):
        def __init__(self, *, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.drop = nnx.Dropout(0.3, rngs=rngs)
            self.fc = nnx.Linear(4 * 6 * 6, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.drop(nnx.relu(self.conv(x))).reshape(x.shape[0], -1))

    root = jpr.root_key(7)
    gen = np.random.default_rng(1)
    images = gen.normal(size=(64, 6, 6, 1)).astype(np.float32)
    labels = gen.integers(0, 3, size=64)

    def build():
        rngs = nnx.Rngs(params=jpr.stream_key(root, "params"),
                        dropout=jpr.stream_key(root, "dropout"))
        model = Net(rngs=rngs)
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    model_def, opt_def = (nnx.graphdef(n) for n in build())

    def init():
        model, opt = build()
        return {"model": nnx.state(model), "opt": nnx.state(opt), "root": root,
                "data": {"pos": 0}}

    @jax.jit
    def train_step(ms, os_, x, y):
        model, opt = nnx.merge(model_def, ms), nnx.merge(opt_def, os_)
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state(model), nnx.state(opt), loss

    def step(state, t):
        order = jax.random.permutation(jpr.step_key(root, "data", state["data"]["pos"] // 4), 64)
        rows = np.asarray(order[(state["data"]["pos"] % 4) * 16:][:16])
        ms, os_, loss = train_step(state["model"], state["opt"], images[rows], labels[rows])
        return {**state, "model": ms, "opt": os_, "data": {"pos": state["data"]["pos"] + 1}}, loss

    def nudge(ms):
        k = ms["fc"]["kernel"]
        bits = jax.lax.bitcast_convert_type(k[...], jnp.uint32)
        k[...] = jax.lax.bitcast_convert_type(bits.at[0, 0].add(1), jnp.float32)

    def train(steps, out, nudge_after=None):
        state = init()
        with jpr.Tracer(out, config={"seed": 7}) as tracer:
            for t in range(steps):
                state, loss = step(state, t)
                if t + 1 == nudge_after:
                    nudge(state["model"])
                tracer.step(t + 1, state["model"], loss=loss)
        return state

    if sys.argv[1] == "train":
        a = train(6, "a.json")
        train(6, "b.json")
        train(6, "c.json", nudge_after=3)
        state = init()
        for t in range(3):
            state, _ = step(state, t)
        with jpr.Checkpointer("ckpt") as ckpt:
            ckpt.save_pytree(3, state, config={"seed": 7})
        print(json.dumps({"straight": jpr.hash_pytree(a)}))
    else:  # a fresh process resumes
        with jpr.Checkpointer("ckpt") as ckpt:
            state, meta = ckpt.restore_pytree(ckpt.latest(), template=init(), config={"seed": 7})
        count = int(state["model"]["drop"]["rngs"]["count"][...])
        for t in range(3, 6):
            state, _ = step(state, t)
        print(json.dumps({"resumed": jpr.hash_pytree(state), "count": count,
                          "key": str(state["root"].dtype), "keys": sorted(meta["keys"]),
                          "data": state["data"]}))
    '''
)


def _python(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def test_a_script_of_its_own_traces_compares_and_resumes_bit_exact(tmp_path):
    (tmp_path / "own_loop.py").write_text(SCRIPT)
    first = _python(tmp_path, "own_loop.py", "train")
    assert first.returncode == 0, first.stderr
    same = _python(tmp_path, "-m", "jpr", "compare", "a.json", "b.json")
    assert (same.returncode, same.stdout.splitlines()[0]) == (0, MATCH_LINE), same.stderr
    nudged = _python(tmp_path, "-m", "jpr", "compare", "a.json", "c.json")
    assert nudged.returncode == 1, nudged.stderr
    assert "first divergence: step 3 in fc/kernel/value; train loss 0 ULP apart" in nudged.stdout
    resumed = _python(tmp_path, "own_loop.py", "resume")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    assert got["resumed"] == json.loads(first.stdout)["straight"]
    assert (got["count"], got["key"], got["data"]) == (3, "key<fry>", {"pos": 6})
    assert got["keys"] == ["model/drop/rngs/key/value", "root"]
    assert read_record(tmp_path / "a.json")["schema"] == "jpr.trace/1"


# -- jpr.testing catches the two classic bugs ------------------------------------------

ROOT = jax.random.key(0)
DATA = np.arange(40, dtype=np.float32).reshape(10, 4)


@jax.jit
def _update(w, x, key):
    w = w + 0.1 * x * jax.random.uniform(key, w.shape)  # "dropout": a random mask per step
    return w, (w**2).sum()


def _right_step(state, t):
    key = jpr.step_key(ROOT, "dropout", t)
    w, loss = _update(state["w"], DATA[state["pos"]], key)
    return {"w": w, "pos": state["pos"] + 1}, loss


def _right_init():
    return {"w": jnp.zeros(4), "pos": 0}


def test_a_correct_loop_passes_both_checks(tmp_path):
    entries = jpr.testing.assert_reproducible(_right_init, _right_step, steps=5)
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5]
    jpr.testing.assert_resume_equivalent(
        _right_init, _right_step, steps=5, at=2, directory=tmp_path / "ck"
    )
    assert (tmp_path / "ck" / "2").is_dir()  # a real Orbax checkpoint on disk


def test_key_reused_across_steps_after_resume_is_caught():
    # The bug: the dropout key comes from a split chain held by the loop, not the
    # state. A resumed process starts the chain again: step 3 reuses step 1's key.
    chain = {}

    def init():
        chain["key"] = jax.random.key(0)
        return _right_init()

    def step(state, t):
        chain["key"], key = jax.random.split(chain["key"])
        w, loss = _update(state["w"], DATA[state["pos"]], key)
        return {"w": w, "pos": state["pos"] + 1}, loss

    jpr.testing.assert_reproducible(init, step, steps=4)  # each run is deterministic...
    with pytest.raises(AssertionError) as e:
        jpr.testing.assert_resume_equivalent(init, step, steps=4, at=2)
    assert str(e.value) == (  # ...but a resume is not exact
        "resume after step 2 is not exact: the runs first differ after step 3 "
        "(they agree up to step 2) in w; the loss differs too"
    )


def test_data_order_reset_on_resume_is_caught(tmp_path):
    # The bug: the loader keeps its position itself, so a fresh process starts over.
    loader = {}

    def init():
        loader["pos"] = 0
        return {"w": jnp.zeros(4)}

    def step(state, t):
        x, loader["pos"] = DATA[loader["pos"]], loader["pos"] + 1
        w, loss = _update(state["w"], x, jpr.step_key(ROOT, "dropout", t))
        return {"w": w}, loss

    with pytest.raises(AssertionError) as e:
        jpr.testing.assert_resume_equivalent(init, step, steps=5, at=3, directory=tmp_path)
    assert str(e.value) == (
        "resume after step 3 is not exact: the runs first differ after step 4 "
        "(they agree up to step 3) in w; the loss differs too"
    )


def test_a_checkpoint_whose_bytes_changed_names_the_leaf(tmp_path):
    tree = {"w": np.arange(1000, dtype=np.float32), "key": jax.random.key(3), "pos": 5}
    with jpr.Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save_pytree(1, tree)
    # Change one value on disk through Orbax itself, leaving the metadata (and the
    # hashes stored in it) as they were.
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as raw:
        path = tmp_path / "ck" / "1" / "state"
        stored = raw.restore(path)
        stored["w"] = np.asarray(stored["w"]).copy()
        stored["w"][7] += 1
        raw.save(path, stored, force=True)
    corrupt = pytest.raises(jpr.CorruptCheckpoint, match="checkpoint step 1 is corrupt: w does")
    with jpr.Checkpointer(tmp_path / "ck", read_only=True) as ckpt, corrupt:
        ckpt.restore_pytree(1, template=tree)


# -- the module graph ------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """The jpr modules ``path`` imports anywhere (functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jpr")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jpr"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if (SRC / f"{a.name}.py").exists() and node.module == "jpr"
                          else node.module)
    return found


def test_every_module_imports_and_the_import_graph_has_no_cycle():
    names = {p.stem: p for p in SRC.glob("*.py")}
    graph = {}
    for stem, path in names.items():
        module = "jpr" if stem == "__init__" else f"jpr.{stem}"
        if stem != "__main__":
            importlib.import_module(module)
        graph[module] = _imports(path) - {module}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, m, dep])
            if dep not in state:
                visit(dep, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "jpr.cli" not in set().union(*(graph[m] for m in graph if m != "jpr.__main__"))


def test_import_jpr_is_light_and_exports_its_api():
    code = "import jpr, sys; print('jax' in sys.modules, sorted(jpr.__all__) == jpr.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "True"], out.stderr
    for name in jpr.__all__:
        assert getattr(jpr, name) is not None
    with pytest.raises(AttributeError):
        jpr.no_such_name  # noqa: B018
