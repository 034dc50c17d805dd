"""Sybil wiring: run every block of every docs page, and ``--update-docs``.

Each page is one Sybil document: its blocks run top to bottom in one shared
namespace, in a fresh temporary working folder (see :func:`page_setup`).

With ``pytest --update-docs`` a block whose *output* differs does not fail:
the new output is recorded and, when the session ends, written into the page
(:func:`apply_updates`). Hashes quoted elsewhere on the page (in prose, in
code) that were derived from an old printed hash are rewritten to the new one,
so after a deliberate upgrade a maintainer reviews one ``git diff``. Errors
(an exception, a wrong exit status) still fail: they are not outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from sybil import Document, Example, Region, Sybil
from sybil.evaluators.doctest import OutputChecker

from docs_tools import REPO_ROOT, SNIPPETS_DIR, console
from docs_tools.float_bound import PageChecker
from docs_tools.markdown import HEX_RE, Block, Page, parse_page

__all__ = [
    "STATE",
    "DocsParser",
    "apply_updates",
    "make_sybil",
    "page_setup",
    "page_teardown",
    "run_document",
]

#: Sybil picks pages by these patterns, relative to the repository root.
PATTERNS = ["docs/*.md", "docs/*/*.md", "docs/*/*/*.md"]

_CWD_KEY = "_docs_cwd"
_SNAPSHOT_KEY = "_docs_snapshot"
_CHECKER_KEY = "_docs_checker"


@dataclasses.dataclass
class Update:
    """A block of a page to rewrite: its body, old and new."""

    start: int
    end: int
    old: str
    new: str
    hex_map: dict[str, str]


@dataclasses.dataclass
class _State:
    update: bool = False
    #: The folder that ``snippets`` links to in a page's working folder.
    snippets_dir: Path = SNIPPETS_DIR
    updates: dict[str, list[Update]] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    #: Per page: float-bound values checked for consistency instead of value.
    consistency: dict[str, int] = dataclasses.field(default_factory=dict)


#: Session-wide settings (set from conftest.py's ``pytest_configure``).
STATE = _State()


# --------------------------------------------------------------------------- setup


def page_setup(namespace: dict[str, Any]) -> None:
    """Before a page: make its working folder and remember global RNG settings."""
    cwd = Path(tempfile.mkdtemp(prefix="jpr-docs-"))
    (cwd / "snippets").symlink_to(STATE.snippets_dir, target_is_directory=True)
    (cwd / "scripts").symlink_to(STATE.snippets_dir.parent / "scripts", target_is_directory=True)
    namespace[_CWD_KEY] = cwd
    namespace[_SNAPSHOT_KEY] = _snapshot()


def page_teardown(namespace: dict[str, Any]) -> None:
    """After a page: restore what it may have changed, delete its folder."""
    snapshot = namespace.pop(_SNAPSHOT_KEY, None)
    if snapshot is not None:
        _restore(snapshot)
    checker: PageChecker | None = namespace.pop(_CHECKER_KEY, None)
    if checker is not None:
        checker.save_measurement()
        if checker.checked:
            with STATE.lock:
                STATE.consistency[checker.page] = checker.checked
    cwd = namespace.pop(_CWD_KEY, None)
    if cwd is not None:
        shutil.rmtree(cwd, ignore_errors=True)


_JAX_FLAGS = ("jax_threefry_partitionable", "jax_default_prng_impl", "jax_enable_x64")


def _snapshot() -> dict[str, Any]:
    import jax
    import numpy as np

    return {
        "jax": {name: getattr(jax.config, name) for name in _JAX_FLAGS},
        "numpy": np.random.get_state(),
    }


def _restore(snapshot: dict[str, Any]) -> None:
    import jax
    import numpy as np

    for name, value in snapshot["jax"].items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)
    np.random.set_state(snapshot["numpy"])


def _page_checker(example: Example) -> PageChecker:
    checker = example.namespace.get(_CHECKER_KEY)
    if checker is None:
        checker = example.namespace[_CHECKER_KEY] = PageChecker.for_page(example.path)
    return checker


@contextlib.contextmanager
def _in_page_folder(example: Example):
    cwd = example.namespace.get(_CWD_KEY)
    if cwd is None:  # evaluated without page_setup (should not happen)
        raise RuntimeError("docs page evaluated without its setup (page_setup)")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        yield Path(cwd)
    finally:
        os.chdir(old)


# ------------------------------------------------------------------------- updates


def _hex_map(old: str, new: str) -> dict[str, str]:
    olds = [m.group() for m in HEX_RE.finditer(old)]
    news = [m.group() for m in HEX_RE.finditer(new)]
    if len(olds) != len(news):
        return {}
    return {o: n for o, n in zip(olds, news, strict=True) if o != n and len(o) == len(n)}


def _record(example: Example, block: Block, new_source: str) -> None:
    old_body = example.document.text[block.body_start : block.body_end]
    new_body = "".join(
        (block.indent + ln if ln.strip() else ln) for ln in new_source.splitlines(keepends=True)
    )
    if new_body == old_body:
        return
    upd = Update(block.body_start, block.body_end, old_body, new_body, _hex_map(old_body, new_body))
    with STATE.lock:
        STATE.updates.setdefault(example.path, []).append(upd)


def _rewrite_hashes(text: str, hex_map: dict[str, str], keep: set[str]) -> str:
    """Replace hashes (or parts of them) that came from an old printed hash."""
    if not hex_map:
        return text
    out, last = [], 0
    for m in HEX_RE.finditer(text):
        token = m.group()
        if token in keep:
            continue
        for old, new in hex_map.items():
            i = old.find(token)
            if i >= 0:
                out.append(text[last : m.start()])
                out.append(new[i : i + len(token)])
                last = m.end()
                break
    out.append(text[last:])
    return "".join(out)


def apply_updates() -> list[str]:
    """Write the recorded updates into the pages; returns one line per page."""
    report = []
    with STATE.lock:
        pending, STATE.updates = STATE.updates, {}
    for path, updates in sorted(pending.items()):
        text = Path(path).read_text(encoding="utf-8")
        hex_map: dict[str, str] = {}
        applied = 0
        for upd in sorted(updates, key=lambda u: u.start, reverse=True):
            if text[upd.start : upd.end] != upd.old:
                report.append(f"{path}: changed during the run, block at {upd.start} left alone")
                continue
            text = text[: upd.start] + upd.new + text[upd.end :]
            hex_map.update(upd.hex_map)
            applied += 1
        if hex_map:
            page = parse_page(path, text)
            printed = {
                m.group() for a, b in page.output_spans() for m in HEX_RE.finditer(text[a:b])
            }
            text = _rewrite_hashes(text, hex_map, printed)
        Path(path).write_text(text, encoding="utf-8")
        report.append(
            f"{os.path.relpath(path)}: rewrote {applied} block(s)"
            + (f", {len(hex_map)} hash(es) renamed in the text" if hex_map else "")
        )
    return report


# ----------------------------------------------------------------------- evaluators


class _PageOutputChecker(OutputChecker):
    """Exact doctest comparison, then the page's float-bound consistency check."""

    def __init__(self, page: PageChecker) -> None:
        super().__init__()
        self.page = page

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if super().check_output(want, got, optionflags):
            self.page.bind_equal(want)
            return True
        return self.page.consistent(want, got)


