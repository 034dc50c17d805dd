"""Printed values that depend on float code generation, and how they are checked.

A training hash is a function of (versions, program, CPU target): the docs'
printed values were recorded on the **reference platform** (x86-64 with AVX2
and FMA, AVX-512 included, under jpr's pin, see :mod:`jpr.platform`). Which of
them depend on float code generation is *measured*, not decided by hand:
``pytest --update-docs`` runs the pages a second time under a foreign target
(``XLA_FLAGS=--xla_cpu_max_isa=AVX``) and writes every printed value that moved
into :data:`MANIFEST`, together with the reference platform's
:func:`jpr.platform.probe` fingerprint.

- On the reference platform (its probe equals the recorded one) every printed
  value is compared exactly.
- Anywhere else, a *float-bound* value (listed in the manifest for its page) is
  checked for the claims the page makes instead of its value: a hash printed
  twice on a page must be printed twice here too, two different hashes must
  stay different, prefixes must agree with the full hashes they come from, a
  float-bound decimal (a loss) must be within :data:`REL_TOL`, and a float-bound
  whole number (a ULP distance, a count of leaves that differ) must stay a
  whole number of the same sign. A line whose words moved too (the list of
  leaves that differ at the end of a perturbed run) is recorded whole and must
  keep its words up to its first value. Every other
  value (PRNG bits, integer data, their hashes, step numbers, leaf names, the
  text around them) is still compared exactly. The session ends with one notice
  naming the platform and how many values were checked this way.
- ``JPR_DOCS_MEASURE=<folder>`` (used by ``--update-docs``) makes the run
  record moved values there instead of failing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from docs_tools import REPO_ROOT
from docs_tools.markdown import HEX_RE

__all__ = [
    "MANIFEST",
    "PageChecker",
    "Platform",
    "current_platform",
    "load_manifest",
    "moved_tokens",
    "tokens",
]

MANIFEST = REPO_ROOT / "docs_tools" / "float_bound.json"
#: The foreign target ``--update-docs`` measures under (on x86-64).
MEASURE_FLAGS = "--xla_cpu_max_isa=AVX"
#: Relative tolerance of a float-bound decimal off the reference platform.
REL_TOL = 0.05
MEASURE_ENV = "JPR_DOCS_MEASURE"

_FLOAT_HEX = r"(?<![0-9A-Za-z_])-?0x[0-9a-f]+(?:\.[0-9a-f]*)?p[-+]?\d+"
# A decimal, as Python and NumPy print them ("0.5", "5.9e-08", "0." and "12").
_NUMBER = r"(?<![0-9A-Za-z_.])-?\d+(?:\.\d*)?(?:e[-+]?\d+)?(?![0-9A-Za-z_])"
TOKEN_RE = re.compile(f"({_FLOAT_HEX}|{HEX_RE.pattern}|{_NUMBER})")


def tokens(text: str) -> tuple[list[str], list[str]]:
    """``text`` split into its skeleton (the words around values) and its values.

    Example:
        >>> tokens("hash 1a2b3c4d5e loss 0.25")
        (['hash ', ' loss ', ''], ['1a2b3c4d5e', '0.25'])
    """
    parts = TOKEN_RE.split(text)
    return parts[0::2], parts[1::2]


def moved_tokens(want: str, got: str) -> list[tuple[str, str]] | None:
    """The value pairs that differ between ``want`` and ``got``.

    ``None`` when the two differ in more than their values (other words, other
    lines, another number of values): such a change is never float-bound.

    Example:
        >>> moved_tokens("hash 1a2b3c4d5e loss 0.25", "hash 9f8e7d6c5b loss 0.25")
        [('1a2b3c4d5e', '9f8e7d6c5b')]
    """
    ws, wt = tokens(want)
    gs, gt = tokens(got)
    if ws != gs or len(wt) != len(gt):
        return None
    return [(w, g) for w, g in zip(wt, gt, strict=True) if w != g]


def load_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    """The recorded manifest, or an empty one."""
    if not path.exists():
        return {"reference": None, "measured_under": None, "pages": {}, "lines": {}}
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Platform:
    """This test session's platform, against the one the docs were recorded on."""

    describe: str
    probe: str
    reference: dict[str, Any] | None
    measuring: bool

    @property
    def is_reference(self) -> bool:
        return self.reference is not None and self.probe == self.reference.get("probe")


