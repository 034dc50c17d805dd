"""The notebook pages under docs/notebooks/: committed clean, and they run clean.

mkdocs-jupyter executes every notebook when the site is built, so a committed
output would only be stale: notebooks are committed without outputs and
execution counts. Each one must also execute without an error (its cells
assert the claims its prose makes), draw at least one figure, and write
nothing to stderr, which would show up on the page.

mkdocs-jupyter renders a notebook's Markdown with nbconvert, so MkDocs never
rewrites its links: a link to ``../pitfalls.md`` would reach the reader as
exactly that. Notebook links are therefore written as site URLs
(``../../pitfalls/``), and checked here against the pages they must reach.
The one file link allowed is the notebook's own name, which mkdocs-jupyter's
``include_source`` copies beside the page as the download.
"""

from __future__ import annotations

import posixpath
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
NOTEBOOK_DIR = DOCS / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

#: Generous: the notebooks take seconds, but CI machines can be slow and busy.
TIMEOUT_S = 600

_IMAGE_TYPES = ("image/png", "image/svg+xml", "image/jpeg")
_LINK = re.compile(r"\]\(([^)\s]+)\)|href=\"([^\"]+)\"")
_LONG_HEX = re.compile(r"\b[0-9a-f]{8,}\b")


def _ids(path: Path) -> str:
    return path.name


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_the_notebook_pages_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"divergence.ipynb", "keys.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_without_outputs(path: Path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.outputs:
            dirty.append(f"cell {i}: {len(cell.outputs)} outputs")
        if cell.execution_count is not None:
            dirty.append(f"cell {i}: execution_count {cell.execution_count}")
        if "execution" in cell.metadata:
            dirty.append(f"cell {i}: execution timing metadata")
    assert not dirty, (
        f"{path.name} was committed with outputs (the site build executes it anyway); "
        "clear all outputs before committing:\n  " + "\n  ".join(dirty)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_prose_has_no_hashes(path: Path):
    """Hashes belong in printed outputs, which the build recomputes, not in prose."""
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type == "markdown":
            found = _LONG_HEX.findall(cell.source)
            assert not found, f"{path.name} cell {i}: hash-like strings in prose: {found}"


def _source_page(url_path: str) -> list[Path]:
    """The docs sources that MkDocs would build at the site-relative ``url_path``."""
    p = url_path.strip("/")
    if not p:
        return [DOCS / "index.md"]
    return [DOCS / f"{p}.md", DOCS / p / "index.md", DOCS / f"{p}.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_links_reach_pages_of_the_site(path: Path):
    page_url = f"notebooks/{path.stem}/"  # use_directory_urls (the MkDocs default)
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    problems = []
    links = 0
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type != "markdown":
            continue
        for m in _LINK.finditer(cell.source):
            href = (m.group(1) or m.group(2)).split("#")[0]
            if not href or re.match(r"[a-z][a-z0-9+.-]*:", href):
                continue  # an anchor on this page, or an absolute URL
            links += 1
            if href == path.name:
                # The notebook itself: include_source copies it beside the page.
                if not re.search(r"include_source:\s*true", nav):
                    problems.append(f"cell {i}: {href} needs include_source: true")
                continue
            if href.endswith((".md", ".ipynb")) or not href.endswith("/"):
                problems.append(f"cell {i}: {href} is a file path; write the page's URL")
                continue
            target = posixpath.normpath(posixpath.join(page_url, href))
            if target.startswith(".."):
                problems.append(f"cell {i}: {href} leaves the site")
                continue
            sources = [s for s in _source_page(target) if s.is_file()]
            if not sources:
                problems.append(f"cell {i}: {href} -> /{target}/ has no page in docs/")
            elif sources[0].relative_to(DOCS).as_posix() not in nav:
                problems.append(f"cell {i}: {href} -> {sources[0].name} is not in the nav")
    assert links, f"{path.name} links to no other page (end it with what to read next)"
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_in_the_nav(path: Path):
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    assert f"notebooks/{path.name}" in nav, f"{path.name} is missing from mkdocs.yml's nav"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_executes_without_errors_and_draws(path: Path):
    nb = _read(path)
    client = NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    elapsed = time.monotonic() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if any(t in o.get("data", {}) for t in _IMAGE_TYPES)]
    assert images, f"{path.name} drew no figure"
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"{path.name} wrote to stderr (it would show on the page):\n" + "".join(
        stderr
    )
    print(f"{path.name}: executed in {elapsed:.1f} s, {len(images)} figures")
