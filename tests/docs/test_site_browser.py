"""Build the site with `mkdocs build --strict` and check it in a real headless Chromium.

One build and one browser serve every test of this module. The site is served
on 127.0.0.1 and has no network: a request to any other host fails the test,
except Mermaid, which Material loads from a CDN and which is answered with a
stub that records the diagrams it is asked to draw.

The browser is driven with Playwright for Python, using the Debian package
``chromium`` (``apt-get install -y chromium``; ``$JPR_CHROMIUM`` overrides the
path), never a browser that Playwright downloads. Without Chromium the browser
tests are skipped locally and fail under CI (``CI`` set).
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from docs_tools import DOCS_DIR, REPO_ROOT
from docs_tools.markdown import parse_page

pytestmark = pytest.mark.slow  # the slow tier: `pytest --all` runs it

#: Code-annotation markers: Material's JS opens them as tooltips and moves their
#: targets around, so their fragments are not checked as anchors.
ANNOTATION = re.compile(r"__code_\d+_annotation_\d+")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

#: Material loads Mermaid from this CDN on pages with a diagram.
MERMAID_URL_PREFIX = "https://unpkg.com/mermaid@"

MERMAID_STUB = """
window.__mermaidDiagrams = [];
window.mermaid = {
  initialize: function () {},
  render: async function (id, code) {
    window.__mermaidDiagrams.push(code);
    return { svg: '<svg id="' + id + '" xmlns="http://www.w3.org/2000/svg"></svg>' };
  },
};
"""


def find_chromium() -> str | None:
    """Path of a Chromium executable (``$JPR_CHROMIUM`` first), or None."""
    explicit = os.environ.get("JPR_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with --strict into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO_ROOT,
        # Notebooks are not executed here (seconds each); the deploy workflow
        # executes them, and so does a plain `mkdocs build`.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "JPR_DOCS_EXECUTE_NOTEBOOKS": "false"},
        capture_output=True,
        text=True,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [ln for ln in log.splitlines() if ln.startswith("WARNING")]
    assert not warnings, "mkdocs build warned:\n" + "\n".join(warnings)
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url(site: Path):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class Browser:
    """One Playwright page in a headless Chromium, with what the tests record."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.console_errors: list[str] = []
        self.external_requests: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console_errors.append(f"uncaught: {error}"))
        page.route("**/*", self._route)

    def _on_console(self, message: Any) -> None:
        if message.type in ("error", "assert"):
            where = message.location.get("url", "")
            self.console_errors.append(f"console.{message.type}: {message.text} ({where})")

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        elif url.startswith(MERMAID_URL_PREFIX):
            route.fulfill(status=200, content_type="application/javascript", body=MERMAID_STUB)
        else:
            self.external_requests.append(url)
            route.abort("blockedbyclient")

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait for its ``load`` event."""
        self.page.goto(url, wait_until="load")

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        """Evaluate a JavaScript expression (or function, given ``arg``) in the page."""
        return self.page.evaluate(expression, arg)

    def wait_until(
        self, expression: str, *, timeout: float = 10.0, check: Callable[[Any], bool] = bool
    ) -> Any:
        """Poll ``expression`` until ``check(value)`` holds; return the value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if check(value):
                return value
            self.page.wait_for_timeout(50)
        raise AssertionError(f"timed out waiting for {expression!r} (last value {value!r})")


