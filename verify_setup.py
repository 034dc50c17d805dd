"""Check that jpr works on this machine: ``python verify_setup.py``.

1. jpr and the libraries it is built on import;
2. they are the versions jpr pins (the docs' printed hashes depend on them);
3. two fresh 5-step training runs give the same hash and state hash.

Prints ``OK: ...`` and exits 0, or one ``FAILED: ...`` line per problem and
exits 1.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

#: Import names of everything a run needs.
MODULES = (
    "jax", "jaxlib", "flax.nnx", "optax", "orbax.checkpoint", "numpy", "ml_dtypes", "xxhash",
    "jpr.run_repro",
)

_PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;,]+)")


def parse_pins(requirements: list[str]) -> dict[str, str]:
    """The ``name==version`` pins among requirement strings.

    Example:
        >>> parse_pins(["jax==0.10.2", "numpy == 2.4.6 ; python_version>'3'", "rich>=1",
        ...             "ml_dtypes==0.6.0"])
        {'jax': '0.10.2', 'numpy': '2.4.6', 'ml-dtypes': '0.6.0'}
    """
    pins = {}
    for req in requirements:
        m = _PIN.match(req)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)  # PEP 503 names
    return pins


def pinned_versions() -> dict[str, str]:
    """jpr's pins: from the installed package, else from ``pyproject.toml`` beside this file."""
    try:
        # The runtime pins only: the dev extra's pins carry an `extra == "dev"` marker.
        requirements = [r for r in metadata.requires("jpr") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent / "pyproject.toml"
        requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return parse_pins(requirements)


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or ``None``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def version_problems(
    pins: dict[str, str], installed: Callable[[str], str | None] = installed_version
) -> list[str]:
    """One message per pinned distribution that is missing or at another version.

    Example:
        >>> have = {"jax": "0.10.2", "numpy": "2.3.0"}.get
        >>> version_problems({"jax": "0.10.2", "numpy": "2.4.6", "optax": "0.2.8"}, have)
        ['numpy 2.3.0 is installed but jpr pins 2.4.6', 'optax is not installed (jpr pins 0.2.8)']
    """
    problems = []
    for name, want in sorted(pins.items()):
        have = installed(name)
        if have is None:
            problems.append(f"{name} is not installed (jpr pins {want})")
        elif have != want:
            problems.append(f"{name} {have} is installed but jpr pins {want}")
    return problems


def import_problems(modules: tuple[str, ...] = MODULES) -> list[str]:
    """One message per module that fails to import."""
    problems = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # any import failure is a setup problem
            problems.append(f"cannot import {name}: {type(e).__name__}: {e}")
    return problems


def run_twice(steps: int = 5) -> tuple[dict, dict]:
    """Two fresh training runs of ``steps`` steps with seed 0; returns both records."""
    from jpr.run_repro import build_parser, run

    def quiet(*args, **kwargs):
        return None

    args = build_parser().parse_args(["--steps", str(steps), "--no-progress"])
    return run(args, out=quiet), run(args, out=quiet)


def main() -> int:
    problems = import_problems()
    if problems:
        for p in problems:
            print(f"FAILED: {p}")
        return 1
    pins = pinned_versions()
    problems = version_problems(pins)
    for p in problems:
        print(f"FAILED: {p} (reinstall with `pip install -e .` or `uv sync`)")
    print("versions:", " ".join(f"{k}=={installed_version(k)}" for k in sorted(pins)))
    a, b = run_twice()
    if (a["hash"], a["state_hash"]) != (b["hash"], b["state_hash"]):
        print(f"FAILED: two identical runs gave different hashes: {a['hash']} vs {b['hash']}")
        return 1
    print(f"two 5-step runs: hash {a['hash'][:16]}..., state_hash {a['state_hash'][:16]}...")
    if problems:
        return 1
    print(f"OK: jpr is set up and two runs gave the same bits ({a['backend']}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
