"""Exact values on the reference platform, consistency for float-bound values elsewhere.

The checks run on the real manifest (docs_tools/float_bound.json, measured by
``pytest --update-docs``) and on real lines of the pages it lists.
"""

from __future__ import annotations

import re

import pytest
from docs_tools import REPO_ROOT, float_bound
from docs_tools.float_bound import PageChecker, moved_tokens, tokens

MANIFEST = float_bound.load_manifest()
HEX = re.compile(r"[0-9a-f]{16}")


def page_lines(page: str) -> list[str]:
    return (REPO_ROOT / page).read_text(encoding="utf-8").splitlines()


def bump(token: str) -> str:
    """``token`` with its last hex digit changed."""
    return token[:-1] + ("0" if token[-1] != "0" else "1")


def off_reference(page: str) -> PageChecker:
    return PageChecker(page, exact=False)


def test_the_manifest_was_measured_and_names_the_reference_platform():
    assert MANIFEST["reference"]["platform"].startswith("x86_64 AVX2 (pinned by jpr")
    assert re.fullmatch(r"[0-9a-f]{16}", MANIFEST["reference"]["probe"])
    assert MANIFEST["measured_under"] == f"XLA_FLAGS={float_bound.MEASURE_FLAGS}"
    # Training pages have float-bound values; the canary's are its float draws only.
    assert {"docs/index.md", "docs/full-flow.md", "docs/canary.md"} <= set(MANIFEST["pages"])


def canary_line(label: str) -> str:
    """The first printed line of the canary page that starts with ``label``."""
    return next(ln for ln in page_lines("docs/canary.md") if ln.strip().startswith(label)
                and tokens(ln)[1] and HEX.fullmatch(tokens(ln)[1][-1]))


def test_a_prng_bits_hash_stays_exact_off_the_reference_platform():
    line = canary_line("bits      key(0) uint32[1024]")
    token = tokens(line)[1][-1]
    assert token not in MANIFEST["pages"]["docs/canary.md"]  # measured: bits do not move
    assert not off_reference("docs/canary.md").consistent(line, line.replace(token, bump(token)))


def test_a_float_bound_hash_may_move_off_the_reference_platform_only():
    line = canary_line("normal    key(1) f32[256]")
    token = tokens(line)[1][-1]
    assert token in MANIFEST["pages"]["docs/canary.md"]  # measured: normal() moves
    moved = line.replace(token, bump(token))
    assert off_reference("docs/canary.md").consistent(line, moved)
    assert not PageChecker("docs/canary.md", exact=True).consistent(line, moved)


def index_hashes() -> list[str]:
    return [t for t in MANIFEST["pages"]["docs/index.md"] if len(t) == 64]


def test_equal_hashes_must_stay_equal_and_different_ones_different():
    first, *_ = index_hashes()
    checker = off_reference("docs/index.md")
    assert checker.consistent(f"hash {first}", f"hash {bump(first)}")
    assert checker.consistent(f"hash {first[:16]}", f"hash {bump(first)[:16]}")  # its prefix
    assert not checker.consistent(f"hash {first}", f"hash {'0' * 63}1")  # same on the page
    other = next(t for t in MANIFEST["pages"]["docs/full-flow.md"] if len(t) == 64)
    full_flow = off_reference("docs/full-flow.md")
    assert full_flow.consistent(f"a {other}", f"a {bump(other)}")
    others = [t for t in MANIFEST["pages"]["docs/full-flow.md"] if len(t) == 64 and t != other]
    if others:  # a different hash on the page may not become the same here
        assert not full_flow.consistent(f"b {others[0]}", f"b {bump(other)}")


def test_only_values_move_never_the_words_around_them():
    first = index_hashes()[0]
    checker = off_reference("docs/index.md")
    assert not checker.consistent(f"hash {first}", f"state {bump(first)}")
    assert moved_tokens("loss 1.5 acc 0.5", "loss 1.5") is None


@pytest.mark.parametrize(
    ("want", "got", "ok"),
    [("loss 2.0937", "loss 2.0941", True), ("loss 2.0937", "loss 2.6", False),
     ("12 of 15 leaves", "11 of 15 leaves", True), ("12 of 15 leaves", "12 of 16 leaves", False)],
)
def test_float_bound_numbers(want, got, ok, monkeypatch):
    monkeypatch.setattr(float_bound, "_float_bound", lambda page: frozenset({"2.0937", "12"}))
    assert PageChecker("demo.md", exact=False).consistent(want, got) is ok


def test_the_notice_names_the_platform_and_the_count():
    notice = float_bound.session_notice({"docs/index.md": 3, "docs/usage.md": 4})
    assert notice.startswith("docs: not the reference platform (")
    assert "7 printed value(s) on 2 page(s) depend on float code generation" in notice
    assert float_bound.session_notice({}) is None
