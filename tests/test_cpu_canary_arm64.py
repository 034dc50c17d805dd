"""The CPU canary on emulated arm64 (a file of its own: it runs beside the
emulated AVX2 one on another pytest-xdist worker). See ``test_cpu_canary.py``."""

from __future__ import annotations

import pytest
from test_cpu_canary import emulated_canary


@pytest.mark.slow
@pytest.mark.emulated  # also slow: `-m "slow and not emulated"` leaves the emulations out
def test_emulated_arm64_prints_the_recorded_values():
    got = emulated_canary("arm64")
    assert (got["target"]["arch"], got["target"]["host_isa"]) == ("aarch64", "NEON")
