"""``jpr explain`` and ``jpr doctor --program``: the named operation, exit codes, bad input.

The three known cases on real run records (a lower CPU target, 1 vs 2
devices, a perturbation) run on the docs page (docs/explain.md), in real
subprocesses; here: the engine on hand-made pairs of functions, the command's
exit codes, and the program check. No float-derived hash or ULP count is
hard-coded: they depend on the CPU.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jpr import cli
from jpr.explain import first_divergent_op, format_report, program_risks
from jpr.record import SCHEMA, write_json_atomic


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, ln in enumerate(lines) if text in ln)


def _pair(op):
    def step(w, x):
        h = jnp.tanh(x @ w)
        z = op(h * 3.0)  # the one operation that differs
        return (z + 1.0).mean(), h

    return step


def test_a_pair_differing_in_one_operation_names_it_and_its_line():
    w = jnp.linspace(-0.5, 0.5, 32).reshape(8, 4)
    x = jnp.linspace(0.0, 1.0, 64).reshape(8, 8)
    f, g = _pair(jnp.exp), _pair(jnp.exp2)
    op = first_divergent_op(jax.jit(f), jax.jit(g), (w, x))
    assert (op["primitive"], op["primitive_b"]) == ("exp", "exp2")
    line = _line_of(f, "the one operation that differs")
    assert op["source"].endswith(f"test_explain.py:{line} (_pair.<locals>.step)")
    assert op["path"] == ["jit step"]
    assert op["confirmed"] and op["max_ulps"] > 0 and op["elements_differ"] > 0
    assert op["in_shapes"] == [[8, 4]] and op["out_shapes"] == [[8, 4]]
    # the same function twice: nothing to name
    assert first_divergent_op(jax.jit(f), jax.jit(_pair(jnp.exp)), (w, x)) is None


def test_inside_a_scan_it_names_the_operation_and_the_first_iteration():
    def make(op):
        def f(xs):
            def body(c, x):
                y = op(jax.nn.relu(x))  # zero for the first half: the same bits there
                return c + y, y

            return jax.lax.scan(body, 0.0, xs)

        return jax.jit(f)

    xs = jnp.linspace(-1.0, 1.0, 16)
    op = first_divergent_op(make(jnp.sin), make(jnp.tanh), (xs,))
    assert (op["primitive"], op["primitive_b"]) == ("sin", "tanh")
    assert op["path"] == ["jit f", "scan (length 16)"]
    assert op["iteration"] == [8]  # relu(x) > 0 from the ninth element on


MODEL = '''
import jax.numpy as jnp


def loss(w, idx, v):
    table = jnp.zeros(8).at[idx].add(v * w)  # repeated indices: atomics on GPU
    return table.sum()


def program():
    return loss, (jnp.float32(2.0), jnp.array([1, 3, 1, 1]), jnp.ones(4))
'''


def test_doctor_program_names_the_scatter_add_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodel.py").write_text(textwrap.dedent(MODEL))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["doctor", "--program", "mymodel:program"]) == 0
    out = capsys.readouterr().out
    assert "1 nondeterministic on some backend" in out
    assert "  scatter-add  float32[8], int32[4, 1], float32[4]" in out
    assert "    at mymodel.py:6 (loss)" in out
    assert "--xla_gpu_deterministic_ops=true" in out and "not measured here" in out
    assert cli.main(["doctor", "--program", "mymodel:program", "--json"]) == 0
    risks = json.loads(capsys.readouterr().out)["risks"]
    named = [(r["primitive"], r["source"]) for r in risks]
    assert named == [("scatter-add", "mymodel.py:6 (loss)")]


def test_unique_indices_are_not_a_risk():
    def f(v):
        return jnp.zeros(4).at[jnp.array([0, 2])].add(v, unique_indices=True)

    assert program_risks(f, (jnp.ones(2),))["risks"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "missing-a.json", "missing-b.json"], "missing-a.json: no such file"),
        (["doctor", "--program", "nocolon"], "--program 'nocolon': expected MODULE:FUNCTION"),
        (["doctor", "--program", "no_such_module_x:f"], "cannot import no_such_module_x"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def _record(traj_hash: str) -> dict:
    leaves = {k: traj_hash for k in ("fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel")}
    return {
        "schema": SCHEMA, "hash": traj_hash, "state_hash": traj_hash, "steps": 1,
        "final": {"loss": 0.5, "acc": 0.5},
        "trajectory": [{"step": 0, "loss": None, "params_hash": traj_hash, "leaves": leaves}],
        "config": {"seed": 0, "batch_size": 64, "lr": 0.001, "dropout": 0.1, "hidden": 32,
                   "features": 64, "classes": 10, "dataset_size": 4096, "eval_size": 1024,
                   "microbatches": None},
        "env": {"XLA_FLAGS": "", "backend": "cpu"}, "leaf_hashes": {}, "backend": "cpu",
        "topology": {"device_count": 1, "process_count": 1},
    }


def test_records_that_do_not_diverge_are_bad_input(tmp_path, capsys):
    a = write_json_atomic(tmp_path / "a.json", _record("aa" * 32))
    b = write_json_atomic(tmp_path / "b.json", _record("aa" * 32))
    assert cli.main(["explain", str(a), str(b)]) == 2
    assert "do not diverge in their recorded trajectories" in capsys.readouterr().err
    assert cli.main(["explain", str(a), str(a)]) == 2
    assert "are the same file" in capsys.readouterr().err


def test_a_replay_that_does_not_match_its_record_exits_1(tmp_path, capsys):
    # made-up hashes: the replays (two real subprocesses) cannot reproduce them
    a = write_json_atomic(tmp_path / "a.json", _record("aa" * 32))
    b = write_json_atomic(tmp_path / "b.json", _record("bb" * 32))
    assert cli.main(["explain", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(
        "not reproduced: the replay of record A does not match its record at step 0"
    )


def test_report_of_inputs_that_differ_blames_no_operation():
    text = format_report({"cause": "inputs", "step": 4, "inputs_differ": ["x", "y"]})
    assert text.splitlines()[1:] == [
        "the inputs of step 4 already differ: x, y",
        "the divergence came from outside the step's program: no operation is to blame",
    ]


def test_through_shard_map_and_custom_jvp():
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("d",))

    def make(op):
        def body(x):
            return jax.lax.psum(op(jax.nn.relu(x)).sum(), "d")

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P()))

    op = first_divergent_op(make(jnp.sin), make(jnp.cos), (jnp.linspace(0.5, 1.0, 8),))
    assert (op["primitive"], op["primitive_b"]) == ("sin", "cos")
    assert op["path"][-1] == "shard_map (1 device)" and op["confirmed"]