@cache
def current_platform() -> Platform:
    """Measure this session's platform once (starts JAX: call after pinning)."""
    from jpr import platform

    target, fingerprint = platform.current_target(), platform.probe()
    return Platform(
        f"{target.describe()}, probe {fingerprint}"[:200],
        fingerprint,
        load_manifest().get("reference"),
        bool(os.environ.get(MEASURE_ENV)),
    )


@cache
def _float_bound(page: str) -> frozenset[str]:
    return frozenset(load_manifest().get("pages", {}).get(page, []))


@cache
def _float_bound_lines(page: str) -> frozenset[str]:
    return frozenset(load_manifest().get("lines", {}).get(page, []))


_LINE = "<line>"  # marks a measured line whose words (not only values) moved


def _is_hex(token: str) -> bool:
    return HEX_RE.fullmatch(token) is not None


@dataclass
class PageChecker:
    """Checks one page's outputs: exactly, or float-bound values for consistency."""

    page: str  # relative to the repository root, e.g. "docs/index.md"
    exact: bool
    measuring: bool = False
    checked: int = 0  # float-bound values checked for consistency instead of value
    moved: list[tuple[str, str]] = field(default_factory=list)
    _pairs: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def for_page(cls, path: str | Path) -> PageChecker:
        rel = Path(os.path.relpath(Path(path).resolve(), REPO_ROOT)).as_posix()
        plat = current_platform()
        return cls(rel, exact=plat.is_reference and not plat.measuring, measuring=plat.measuring)

    def consistent(self, want: str, got: str) -> bool:
        """Whether ``got`` keeps every claim of ``want`` (called only when they differ)."""
        if self.exact:
            return False
        want_lines, got_lines = want.splitlines(), got.splitlines()
        if len(want_lines) != len(got_lines):
            return False  # another number of lines is never float-bound
        return all([self._line(w, g) for w, g in zip(want_lines, got_lines, strict=True)])

    def _line(self, want: str, got: str) -> bool:
        if want == got:
            self.bind_equal(want)
            return True
        pairs = moved_tokens(want, got)
        if self.measuring:
            self.moved.extend(pairs if pairs is not None else [(want, _LINE)])
            return True
        if pairs is None:  # more than values moved: only a line measured so may
            if want not in _float_bound_lines(self.page):
                return False
            self.checked += 1
            return got.startswith(tokens(want)[0][0])  # the same words up to a value
        bound = _float_bound(self.page)
        for w, g in zip(tokens(want)[1], tokens(got)[1], strict=True):
            if w in bound:
                self.checked += 1
                if not self._agrees(w, g):
                    return False
            elif w != g:
                return False
        return True

    def _agrees(self, w: str, g: str) -> bool:
        if not _is_hex(w):
            try:
                a, b = (float.fromhex(t) if "0x" in t else float(t) for t in (w, g))
            except ValueError:
                return False
            if "." not in w and "e" not in w and "x" not in w:  # a count (ULPs, leaves)
                return "." not in g and "e" not in g and (a < 0) == (b < 0)
            return abs(a - b) <= REL_TOL * max(abs(a), 1e-12)
        if len(w) != len(g) or not _is_hex(g):
            return False
        for w2, g2 in self._pairs:
            n = min(len(w), len(w2))
            if (w[:n] == w2[:n]) != (g[:n] == g2[:n]):
                return False  # equal on the page but not here, or the reverse
        self._pairs.append((w, g))
        return True

    def bind_equal(self, text: str) -> None:
        """Remember the float-bound hashes of an output that matched as written."""
        if self.exact or self.measuring:
            return
        bound = _float_bound(self.page)
        for token in tokens(text)[1]:
            if token in bound and _is_hex(token):
                self.checked += 1
                self._agrees(token, token)

    def save_measurement(self) -> None:
        """With ``JPR_DOCS_MEASURE`` set: append this page's moved values there."""
        folder = os.environ.get(MEASURE_ENV)
        if not folder or not self.moved:
            return
        out = Path(folder) / f"moved-{os.getpid()}.jsonl"
        with out.open("a", encoding="utf-8") as f:
            for w, g in self.moved:
                f.write(json.dumps({"page": self.page, "want": w, "got": g}) + "\n")


