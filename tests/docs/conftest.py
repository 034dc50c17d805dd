"""Fixtures for the tests of the docs machinery (docs_tools/)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from docs_tools import sybil_docs


@pytest.fixture
def docs_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> sybil_docs._State:
    """A private docs-test state: its own update list and a temporary snippets folder.

    Pages written by a test run their console commands against ``snippets/``
    in ``tmp_path``, and ``--update-docs`` is off unless the test turns it on.
    """
    snippets = tmp_path / "snippets"
    snippets.mkdir()
    state = sybil_docs._State(update=False, snippets_dir=snippets)
    monkeypatch.setattr(sybil_docs, "STATE", state)
    return state


@pytest.fixture
def write(tmp_path: Path):
    """Write a dedented text file under ``tmp_path`` and return its path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write
