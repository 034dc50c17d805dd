"""The ``>>>`` examples in every src/jpr docstring (and verify_setup.py) run and pass."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import jpr

REPO = Path(__file__).resolve().parents[1]

# ``jpr.__main__`` runs the CLI when imported.
MODULES = sorted(
    f"jpr.{m.name}" for m in pkgutil.iter_modules(jpr.__path__) if m.name != "__main__"
)


def run_doctests(module) -> doctest.TestResults:
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, module.__name__):
        runner.run(test)
    return runner.summarize(verbose=False)


def test_modules_are_discovered():
    assert {"jpr.rng", "jpr.hashing", "jpr.data", "jpr.compare", "jpr.cli"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    result = run_doctests(importlib.import_module(name))
    report = capsys.readouterr().out
    assert result.failed == 0, report


def test_every_library_module_has_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)

    def examples(name: str) -> int:
        module = importlib.import_module(name)
        return sum(len(t.examples) for t in finder.find(module, name))

    without = [n for n in MODULES if examples(n) == 0]
    # Entry-point modules may have none; the library modules all do.
    assert not set(without) & {"jpr.rng", "jpr.hashing", "jpr.config", "jpr.data",
                               "jpr.model", "jpr.train", "jpr.record", "jpr.compare"}


def test_verify_setup_doctests(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("verify_setup", REPO / "verify_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    result = run_doctests(module)
    assert result.attempted > 0
    assert result.failed == 0, capsys.readouterr().out
