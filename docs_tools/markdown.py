"""Find and classify the fenced code blocks of a Markdown page.

One scanner serves both the Sybil parser (what runs) and the hash-provenance
check (what was printed by something that ran), so the two can never disagree
about which block is which.

Block kinds:

``doctest``
    a ```python block whose first line starts with ``>>>``; each example's
    output is compared with what is written below it.
``python``
    any other ```python block; it is executed (and must print nothing, since a
    reader could not see what it printed: write a doctest instead).
``include``
    a ```python block holding only ``--8<-- "snippets/..."`` lines; pymdownx
    includes the file when the site is built. Sybil does not run it: each
    snippet has its own test under ``tests/snippets/``.
``console``
    a ```console block whose ``$`` commands are all executable (``jpr …``,
    ``python -m jpr…``, ``python snippets/….py``); see :mod:`docs_tools.console`.
``static``
    anything else (text, toml, a console block of install commands, ...).

A block is skipped (with a reason, which is required) by an HTML comment on the
line before it, in Sybil's syntax: ``<!-- skip: next "why it cannot run here" -->``.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

from sybil import Document
from sybil.parsers.markdown.lexers import FENCE, RawFencedCodeBlockLexer

from docs_tools import console

__all__ = [
    "HEX_RE",
    "WORD_RE",
    "Block",
    "DocsSyntaxError",
    "Page",
    "find_hashes",
    "find_words",
    "is_damaged_hash",
    "is_hash",
    "parse_page",
]

#: A hash-like string: 8 or more lowercase hex digits, standing alone (not part
#: of a longer word, so ``0x7feb352d`` and float hex such as ``0x1.8p-3`` don't
#: count), with at least one digit *and* at least one letter. The letter rules
#: out plain numbers (``20250101``); the digit rules out English words made of
#: a-f (``deadbeef``, ``acceded``). A hash prefix that happens to be all digits
#: (about 2% of 8-digit prefixes) is missed; show 12 or more digits to make
#: that negligible. URLs are ignored (commit links are not our hashes).
HEX_RE = re.compile(
    r"(?<![0-9A-Za-z_])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{8,}(?![0-9A-Za-z_])"
)
_URL_RE = re.compile(r"https?://[^\s)>\]\"']+")
_FLOAT_HEX_RE = re.compile(r"[-+]?0x[0-9a-f]+(?:\.[0-9a-f]*)?p[-+]?\d+", re.IGNORECASE)
#: Any word of 8+ letters and digits: a hash, or what a typo makes of one.
WORD_RE = re.compile(r"(?<![0-9A-Za-z_])[0-9A-Za-z]{8,}(?![0-9A-Za-z_])")

_ONLY_RE = re.compile(
    r"<!--+\s*only on (?P<arch>[a-z0-9_]+):\s*next\s+\"(?P<why>[^\"]+)\"\s*--+>\s*\Z"
)
_SKIP_RE = re.compile(r"<!--+\s*skip:\s*(?P<args>.*?)\s*--+>\s*\Z", re.DOTALL)
_INCLUDE_RE = re.compile(r"""-{1,}8<-{1,}\s+(["'])(?P<path>[^"'\n]+)\1""")
_INCLUDE_LINE_RE = re.compile(r"""^\s*-{1,}8<-{1,}\s+(["'])[^"'\n]+\1\s*$""")
_DOCTEST_SKIP_RE = re.compile(r"doctest:.*\+SKIP")
_HINT_RE = re.compile(r"<!--\s*docs-on-failure:\s*(?P<hint>.*?)\s*-->", re.DOTALL)

PYTHON_LANGS = {"python", "py"}


class DocsSyntaxError(ValueError):
    """A page uses the block conventions wrongly (reported at collection)."""


@dataclasses.dataclass
class Block:
    """One fenced code block of a page.

    Offsets index the page's text: ``start``/``end`` span the whole fence,
    ``body_start``/``body_end`` the lines between the fences.
    """

    kind: str
    lang: str
    info: str
    start: int
    end: int
    body_start: int
    body_end: int
    line: int  # 1-based line of the opening fence
    indent: str  # prefix re-added to every body line when a block is rewritten
    source: str  # body with the indentation removed
    skip_reason: str | None = None
    #: ``(tag, reason)`` from ``<!-- only on x86_64: next "why" -->``: the block
    #: runs on that architecture (or, for ``fma``, on a CPU target with FMA) and
    #: is skipped, saying why, elsewhere.
    only_on: tuple[str, str] | None = None
    includes: list[str] = dataclasses.field(default_factory=list)
    commands: list[console.Command] = dataclasses.field(default_factory=list)

    @property
    def executed(self) -> bool:
        return self.kind in ("doctest", "python", "console") and self.skip_reason is None

    def output_spans(self, text: str) -> list[tuple[int, int]]:
        """Spans of ``text`` (the page) holding expected output of this block."""
        if self.kind == "doctest":
            spans = []
            for want_start, want_end in doctest_want_spans(self.source):
                spans.append(
                    (self._page_offset(text, want_start), self._page_offset(text, want_end))
                )
            return spans
        if self.kind == "console":
            spans = []
            lines = self.source.splitlines(keepends=True)
            offsets = [0]
            for ln in lines:
                offsets.append(offsets[-1] + len(ln))
            for cmd in self.commands:
                a, b = cmd.output_line_range
                if a < b:
                    spans.append(
                        (
                            self._page_offset(text, offsets[a]),
                            self._page_offset(text, offsets[b]),
                        )
                    )
            return spans
        return []

    def _page_offset(self, text: str, source_offset: int) -> int:
        """Map an offset in :attr:`source` (dedented) to an offset in the page."""
        # Walk the body line by line: each source line sits in the page after the
        # indentation that was stripped from it.
        page_pos = self.body_start
        src_pos = 0
        for src_line in self.source.splitlines(keepends=True):
            page_line_end = text.find("\n", page_pos, self.body_end)
            page_line_end = self.body_end if page_line_end < 0 else page_line_end + 1
            stripped = (page_line_end - page_pos) - len(src_line)
            if source_offset < src_pos + len(src_line):
                return page_pos + stripped + (source_offset - src_pos)
            src_pos += len(src_line)
            page_pos = page_line_end
        return self.body_end


@dataclasses.dataclass
class Page:
    """A parsed page: its text, its blocks and its snippet includes."""

    path: Path
    text: str
    blocks: list[Block]
    includes: list[str]  # every --8<-- path on the page, in order
    failure_hint: str | None = None

    @property
    def executed_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.executed]

    def output_spans(self) -> list[tuple[int, int]]:
        spans = []
        for b in self.executed_blocks:
            spans.extend(b.output_spans(self.text))
        return sorted(spans)


def doctest_want_spans(source: str) -> list[tuple[int, int]]:
    """Spans of the expected-output parts of the doctest examples in ``source``."""
    import doctest

    spans = []
    for m in doctest.DocTestParser._EXAMPLE_RE.finditer(source):  # type: ignore[attr-defined]
        if m.group("want") and not _DOCTEST_SKIP_RE.search(m.group("source")):
            spans.append((m.start("want"), m.end("want")))
    return spans


def _mask_urls(text: str) -> str:
    """``text`` with URLs and float hex literals (``0x1.9a2cp+0``) blanked out."""
    text = _URL_RE.sub(lambda m: " " * len(m.group()), text)
    return _FLOAT_HEX_RE.sub(lambda m: " " * len(m.group()), text)


def find_hashes(text: str) -> Iterator[re.Match[str]]:
    """Every hash-like string in ``text`` (see :data:`HEX_RE`), URLs excluded."""
    return HEX_RE.finditer(_mask_urls(text))


def find_words(text: str) -> Iterator[re.Match[str]]:
    """Every word of 8+ letters and digits in ``text``, URLs excluded."""
    return WORD_RE.finditer(_mask_urls(text))


def is_hash(word: str) -> bool:
    """Whether a whole word is hash-like (see :data:`HEX_RE`)."""
    return HEX_RE.fullmatch(word) is not None


def is_damaged_hash(word: str) -> bool:
    """Whether a word is a hash with one character that is not a lowercase hex digit.

    That is what a one-character typo (``g``, ``A``) does to a hash: it stops
    being hash-like, so without this check it would escape the provenance rule.
    Hex literals (``0x7feb352d``) are not hashes.
    """
    if word.startswith(("0x", "0X")):
        return False
    odd = [i for i, c in enumerate(word) if c not in "0123456789abcdef"]
    if len(odd) != 1:
        return False
    rest = word[: odd[0]] + word[odd[0] + 1 :]
    return any(c.isdigit() for c in rest) and any(c in "abcdef" for c in rest)


def _lang(info: str) -> str:
    info = info.strip()
    if info.startswith("{"):
        m = re.search(r"\.([\w+-]+)", info)
        return m.group(1) if m else ""
    return info.split()[0] if info else ""


def _only_on(text: str, fence_start: int) -> tuple[str, str] | None:
    """The ``<!-- only on ARCH: next "why" -->`` comment just before a fence."""
    before = text[:fence_start].rstrip()
    m = _ONLY_RE.match(before, before.rfind("<!--")) if before.endswith("-->") else None
    return (m.group("arch"), m.group("why")) if m else None


def _skip_reason(text: str, fence_start: int, path: str, line: int) -> str | None:
    """The reason of a ``<!-- skip: next "..." -->`` comment just before a fence."""
    before = text[:fence_start].rstrip()
    if not before.endswith("-->"):
        return None
    opening = before.rfind("<!--")
    m = _SKIP_RE.match(before, opening)
    if m is None:
        return None
    args = m.group("args")
    action, _, reason = args.partition(" ")
    if action != "next":
        raise DocsSyntaxError(
            f"{path}:{line}: only '<!-- skip: next \"reason\" -->' is supported, got {args!r}"
        )
    try:
        value = ast.literal_eval(reason.strip()) if reason.strip() else None
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, str) or not value.strip():
        raise DocsSyntaxError(
            f'{path}:{line}: a skip needs a written reason: <!-- skip: next "why" -->'
        )
    return value.strip()


