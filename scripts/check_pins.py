"""Check that every supported Python resolves the same pinned versions.

Resolves ``pyproject.toml``'s dependencies for each supported Python with
``uv pip compile`` (needs network access to the package index) and compares the
versions of the packages whose bits the docs print (with the ``dev`` extra, for
Grain, which the recipes use; ``--only-binary`` makes sure every one of them has
a wheel for that Python).

    uv run python scripts/check_pins.py
"""

from __future__ import annotations

import re
import subprocess
import sys

PYTHONS = ("3.11", "3.12", "3.13", "3.14")
PINNED = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes", "grain", "xxhash"
)


def resolve(python: str) -> dict[str, str]:
    out = subprocess.run(
        ["uv", "pip", "compile", "pyproject.toml", "--extra", "dev", "--python-version", python,
         "--python-platform", "x86_64-manylinux_2_28", "--only-binary", ":all:",
         "--quiet", "--no-header"],
        check=True, capture_output=True, text=True,
    ).stdout
    found = {_name(k): v for k, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", out, flags=re.M)}
    return {name: found.get(_name(name), "?") for name in PINNED}


def _name(project: str) -> str:
    """A project name as the index compares them (PEP 503: ml_dtypes is ml-dtypes)."""
    return re.sub(r"[-_.]+", "-", project).lower()


def main() -> int:
    results = {py: resolve(py) for py in PYTHONS}
    for py, versions in results.items():
        print(py, " ".join(f"{k}=={v}" for k, v in versions.items()))
    same = len({tuple(v.items()) for v in results.values()}) == 1
    print("OK: all Pythons resolve the same pins" if same else "MISMATCH between Pythons")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