def update_refusal() -> str | None:
    """Why ``--update-docs`` must not rewrite reference values here, or ``None``."""
    from jpr import platform

    target = platform.current_target()
    plat = current_platform()
    if not target.is_reference:
        return (
            f"--update-docs: this platform ({target.describe()}) is not the reference "
            "platform (x86_64 under jpr's pin, on a host with AVX2+FMA or AVX-512): its "
            "float results would replace the reference values; run it there"
        )
    if plat.reference and not plat.is_reference and not os.environ.get("JPR_DOCS_NEW_REFERENCE"):
        return (
            f"--update-docs: the reference target's probe here ({plat.probe}) differs from the "
            f"recorded one ({plat.reference.get('probe')}): a kernel on this host ignores the "
            "pinned target, or the versions changed; after a deliberate upgrade set "
            "JPR_DOCS_NEW_REFERENCE=1"
        )
    return None


def measure(pages: list[str], flags: str = MEASURE_FLAGS) -> str:
    """Run ``pages`` under ``flags`` and record which printed values moved.

    Rewrites :data:`MANIFEST` for those pages (other pages keep their entry)
    and records this platform as the reference. Returns a report line.
    """
    import subprocess
    import sys
    import tempfile

    from jpr import platform

    with tempfile.TemporaryDirectory(prefix="jpr-measure-") as folder:
        env = dict(os.environ)
        kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_")]
        env.update(XLA_FLAGS=" ".join([*kept, flags]), **{MEASURE_ENV: folder})
        env.pop("_JPR_PINNED_FLAGS", None)
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pages],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            check=False,
        )
        moved: dict[str, set[str]] = {page: set() for page in pages}
        lines: dict[str, set[str]] = {page: set() for page in pages}
        for f in Path(folder).glob("moved-*.jsonl"):
            for line in f.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                into = lines if row["got"] == _LINE else moved
                into.setdefault(row["page"], set()).add(row["want"])
    manifest = load_manifest()
    manifest["reference"] = {
        "platform": platform.current_target().describe(),
        "probe": platform.probe(),
    }
    manifest["measured_under"] = f"XLA_FLAGS={flags}"
    for key, found in (("pages", moved), ("lines", lines)):
        entry = manifest.setdefault(key, {})
        entry.update({p: sorted(v) for p, v in found.items() if v})
        for p in [p for p in pages if not found.get(p)]:
            entry.pop(p, None)
        manifest[key] = dict(sorted(entry.items()))
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    _float_bound.cache_clear()
    _float_bound_lines.cache_clear()
    count = sum(len(v) for v in moved.values()) + sum(len(v) for v in lines.values())
    return (
        f"measured under XLA_FLAGS={flags}: {count} printed value(s) on "
        f"{sum(1 for v in moved.values() if v)} page(s) depend on float code generation "
        f"(written to {MANIFEST.relative_to(REPO_ROOT)})"
    )


def session_notice(counts: dict[str, int]) -> str | None:
    """The one line that ends a docs run off the reference platform, or ``None``."""
    if not counts:
        return None
    plat = current_platform()
    ref = (plat.reference or {}).get("platform", "not recorded")
    return (
        f"docs: not the reference platform ({plat.describe}; reference: {ref}): "
        f"{sum(counts.values())} printed value(s) on {len(counts)} page(s) depend on float "
        "code generation and were checked for consistency (equal where the page shows them "
        "equal, different where it shows them different) instead of value; every other "
        "printed value was compared exactly"
    )