class _Runner(doctest.DocTestRunner):
    """A doctest runner that remembers what each example printed."""

    def __init__(self, page: PageChecker, optionflags: int = 0) -> None:
        checker = _PageOutputChecker(page)
        super().__init__(verbose=False, optionflags=optionflags, checker=checker)
        self.outputs: list[tuple[doctest.Example, str]] = []
        self.exceptions = 0

    def report_failure(self, out, test, example, got):
        if example.exc_msg is not None:  # a changed exception is not an output
            self.exceptions += 1
        self.outputs.append((example, got))
        super().report_failure(out, test, example, got)

    def report_unexpected_exception(self, out, test, example, exc_info):
        self.exceptions += 1
        super().report_unexpected_exception(out, test, example, exc_info)


def _want_text(got: str, indent: str) -> str:
    lines = got.splitlines(keepends=True)
    return "".join(indent + (ln if ln.strip() else "<BLANKLINE>\n") for ln in lines)


class DoctestEvaluator:
    """Runs all ``>>>`` examples of one block in the page namespace."""

    def __init__(self, block: Block, hint: str | None) -> None:
        self.block = block
        self.hint = hint

    def __call__(self, example: Example) -> str | None:
        __tracebackhide__ = True
        block = self.block
        parser = doctest.DocTestParser()
        rel = os.path.relpath(example.path)
        body_line = block.line  # doctest adds example.lineno + 1
        test = parser.get_doctest(block.source, example.namespace, rel, rel, body_line)
        test.globs = example.namespace  # share the page namespace, don't copy it
        runner = _Runner(_page_checker(example))
        report: list[str] = []
        remove_name = "__name__" not in example.namespace
        if remove_name:
            example.namespace["__name__"] = "__docs__"
        try:
            with _in_page_folder(example):
                runner.run(test, out=report.append, clear_globs=False)
        finally:
            if remove_name:
                example.namespace.pop("__name__", None)
        failed = "".join(report)
        if not failed:
            return None
        if STATE.update and runner.exceptions == 0:
            _record(example, block, self._new_source(parser, runner))
            return None
        return failed + (f"\nNote: {self.hint}\n" if self.hint else "")

    def _new_source(self, parser: doctest.DocTestParser, runner: _Runner) -> str:
        got_by_line = {ex.lineno: got for ex, got in runner.outputs}
        source = self.block.source
        out, last = [], 0
        for m in parser._EXAMPLE_RE.finditer(source):  # type: ignore[attr-defined]
            lineno = source.count("\n", 0, m.start())
            if lineno not in got_by_line:
                continue
            want_start, want_end = m.start("want"), m.end("want")
            out.append(source[last:want_start])
            if not source[:want_start].endswith("\n"):
                out.append("\n")
            out.append(_want_text(got_by_line[lineno], m.group("indent")))
            last = want_end
        out.append(source[last:])
        return "".join(out)


