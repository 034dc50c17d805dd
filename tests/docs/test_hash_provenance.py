"""Every hash on a docs page is printed by an executed example on that page.

See docs_tools/provenance.py for the rule. These tests also prove that a
one-character change to any hash in docs/ fails the test suite: a hash in
checked output fails its block (shown by running a mutated copy of the canary
page), and any other hash fails the provenance rule (shown for every hash on
every page).
"""

from __future__ import annotations

import shutil

import pytest
from docs_tools import DOCS_DIR, sybil_docs
from docs_tools.markdown import find_hashes, is_damaged_hash, parse_page
from docs_tools.provenance import check_word, occurrences, printed_hashes, unproven
from sybil.example import SybilFailure

PAGES = sorted(DOCS_DIR.rglob("*.md"))


ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _flip(token: str, i: int) -> str:
    """``token`` with character ``i`` changed to another hex digit."""
    new = "0" if token[i] != "0" else "1"
    return token[:i] + new + token[i + 1 :]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(DOCS_DIR)))
def test_every_hash_on_the_page_is_printed_on_the_page(path):
    if sybil_docs.STATE.update:
        pytest.skip("--update-docs is rewriting pages in this run; run pytest again")
    page = parse_page(path)
    problems = unproven(page)
    assert not problems, (
        f"{path.relative_to(DOCS_DIR.parent)}: every hash on a page must be printed by an "
        "executed block of the same page (see docs_tools/provenance.py):\n"
        + "\n".join(f"  line {o.line}: {o.token}: {why}" for o, why in problems)
    )


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(DOCS_DIR)))
def test_changing_any_character_of_an_unprinted_hash_breaks_provenance(path):
    page = parse_page(path)
    printed = printed_hashes(page)
    for occ in occurrences(page):
        if occ.printed:
            continue  # checked by running its block, see the canary test below
        for i, c in enumerate(occ.token):
            for new in ALNUM.replace(c, ""):
                mutated = occ.token[:i] + new + occ.token[i + 1 :]
                assert check_word(mutated, printed), (occ, mutated)
    # And once through the whole pipeline, on a mutated copy of the page text.
    prose = [o for o in occurrences(page) if not o.printed]
    if prose:
        o = prose[0]
        end = o.start + len(o.token)
        text = page.text[: o.start] + _flip(o.token, len(o.token) - 1) + page.text[end:]
        assert unproven(parse_page(path, text)), f"mutating {o.token} went unnoticed"


def test_the_site_has_printed_hashes():
    printed = sum(len(printed_hashes(parse_page(p))) for p in PAGES)
    assert printed >= 10


def test_a_changed_printed_hash_fails_its_block(tmp_path):
    """A one-character change to a hash in the canary's output fails the page."""
    copy = tmp_path / "canary.md"
    shutil.copy(DOCS_DIR / "canary.md", copy)
    page = parse_page(copy)
    first = next(o for o in occurrences(page) if o.printed)
    mutated = _flip(first.token, len(first.token) // 2)
    end = first.start + len(first.token)
    copy.write_text(page.text[: first.start] + mutated + page.text[end:])
    with pytest.raises(SybilFailure) as failure:
        sybil_docs.run_document(copy)
    message = str(failure.value)
    assert mutated in message and first.token in message  # expected vs got
    assert "pytest --update-docs" in message  # the canary's failure hint


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("state hash a9a8ca9f40847ef2 at step 10", ["a9a8ca9f40847ef2"]),
        ("'52cb4d61d14addbf'", ["52cb4d61d14addbf"]),
        ("deadbeef and acceded are words", []),  # letters only
        ("20250101 and 12345678", []),  # digits only
        ("short: 1a2b3c4", []),  # fewer than 8 digits
        ("0x7feb352d and 0x1.8c4p-3", []),  # hex literals, float hex
        ("'loss_hex': '0x1.9a2c8e0000000p+0'", []),
        ("ABCDEF0123", []),  # upper case is not how hashes are printed
        ("see https://github.com/org/repo/commit/0123abcd4567ef", []),  # URLs ignored
        ("a9a8ca9f40847ef2… (64 digits)", ["a9a8ca9f40847ef2"]),
    ],
)
def test_what_counts_as_a_hash(text, found):
    assert [m.group() for m in find_hashes(text)] == found


@pytest.mark.parametrize(
    ("word", "damaged"),
    [
        ("a9a8ca9f40847efg", True),  # a typo outside hex
        ("a9a8cA9f40847ef2", True),  # upper case
        ("a9a8ca9f40847ef2", False),  # a hash
        ("0x846ca68b", False),  # a hex literal
        ("threefry2x32", False),
        ("bfloat16", False),
    ],
)
def test_damaged_hashes(word, damaged):
    assert is_damaged_hash(word) is damaged
