"""Build the site with `mkdocs build --strict` and check it in a real headless Chromium.

One build and one browser serve every test of this module. The site is served
on 127.0.0.1 and has no network: a request to any other host fails the test,
except Mermaid, which Material loads from a CDN and which is answered with a
stub that records the diagrams it is asked to draw.

Chromium comes from the Debian package ``chromium`` (``apt-get install -y
chromium``; ``$JPR_CHROMIUM`` overrides the path). Without it the browser
tests are skipped locally and fail under CI (``CI`` set).
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
from docs_tools import REPO_ROOT
from docs_tools.cdp import Browser, find_chromium

#: Code-annotation markers: Material's JS opens them as tooltips and moves their
#: targets around, so their fragments are not checked as anchors.
ANNOTATION = re.compile(r"__code_\d+_annotation_\d+")


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


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        message = (
            "Chromium not found: install the Debian package `chromium` "
            "(apt-get install -y chromium) or set JPR_CHROMIUM to its path"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with Browser(executable) as b:
        yield b


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
    browser.evaluate("document.querySelector('.md-search__input').focus()")
    browser.type_text("fold_in")
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
