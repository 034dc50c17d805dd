"""What ``jpr doctor`` must find in the default set-up, on this host.

On the reference platform nothing; elsewhere (an arm64 host, an x86-64 CPU
without AVX2 and FMA, a setting of the pin replaced) exactly one risk, the CPU
target (docs/pitfalls.md #15). Shared by the tests of ``jpr doctor``, its
``--json`` and ``determinism_risks``.
"""

from __future__ import annotations

from jpr.platform import current_target


def assert_default_risks(risks: list[str]) -> None:
    """The risks of the default set-up are none here, or only the CPU target."""
    if current_target().is_reference:
        assert risks == [], risks
    else:
        assert len(risks) == 1, risks
        assert risks[0].startswith("CPU target ") and "is not the reference platform" in risks[0]


def risks_in_text(out: str) -> list[str]:
    """The risks that ``jpr doctor`` printed (``[]`` for "none found")."""
    tail = out.split("determinism risks:", 1)[1]
    if tail.strip() == "none found":
        return []
    return [line.strip()[2:] for line in tail.splitlines() if line.strip().startswith("- ")]