def _classify(block: Block, path: str) -> None:
    where = f"{path}:{block.line}"
    if block.lang in PYTHON_LANGS:
        lines = [ln for ln in block.source.splitlines() if ln.strip()]
        include_lines = [ln for ln in lines if _INCLUDE_LINE_RE.match(ln)]
        if include_lines:
            if len(include_lines) != len(lines):
                raise DocsSyntaxError(
                    f"{where}: a python block that includes a snippet must hold only "
                    "'--8<--' lines (Sybil cannot run included code; the snippet has "
                    "its own test)"
                )
            block.kind = "include"
        elif lines and lines[0].lstrip().startswith(">>>"):
            block.kind = "doctest"
        else:
            block.kind = "python"
    elif block.lang == "console":
        try:
            block.commands = console.parse_commands(block.source)
        except ValueError as e:
            raise DocsSyntaxError(f"{where}: {e}") from None
        runnable = [c.executable for c in block.commands]
        if runnable and all(runnable):
            block.kind = "console"
        elif any(runnable):
            bad = [c.text for c in block.commands if not c.executable]
            raise DocsSyntaxError(
                f"{where}: a console block either runs all its commands or none; "
                f"these cannot be run by the docs tests: {bad}"
            )
        else:
            block.kind = "static"
    else:
        block.kind = "static"
    block.includes = [m.group("path") for m in _INCLUDE_RE.finditer(block.source)]


