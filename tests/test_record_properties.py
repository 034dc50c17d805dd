"""Property-based tests of the run-record reader (hypothesis).

Whatever bytes a file holds, ``read_record`` either returns a record that
``compare`` can use without crashing, or raises :class:`JprError` (one line,
exit 2 on the command line): never any other exception. Records written by
``write_json_atomic`` read back equal.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jpr.compare import compare_records, format_result
from jpr.errors import JprError
from jpr.record import SCHEMA, read_record, write_json_atomic

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

H = "ab" * 32
#: A small valid record with every field compare looks at.
VALID = {
    "schema": SCHEMA,
    "hash": H,
    "state_hash": "cd" * 32,
    "steps": 2,
    "batch_size": 64,
    "seed": 0,
    "lr": 0.001,
    "backend": "cpu",
    "final": {"loss": 2.5, "acc": 0.25, "loss_hex": (2.5).hex()},
    "config": {"seed": 0, "lr": 0.001},
    "leaf_hashes": {"params/w": H, "step": H},
    "trajectory": [
        {"step": 0, "loss": None, "params_hash": H, "leaves": {"w": H}},
        {"step": 2, "loss": (2.5).hex(), "params_hash": H, "leaves": {"w": H}},
    ],
    "env": {"jax": "0.10.2", "backend": "cpu"},
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def read_bytes_as_record(folder: Path, raw: bytes):
    p = folder / "r.json"
    p.write_bytes(raw)
    return read_record(p)


def usable_or_refused(folder: Path, raw: bytes) -> bool:
    """True if accepted (and then usable by compare), False if refused with JprError."""
    try:
        rec = read_bytes_as_record(folder, raw)
    except JprError as e:
        assert "\n" not in str(e)
        return False
    for a, b in ((rec, VALID), (VALID, rec), (rec, rec)):
        result = compare_records(a, b, check_metrics=True)
        json.dumps(result)  # what --json prints
        format_result(result)
    return True


def test_the_valid_record_is_accepted(folder):
    assert usable_or_refused(folder, json.dumps(VALID).encode())


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_any_bytes_are_accepted_or_refused_cleanly(folder, raw):
    usable_or_refused(folder, raw)


@SETTINGS
@given(value=json_values)
def test_any_json_value_is_accepted_or_refused_cleanly(folder, value):
    usable_or_refused(folder, json.dumps(value).encode())


def _paths(node, prefix=()):
    """Every path into a JSON tree (dict keys and list indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        yield (*prefix, k)
        if isinstance(v, (dict, list)):
            yield from _paths(v, (*prefix, k))


PATHS = sorted(_paths(VALID), key=str)


@st.composite
def mutated_records(draw):
    """VALID with one field anywhere replaced by any JSON value, or removed."""
    rec = copy.deepcopy(VALID)
    *parents, key = draw(st.sampled_from(PATHS))
    node = rec
    for k in parents:
        node = node[k]
    if isinstance(node, dict) and draw(st.booleans()):
        del node[key]
    else:
        node[key] = draw(json_values)
    return rec


@SETTINGS
@given(rec=mutated_records())
def test_any_changed_field_is_accepted_or_refused_cleanly(folder, rec):
    usable_or_refused(folder, json.dumps(rec).encode())


@SETTINGS
@given(data=st.data())
def test_a_truncated_record_is_refused(folder, data):
    raw = json.dumps(VALID, indent=2).encode()
    cut = data.draw(st.integers(0, len(raw) - 2))
    assume(raw[:cut].strip())  # empty is its own message, tested elsewhere
    with pytest.raises(JprError, match="not valid JSON"):
        read_bytes_as_record(folder, raw[:cut])


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b'{"schema": 1' + b"1" * 5000 + b"}", b"\xff\xfe{", b"{}" * 3, b"\x00"],
    ids=["nested too deep", "integer too long", "not UTF-8", "two objects", "NUL"],
)
def test_pathological_json_is_refused(folder, raw):
    with pytest.raises(JprError):
        read_bytes_as_record(folder, raw)


@settings(max_examples=40, deadline=None)  # each one fsyncs
@given(value=st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_what_write_json_atomic_writes_reads_back_equal(folder, value):
    p = write_json_atomic(folder / "w.json", value)
    assert json.loads(p.read_text(encoding="utf-8")) == value
    assert sorted(x.name for x in folder.iterdir() if x.name.startswith(".w.json")) == []