@pytest.fixture(scope="module")
def browser(base_url: str) -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        message = (
            "Chromium not found: install the Debian package `chromium` "
            "(apt-get install -y chromium) or set JPR_CHROMIUM to its path"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        # The copy-button test reads back what Material put on the clipboard.
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        try:
            yield Browser(context.new_page())
        finally:
            context.close()
            chromium.close()


def _pages(site: Path) -> list[str]:
    """Site-relative URLs of every built page."""
    pages = []
    for index in sorted(site.rglob("index.html")):
        rel = index.parent.relative_to(site).as_posix()
        if rel.split("/")[0] in ("assets", "search"):
            continue
        pages.append("" if rel == "." else rel + "/")
    return pages


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8"))
    return frozenset(parser.ids)


def _target(site: Path, path: str) -> Path:
    local = site / urllib.parse.unquote(path).lstrip("/")
    return local / "index.html" if path.endswith("/") or local.is_dir() else local


def test_every_page_loads_cleanly_with_working_links(browser, site, base_url):
    pages = _pages(site)
    assert "" in pages and "jax-prng/" in pages, pages
    problems: list[str] = []
    for page in pages:
        browser.console_errors.clear()
        browser.navigate(base_url + page)
        # Material decorates code blocks once its bundle has run.
        code_blocks = browser.evaluate("document.querySelectorAll('.md-content pre > code').length")
        copy_buttons = browser.wait_until(
            "document.querySelectorAll('.md-content pre button[data-md-type=copy],"
            " .md-content pre .md-clipboard').length",
            check=lambda n, want=code_blocks: n >= want,
        )
        if copy_buttons < code_blocks:
            problems.append(f"/{page}: {code_blocks} code blocks, {copy_buttons} copy buttons")
        hrefs = browser.evaluate("Array.from(document.querySelectorAll('a[href]'), a => a.href)")
        # Anchors on this page as the browser sees it (some are made by JS).
        live_ids = set(
            browser.evaluate(
                "Array.from(document.querySelectorAll('[id],[name]'), e => e.id || e.name)"
            )
        )
        for href in sorted(set(hrefs)):
            if not href.startswith(base_url):
                continue
            url = urllib.parse.urlsplit(href)
            target = _target(site, url.path)
            fragment = urllib.parse.unquote(url.fragment)
            if not target.is_file():
                problems.append(f"/{page}: broken link {href}")
            elif fragment and target.suffix == ".html" and not ANNOTATION.match(fragment):
                here = url.path.lstrip("/") == page
                if fragment not in (live_ids if here else _anchors(target)):
                    problems.append(f"/{page}: link to a missing anchor {href}")
        problems.extend(f"/{page}: {e}" for e in browser.console_errors)
    assert not browser.external_requests, (
        f"the site requested third-party URLs: {browser.external_requests}"
    )
    assert not problems, "\n".join(problems)


def test_search_finds_fold_in(browser, base_url):
    browser.navigate(base_url)
    browser.page.locator(".md-search__input").focus()
    browser.page.keyboard.type("fold_in")
    count = browser.wait_until(
        "document.querySelectorAll('.md-search-result__item').length", timeout=20
    )
    assert count > 0
    text = browser.evaluate(
        "Array.from(document.querySelectorAll('.md-search-result__item'), e => e.innerText)"
        ".join('\\n')"
    )
    assert "fold_in" in text
    assert "The JAX PRNG" in text


def test_material_features_render(browser, base_url):
    browser.navigate(base_url + "jax-prng/")
    # The key contract diagram reached Mermaid.
    diagrams = browser.wait_until("window.__mermaidDiagrams || []", check=len)
    assert any("stable_id" in d for d in diagrams)
    # Content tabs and admonitions.
    assert browser.evaluate("document.querySelectorAll('.tabbed-set').length") >= 1
    assert browser.evaluate("document.querySelectorAll('.admonition').length") >= 1
    browser.navigate(base_url + "basics/")
    assert browser.wait_until("document.querySelectorAll('.md-annotation').length") >= 2


def test_palette_toggles_between_light_and_dark(browser, base_url):
    browser.navigate(base_url)
    scheme = "document.body.getAttribute('data-md-color-scheme')"
    toggle = "document.querySelector('form[data-md-component=palette] label:not([hidden])')"
    seen = {browser.evaluate(scheme)}
    for _ in range(3):  # automatic -> light -> dark -> automatic
        before = browser.evaluate(f"{toggle}.htmlFor")
        browser.evaluate(f"{toggle}.click()")
        browser.wait_until(f"{toggle}.htmlFor", check=lambda v, b=before: v != b)
        seen.add(browser.evaluate(scheme))
    assert {"default", "slate"} <= seen


# ------------------------------------------------------------ copy buttons

#: What Material's copy button copies (bundle.js): the text of the code element
#: while it carries ``data-md-copying`` (so the CSS rules for copying apply),
#: trailing whitespace trimmed.
#: A block in a hidden tab or a closed ``<details>`` is shown first, as a reader
#: must to reach its button (``innerText`` of an unrendered element ignores CSS).
MATERIAL_COPY_TEXT = """code => {
  for (let block = code.closest(".tabbed-block"); block;
       block = block.parentElement.closest(".tabbed-block")) {
    const index = Array.from(block.parentElement.children).indexOf(block);
    block.closest(".tabbed-set").querySelectorAll(":scope > input")[index].checked = true;
  }
  for (let details = code.closest("details"); details;
       details = details.parentElement.closest("details")) {
    details.open = true;
  }
  code.setAttribute("data-md-copying", "");
  const text = code.innerText;
  code.removeAttribute("data-md-copying");
  return text.trimEnd();
}"""

_ANNOTATION_MARKER = re.compile(r"\s*# \(\d+\)!$")


def _runnable(block: Any) -> str:
    """What the copy button of ``block`` should copy: the code or commands only."""
    if block.kind == "include":
        return "\n".join(
            (REPO_ROOT / path).read_text(encoding="utf-8").rstrip() for path in block.includes
        )
    lines = block.source.splitlines()
    if block.kind == "doctest":
        code = [ln[4:] if ln[3:4] == " " else "" for ln in lines if ln.startswith((">>>", "..."))]
    elif block.lang == "console":
        code = [ln.removeprefix("$ ") for cmd in block.commands for ln in cmd.lines]
    else:
        code = lines
    # Material hides an annotation marker and the comment that holds only it.
    return _lines(_ANNOTATION_MARKER.sub("", ln) for ln in code)


def _lines(lines: Any) -> str:
    """``lines`` joined, trailing whitespace dropped (a hidden annotation leaves some)."""
    return "\n".join(ln.rstrip() for ln in lines).rstrip()


def _rendered_blocks(page_source: str) -> list[Any]:
    """The page's fenced blocks that Material renders as highlighted code, in order."""
    return [b for b in parse_page(DOCS_DIR / page_source).blocks if b.lang != "mermaid"]


@pytest.mark.parametrize("page_source", ["jax-prng.md", "pitfalls.md", "nnx-randomness.md"])
def test_copy_buttons_copy_runnable_code(browser, base_url, page_source):
    """Every code block's copy text is its code: no prompts, no outputs, no `$ `."""
    blocks = _rendered_blocks(page_source)
    browser.navigate(base_url + page_source.removesuffix(".md") + "/")
    copied = browser.evaluate(
        f"Array.from(document.querySelectorAll('.md-content div.highlight > pre > code'), "
        f"{MATERIAL_COPY_TEXT})"
    )
    assert len(copied) == len(blocks), (len(copied), [b.line for b in blocks])
    kinds = set()
    for block, text in zip(blocks, copied, strict=True):
        where = f"{page_source}:{block.line} ({block.kind})"
        assert _lines(text.splitlines()) == _runnable(block), where
        if block.kind in ("doctest", "include", "python"):
            compile(text, where, "exec")  # what a reader pastes is valid Python
        kinds.add(block.kind)
    assert "doctest" in kinds


def test_copy_button_puts_runnable_code_on_the_clipboard(browser, base_url):
    """Click the copy buttons of a doctest, a console and a snippet block."""
    blocks = _rendered_blocks("jax-prng.md")
    browser.navigate(base_url + "jax-prng/")
    browser.wait_until(
        "document.querySelectorAll('.md-content pre button[data-md-type=copy]').length"
    )
    for kind in ("doctest", "console", "include"):
        index, block = next((i, b) for i, b in enumerate(blocks) if b.kind == kind)
        browser.evaluate("navigator.clipboard.writeText('')")
        block_element = browser.page.locator(".md-content div.highlight").nth(index)
        block_element.locator("button[data-md-type=copy]").click()
        text = browser.wait_until("navigator.clipboard.readText()")
        assert _lines(text.splitlines()) == _runnable(block), f"jax-prng.md:{block.line} ({kind})"
        assert not text.startswith((">>>", "$ ")), text
