"""Just enough of the Chrome DevTools Protocol to test the built site.

A headless Chromium is started with ``--remote-debugging-port=0``; its page
target is driven over one websocket (``websocket-client``). Everything the
tests need is here: navigate and wait for ``load``, evaluate JavaScript, type
text, collect console errors and uncaught exceptions, and answer requests for
third-party URLs (the site must make none, except the Mermaid library that
Material loads from a CDN; the tests answer that one with a stub that records
what it was asked to draw).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websocket

__all__ = ["CHROMIUM_FLAGS", "Browser", "CDPError", "find_chromium"]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--window-size=1280,900",
]

#: Material loads Mermaid from this CDN on pages with a diagram.
MERMAID_URL_PREFIX = "https://unpkg.com/mermaid@"

MERMAID_STUB = b"""
window.__mermaidDiagrams = [];
window.mermaid = {
  initialize: function () {},
  render: async function (id, code) {
    window.__mermaidDiagrams.push(code);
    return { svg: '<svg id="' + id + '" xmlns="http://www.w3.org/2000/svg"></svg>' };
  },
};
"""


class CDPError(RuntimeError):
    """A DevTools command failed, or the browser did not answer in time."""


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


class Browser:
    """A headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, executable: str, *, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="jpr-chromium-")
        self.proc = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self._profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._next_id = 0
        self.console_errors: list[str] = []
        self.external_requests: list[str] = []
        try:
            port = self._devtools_port()
            self.ws = websocket.create_connection(
                self._page_websocket(port), timeout=timeout, suppress_origin=True
            )
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Log.enable")
            self.call("Fetch.enable", patterns=[{"urlPattern": "https://*"}])
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- lifecycle

    def _devtools_port(self) -> int:
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with status {self.proc.returncode}")
            try:
                first = port_file.read_text().splitlines()[0]
                return int(first)
            except (FileNotFoundError, IndexError, ValueError):
                time.sleep(0.05)
        raise CDPError("chromium did not open its DevTools port")

    def _page_websocket(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.05)
        raise CDPError("chromium has no page target")

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            with contextlib.suppress(OSError):
                ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- messaging

    def _send(self, method: str, params: dict[str, Any]) -> int:
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        return self._next_id

    def _receive(self, deadline: float) -> dict[str, Any] | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.ws.settimeout(remaining)
        try:
            message = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            return None
        if "method" in message:
            self._on_event(message)
        return message

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its result (events are handled meanwhile)."""
        wanted = self._send(method, params)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._receive(deadline)
            if message is None:
                raise CDPError(f"no answer to {method} within {self.timeout} s")
            if message.get("id") == wanted:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_for_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            message = self._receive(deadline)
            if message is None:
                raise CDPError(f"no {method} event within {timeout or self.timeout} s")
            if message.get("method") == method:
                return message.get("params", {})

    def _on_event(self, message: dict[str, Any]) -> None:
        method, params = message["method"], message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console_errors.append(f"uncaught exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = [a.get("value", a.get("description", "")) for a in params.get("args", [])]
            self.console_errors.append("console.error: " + " ".join(map(str, args)))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry.get('text')} ({entry.get('url', '')})")
        elif method == "Fetch.requestPaused":
            self._answer_external(params)

    def _answer_external(self, params: dict[str, Any]) -> None:
        url = params["request"]["url"]
        if url.startswith(MERMAID_URL_PREFIX):
            self._send(
                "Fetch.fulfillRequest",
                {
                    "requestId": params["requestId"],
                    "responseCode": 200,
                    "responseHeaders": [
                        {"name": "Content-Type", "value": "application/javascript"}
                    ],
                    "body": base64.b64encode(MERMAID_STUB).decode(),
                },
            )
        else:
            self.external_requests.append(url)
            self._send(
                "Fetch.failRequest",
                {"requestId": params["requestId"], "errorReason": "BlockedByClient"},
            )

    # ----------------------------------------------------------------- pages

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait for its ``load`` event."""
        self.call("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its value."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} raised {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

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
            self._receive(time.monotonic() + 0.05)  # let events in while waiting
        raise CDPError(f"timed out waiting for {expression!r} (last value {value!r})")

    def type_text(self, text: str) -> None:
        """Type into the focused element, as a user would."""
        for char in text:
            self.call("Input.dispatchKeyEvent", type="keyDown", text=char, key=char)
            self.call("Input.dispatchKeyEvent", type="keyUp", key=char)