class PythonEvaluator:
    """Executes a plain ```python block in the page namespace."""

    def __init__(self, block: Block) -> None:
        self.block = block

    def __call__(self, example: Example) -> str | None:
        __tracebackhide__ = True
        source = "\n" * self.block.line + self.block.source
        code = compile(source, os.path.relpath(example.path), "exec", dont_inherit=True)
        printed = io.StringIO()
        with _in_page_folder(example), contextlib.redirect_stdout(printed):
            exec(code, example.namespace)
        example.namespace.pop("__builtins__", None)
        if printed.getvalue():
            return (
                "this python block printed output that the page does not show; "
                "write it as a doctest (>>>) so readers see, and the tests check, "
                f"what it prints:\n{printed.getvalue()}"
            )
        return None


class ConsoleEvaluator:
    """Runs the commands of a ```console block and compares their output."""

    def __init__(self, block: Block, hint: str | None) -> None:
        self.block = block
        self.hint = hint

    def __call__(self, example: Example) -> str | None:
        __tracebackhide__ = True
        reports, updated, fatal = [], [], False
        with _in_page_folder(example) as cwd:
            for cmd in self.block.commands:
                result = console.run_command(cmd, cwd)
                diff = console.compare(cmd, result, checker=_page_checker(example))
                if diff:
                    reports.append(diff)
                    fatal = fatal or cmd.exit_code != result.exit_code
                updated.append(
                    dataclasses.replace(
                        cmd, expected=console.new_expected(cmd.expected, result.output)
                    )
                )
        if not reports:
            return None
        if STATE.update and not fatal:
            _record(example, self.block, console.render_commands(updated))
            return None
        where = f"{os.path.relpath(example.path)}, line {self.block.line}"
        text = f"console block at {where}:\n" + "\n\n".join(reports)
        return text + (f"\nNote: {self.hint}\n" if self.hint else "")


class SkipEvaluator:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, example: Example) -> None:
        pytest.skip(self.reason)


def _platform_has(tag: str) -> bool:
    """``<!-- only on TAG: ... -->``: an architecture, ``fma`` (the target has FMA) or
    ``reference`` (the platform the docs were recorded on: the pinned target whose
    probe is the recorded one, see :mod:`docs_tools.float_bound`)."""
    from jpr import platform

    target = platform.current_target()
    if tag == "reference":
        from docs_tools.float_bound import current_platform

        return target.is_reference and current_platform().is_reference
    if tag == "fma":
        return target.arch == "aarch64" or target.effective in ("AVX2", "AVX512", "AVX512_CORE")
    return target.arch == tag


class DocsParser:
    """The one Sybil parser of the docs: a region per executed block."""

    def __call__(self, document: Document) -> Iterable[Region]:
        page: Page = parse_page(document.path, document.text)
        for block in page.blocks:
            if block.kind not in ("doctest", "python", "console"):
                continue
            if block.skip_reason is not None:
                evaluator: Any = SkipEvaluator(block.skip_reason)
            elif block.only_on and not _platform_has(block.only_on[0]):
                evaluator = SkipEvaluator(f"runs on {block.only_on[0]} only: {block.only_on[1]}")
            elif block.kind == "doctest":
                evaluator = DoctestEvaluator(block, page.failure_hint)
            elif block.kind == "python":
                evaluator = PythonEvaluator(block)
            else:
                evaluator = ConsoleEvaluator(block, page.failure_hint)
            yield Region(block.start, block.end, block, evaluator)


def make_sybil() -> Sybil:
    """The Sybil that conftest.py hands to pytest."""
    sybil = Sybil(
        parsers=[DocsParser()],
        patterns=PATTERNS,
        setup=page_setup,
        teardown=page_teardown,
        name="docs",
    )
    sybil.path = REPO_ROOT
    return sybil


def run_document(path: str | Path) -> None:
    """Run every example of one page outside pytest's collection (for tests).

    Raises the first failure (``sybil.example.SybilFailure``) or exception.
    """
    document = make_sybil().parse(Path(path))
    page_setup(document.namespace)
    try:
        for example in document.examples():
            example.evaluate()
    finally:
        page_teardown(document.namespace)
