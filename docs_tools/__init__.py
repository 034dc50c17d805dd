"""Test machinery for the jpr documentation site (not part of the jpr package).

- :mod:`docs_tools.markdown`: finds the fenced blocks of a page, classifies them
  (doctest, plain Python, executable console, snippet include, other) and finds
  every hash-like string and where it sits.
- :mod:`docs_tools.console`: the ```console block convention (``$ command``
  lines, expected output, ``[exit N]``, ``<TIME>``) and how commands are run.
- :mod:`docs_tools.sybil_docs`: the Sybil parser and evaluators that run every
  block, and ``pytest --update-docs``.
- :mod:`docs_tools.provenance`: the rule that every hash on a page is printed by
  an executed example on that page.
- :mod:`docs_tools.mkdocs_hooks`: renders doctest blocks with the ``pycon``
  lexer, so that the site's copy buttons copy code without prompts and outputs.
"""

from pathlib import Path

#: The repository root (the folder holding mkdocs.yml).
REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = REPO_ROOT / "docs"
SNIPPETS_DIR = REPO_ROOT / "snippets"
