"""The hash-provenance rule: every hash on a page was printed on that page.

A hash-like string (:data:`docs_tools.markdown.HEX_RE`) may appear on a page in
two places only:

1. inside the expected output of a block the tests execute (a doctest's
   output, or a console command's output). Then the test of that block
   compares it with what the code prints: change one character and the block
   fails.
2. anywhere else (prose, tables, code, static blocks, skipped blocks), as long
   as it is a whole printed hash or a part of one (``a9a8ca9f…`` for a
   64-digit hash) from case 1 on the *same page*. A stale hash in a sentence
   is then a failing test, not a silent lie.

Outside checked output, a word that is a hash but for one character (``g``,
an upper-case letter) is an error too: it is what a typo makes of a hash.
Together these make any one-character substitution in any hash of a page fail
the tests. (Dropping the last digit of a quoted prefix leaves a shorter, still
true prefix, which is allowed.)
"""

from __future__ import annotations

import bisect
import dataclasses

from docs_tools.markdown import Page, find_words, is_damaged_hash, is_hash

__all__ = ["Occurrence", "check_word", "occurrences", "printed_hashes", "unproven"]


@dataclasses.dataclass(frozen=True)
class Occurrence:
    """One hash-like (or damaged-hash-like) word on a page."""

    token: str
    start: int
    line: int
    printed: bool  # inside the expected output of an executed block
    damaged: bool = False


def occurrences(page: Page) -> list[Occurrence]:
    """Every hash-like word of the page, and whether it sits in checked output."""
    spans = page.output_spans()
    starts = [a for a, _ in spans]
    out = []
    for m in find_words(page.text):
        word = m.group()
        hashlike, damaged = is_hash(word), is_damaged_hash(word)
        if not (hashlike or damaged):
            continue
        i = bisect.bisect_right(starts, m.start()) - 1
        inside = i >= 0 and spans[i][0] <= m.start() and m.end() <= spans[i][1]
        line = page.text.count("\n", 0, m.start()) + 1
        if inside and not hashlike:
            continue  # in checked output: running the block checks it
        out.append(Occurrence(word, m.start(), line, inside, damaged))
    return out


def printed_hashes(page: Page) -> set[str]:
    """The hashes that executed blocks of the page print."""
    return {o.token for o in occurrences(page) if o.printed}


def check_word(word: str, printed: set[str]) -> str | None:
    """Why ``word`` (outside checked output) breaks the rule, or None if it doesn't."""
    if is_hash(word):
        if any(word in p for p in printed):
            return None
        return "not printed by any executed block of the page"
    if is_damaged_hash(word):
        return "looks like a hash with a typo"
    return None


def unproven(page: Page) -> list[tuple[Occurrence, str]]:
    """The words of the page that break the rule, with the reason."""
    occ = occurrences(page)
    printed = {o.token for o in occ if o.printed}
    out = []
    for o in occ:
        if not o.printed and (why := check_word(o.token, printed)):
            out.append((o, why))
    return out