def parse_page(path: str | Path, text: str | None = None) -> Page:
    """Scan a Markdown page into :class:`Block` objects (raises DocsSyntaxError)."""
    path = Path(path)
    if text is None:
        text = path.read_text(encoding="utf-8")
    lexer = RawFencedCodeBlockLexer(info_pattern=re.compile(r"(?P<info>[^\n]*)$\n", re.MULTILINE))
    blocks: list[Block] = []
    for region in lexer(Document(text, str(path))):
        opening = FENCE.match(text, region.start)
        assert opening is not None
        prefix = opening.group("prefix")
        source = region.lexemes["source"]
        body_start = region.start + source.offset
        closing_line = text.rfind("\n", body_start - 1, region.end) + 1
        closed = FENCE.match(text, closing_line) is not None and closing_line >= body_start
        body_end = closing_line if closed else region.end
        line = text.count("\n", 0, region.start) + 1
        indent = " " * len(prefix) if not prefix.strip(" \t-*+0123456789.)") else prefix
        info = region.lexemes["info"]
        block = Block(
            kind="static",
            lang=_lang(info),
            info=info,
            start=region.start,
            end=region.end,
            body_start=body_start,
            body_end=body_end,
            line=line,
            indent=indent,
            source=str(source),
        )
        blocks.append(block)
    blocks.sort(key=lambda b: b.start)
    # A fence shown inside another fence (a Markdown example) is text, not a block.
    outer: list[Block] = []
    for b in blocks:
        if outer and b.start < outer[-1].end:
            continue
        outer.append(b)
    for b in outer:
        _classify(b, str(path))
        if b.kind in ("doctest", "python", "console"):
            b.skip_reason = _skip_reason(text, b.start, str(path), b.line)
            b.only_on = _only_on(text, b.start)
    hint = _HINT_RE.search(text)
    return Page(
        path=path,
        text=text,
        blocks=outer,
        includes=[m.group("path") for m in _INCLUDE_RE.finditer(text)],
        failure_hint=" ".join(hint.group("hint").split()) if hint else None,
    )
