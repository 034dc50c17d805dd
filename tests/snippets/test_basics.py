"""Tests of snippets/basics/ (included by docs/basics.md)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from docs_tools import REPO_ROOT

HIDDEN_STATE = "snippets/basics/hidden_state.py"


@pytest.fixture
def hidden_state():
    """The snippet as a module; NumPy's global RNG is put back afterwards."""
    saved = np.random.get_state()
    spec = importlib.util.spec_from_file_location("hidden_state", REPO_ROOT / HIDDEN_STATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    np.random.set_state(saved)


def test_a_library_call_moves_the_global_seed(hidden_state):
    alone = hidden_state.global_seed(call_library=False)
    after = hidden_state.global_seed(call_library=True)
    assert not np.array_equal(alone, after)
    np.random.seed(0)
    assert np.array_equal(alone, np.random.rand(3))  # alone = the seeded stream


def test_explicit_generators_and_keys_ignore_it(hidden_state):
    for fn in (hidden_state.explicit_generator, hidden_state.jax_key):
        assert np.array_equal(fn(call_library=False), fn(call_library=True))


def test_it_prints_three_verdicts(hidden_state, capsys):
    hidden_state.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9
    verdicts = [ln.split()[-1] for ln in lines if "same numbers:" in ln]
    assert verdicts == ["False", "True", "True"]
    assert lines[0].startswith("np.random.seed(0):")
