"""Site-wide rules: snippets are included and tested, skips are rare, pages are in the nav.

Sybil reads raw Markdown, so it never sees what ``--8<--`` includes: every
file in ``snippets/`` must be included by some page *and* run by a test in
``tests/snippets/`` (``snippets/<chapter>/`` lines up with
``tests/snippets/test_<chapter>.py``).
"""

from __future__ import annotations

import re

import pytest
import yaml
from docs_tools import DOCS_DIR, REPO_ROOT, SNIPPETS_DIR
from docs_tools.markdown import parse_page

PAGES = sorted(DOCS_DIR.rglob("*.md"))
SNIPPETS = sorted(p for p in SNIPPETS_DIR.rglob("*.py") if "__pycache__" not in p.parts)
SNIPPET_TESTS = sorted((REPO_ROOT / "tests" / "snippets").glob("test_*.py"))
MAX_SKIPS = 5


def _rel(path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


@pytest.fixture(scope="module")
def pages():
    return {p: parse_page(p) for p in PAGES}


def test_there_are_snippets_and_tests():
    assert SNIPPETS, "snippets/ is empty"
    assert SNIPPET_TESTS, "tests/snippets/ has no tests"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=_rel)
def test_every_snippet_is_included_by_a_page(snippet, pages):
    rel = _rel(snippet)
    including = [p for p, page in pages.items() if rel in page.includes]
    assert including, f'{rel} is not included by any docs page (--8<-- "{rel}")'


@pytest.mark.parametrize("snippet", SNIPPETS, ids=_rel)
def test_every_snippet_has_its_own_test(snippet):
    rel = _rel(snippet)
    chapter = snippet.relative_to(SNIPPETS_DIR).parts[0]
    test_file = REPO_ROOT / "tests" / "snippets" / f"test_{chapter}.py"
    assert test_file.exists(), f"{rel}: expected its tests in {_rel(test_file)}"
    assert rel in test_file.read_text(encoding="utf-8"), (
        f"{rel} is not referenced by {_rel(test_file)}: Sybil does not run included "
        "snippets, so each one needs a test that runs it and checks what it prints"
    )


def test_every_include_exists(pages):
    missing = [
        f"{_rel(p)}: {inc}"
        for p, page in pages.items()
        for inc in page.includes
        if not (REPO_ROOT / inc).is_file()
    ]
    assert not missing


def test_skips_are_few_and_explained(pages):
    skips = [(p, b) for p, page in pages.items() for b in page.blocks if b.skip_reason]
    assert len(skips) <= MAX_SKIPS, [f"{_rel(p)}:{b.line} {b.skip_reason}" for p, b in skips]
    for p in PAGES:
        text = p.read_text(encoding="utf-8")
        assert not re.search(r"doctest:.*\+SKIP", text), (
            f'{_rel(p)}: use <!-- skip: next "reason" --> instead of doctest +SKIP'
        )


def test_commands_for_readers_to_type_are_tested(pages):
    """`$ jpr …` and `$ python -m jpr…` lines belong in ```console blocks (which run)."""
    problems = []
    for p, page in pages.items():
        for b in page.blocks:
            if b.lang == "console" or b.skip_reason:
                continue
            for line in b.source.splitlines():
                if re.match(r"\s*\$ (jpr|python -m jpr|python snippets/)", line):
                    problems.append(f"{_rel(p)}:{b.line}: ```{b.lang} block has {line.strip()!r}")
    assert not problems, "\n".join(problems)


def test_every_page_ends_with_what_to_read_next(pages):
    problems = []
    for p, page in pages.items():
        headings = re.findall(r"^## (.+)$", page.text, re.MULTILINE)
        if not headings or headings[-1].strip().lower() != "what to read next":
            problems.append(_rel(p))
    assert not problems, f"these pages do not end with '## What to read next': {problems}"


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
_Loader.add_constructor("!ENV", lambda loader, node: None)


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out.extend(_nav_files(value))
        elif isinstance(value, str) and not value.startswith(("http://", "https://")):
            out.append(value)
    return out


def test_every_page_is_in_the_nav():
    config = yaml.load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)
    nav = set(_nav_files(config["nav"]))
    pages = {p.relative_to(DOCS_DIR).as_posix() for p in PAGES}
    assert pages - nav == set(), "pages missing from mkdocs.yml's nav"
    assert {n for n in nav if n.endswith(".md")} - pages == set(), "nav entries with no page"
