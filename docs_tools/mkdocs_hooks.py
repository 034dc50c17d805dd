"""MkDocs hooks: what the reader copies is what runs, and notebooks run pinned.

A doctest block is written as ```python on a page (Sybil and the hash
provenance check classify it from that fence, see :mod:`docs_tools.markdown`).
Rendered with the Python lexer, its ``>>>``/``...`` prompts and printed
outputs are plain text, and Material's copy button would copy them too: what a
reader pastes is a SyntaxError. This hook renders every doctest block with the
``pycon`` lexer instead, which marks prompts (``.gp``) and outputs (``.go``,
tracebacks ``.gt``/``.gr``) as separate spans. ```console blocks are already
lexed that way. docs/stylesheets/extra.css then hides, while Material copies
(``code[data-md-copying]``), every prompt and every line of these two kinds of
block that holds no prompt, so the copy button gives the code or the commands
only. The page source is not changed: the same blocks still run as doctests.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# MkDocs loads a hook from its file, so the repository root may not be on the path.
if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docs_tools.markdown import parse_page


def as_pycon(markdown: str, path: str = "<page>") -> str:
    """``markdown`` with the fence of every doctest block re-labelled ``pycon``."""
    page = parse_page(path, markdown)
    out, last = [], 0
    for block in page.blocks:
        if block.kind != "doctest":
            continue
        fence_line_end = markdown.index("\n", block.start)
        fence = markdown[block.start : fence_line_end]
        at = fence.index(block.lang)
        out.append(markdown[last : block.start + at])
        out.append("pycon")
        last = block.start + at + len(block.lang)
    out.append(markdown[last:])
    return "".join(out)


def on_page_markdown(markdown: str, *, page: Any, **_: Any) -> str:
    return as_pycon(markdown, page.file.src_path)


def on_config(config: Any) -> Any:
    """The notebooks run under jpr's CPU target.

    mkdocs-jupyter executes the notebooks in kernels that inherit this
    process's environment, so pinning here (see :mod:`jpr.platform`) gives them
    the same ``XLA_FLAGS`` as ``jpr run`` and the docs tests.
    """
    from jpr.platform import pin_cpu_target

    pin_cpu_target()
    return config
