"""The CPU code-generation target: part of a run's configuration, like the seed.

XLA:CPU compiles every program for the instruction set of the host it runs on:
with FMA a multiply-add rounds once instead of twice, and the vector width
decides how loops are split. So on the CPU backend a training hash is a
function of (versions, program, **CPU target**), and two x86-64 machines of
different generations print different hashes for the same seed.

jpr pins one portable target per architecture before the JAX backend starts:

======== =================================================================
x86-64   ``--xla_cpu_max_isa=AVX2`` (AVX2 with FMA: every x86-64 CPU since
         about 2013-2015, and the x86 level whose bits are closest to arm64;
         on an AVX-512 CPU some kernels go past the cap, so such a host is
         not the reference: measured, docs/pitfalls.md #15)
aarch64  none: NEON is the baseline, and arm64 is a platform of its own
======== =================================================================

``jpr run``, ``jpr launch`` (each process), ``python -m jpr.run_repro`` and the
docs tests call :func:`pin_cpu_target`; library users call it first thing in
their own script. A ``--xla_cpu_max_isa`` of your own in ``XLA_FLAGS`` wins and
is recorded as yours; ``JPR_CPU_TARGET=native`` turns the pin off.

The pin is a request: :func:`probe` measures what the backend really does (the
hash of a small program whose bits move with FMA, vector width and the matmul
kernels), and records carry it, so a kernel that ignored the cap would show up
as a different target instead of a silent mismatch.

This module does not import JAX unless :func:`probe` or :func:`current_target`
is called: pinning only edits ``XLA_FLAGS``, which must happen before the
backend starts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform as _platform
import sys
from collections.abc import MutableMapping
from typing import Any

from jpr.errors import JprError

__all__ = [
    "ENV_TARGET",
    "REFERENCE_TARGETS",
    "CpuTarget",
    "current_target",
    "host_isa",
    "pin_cpu_target",
    "probe",
    "reference_flags",
]

#: ``JPR_CPU_TARGET=native`` turns the pin off (XLA then targets the host).
ENV_TARGET = "JPR_CPU_TARGET"

#: The pinned ``--xla_cpu_max_isa`` per architecture (``None``: no pin needed).
REFERENCE_TARGETS: dict[str, str | None] = {"x86_64": "AVX2", "aarch64": None}

_ISA_FLAG = "--xla_cpu_max_isa"
# x86 levels in order; a cap at a level also caps everything above it.
_X86_LEVELS = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_CORE")


def _arch() -> str:
    m = _platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_isa(cpuinfo: str | None = None) -> str:
    """The host's vector instruction set level, read from ``/proc/cpuinfo``.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read from the system if None).

    Returns:
        ``"AVX512"``, ``"AVX2+FMA"``, ``"AVX2"``, ``"AVX"``, ``"SSE4_2"`` or
        ``"SSE2"`` on x86-64; ``"NEON"``, ``"SVE"`` or ``"SVE2"`` on arm64;
        ``"unknown"`` where it cannot tell.

    Example:
        >>> from jpr.platform import host_isa
        >>> host_isa("flags\\t\\t: fpu sse4_2 avx avx2 fma\\n")
        'AVX2+FMA'
        >>> host_isa("Features\\t: fp asimd sve\\n")
        'SVE'
    """
    arch = _arch()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(65536)
        except OSError:
            return "unknown"
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
            break
    if arch == "aarch64" or "asimd" in words:  # NEON is part of every ARMv8-A
        # (under qemu user mode /proc/cpuinfo is the x86 host's: NEON, then)
        return next((n for f, n in (("sve2", "SVE2"), ("sve", "SVE")) if f in words), "NEON")
    if "avx512f" in words:
        return "AVX512"
    if "avx2" in words:
        return "AVX2+FMA" if "fma" in words else "AVX2"
    for flag, name in (("avx", "AVX"), ("sse4_2", "SSE4_2"), ("sse2", "SSE2")):
        if flag in words:
            return name
    return "unknown"


def reference_flags(arch: str | None = None) -> list[str]:
    """The ``XLA_FLAGS`` entries that pin the reference target of ``arch``.

    Example:
        >>> from jpr.platform import reference_flags
        >>> reference_flags("x86_64"), reference_flags("aarch64")
        (['--xla_cpu_max_isa=AVX2'], [])
    """
    isa = REFERENCE_TARGETS.get(arch or _arch())
    return [f"{_ISA_FLAG}={isa}"] if isa else []


def _flag_value(flags: str, name: str) -> str | None:
    value = None
    for word in flags.split():
        if word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


@dataclasses.dataclass(frozen=True)
class CpuTarget:
    """What XLA:CPU generates code for, and who chose it.

    Attributes:
        arch: ``x86_64``, ``aarch64``, …
        host_isa: what the host supports (:func:`host_isa`).
        max_isa: the ``--xla_cpu_max_isa`` in force, or ``None`` (the host's own).
        source: ``"jpr"`` (pinned by jpr), ``"user"`` (your ``XLA_FLAGS``) or
            ``"native"`` (no cap: ``JPR_CPU_TARGET=native``, or nothing to pin).
        xla_flags: the whole ``XLA_FLAGS`` string.
    """

    arch: str
    host_isa: str
    max_isa: str | None
    source: str
    xla_flags: str

    @property
    def effective(self) -> str:
        """The level XLA really targets: the cap, unless the host is below it."""
        if self.max_isa is None or self.arch != "x86_64":
            return self.host_isa if self.max_isa is None else self.max_isa
        host = self.host_isa.replace("+FMA", "")
        cap = self.max_isa.upper()
        if host in _X86_LEVELS and cap in _X86_LEVELS:
            return _X86_LEVELS[min(_X86_LEVELS.index(host), _X86_LEVELS.index(cap))]
        return cap

    @property
    def is_reference(self) -> bool:
        """Whether this is the pinned reference target of its architecture."""
        ref = REFERENCE_TARGETS.get(self.arch)
        if self.arch == "x86_64":
            # AVX-512 hosts are not: some kernels go past the cap there (measured;
            # docs/pitfalls.md #15), and their probe says so.
            return self.effective == ref and self.host_isa == "AVX2+FMA"
        return ref is not None and self.effective == ref

    def describe(self) -> str:
        """One line for people, e.g. ``x86_64 AVX2 (pinned by jpr; host AVX512)``."""
        who = {"jpr": "pinned by jpr", "user": "set in XLA_FLAGS", "native": "not pinned"}
        return f"{self.arch} {self.effective} ({who[self.source]}; host {self.host_isa})"

    def as_dict(self) -> dict[str, Any]:
        """The record's ``env.cpu_target`` entry (without the probe)."""
        return {**dataclasses.asdict(self), "effective": self.effective,
                "reference": self.is_reference}


def current_target(environ: MutableMapping[str, str] | None = None) -> CpuTarget:
    """The CPU target that ``XLA_FLAGS`` in ``environ`` asks for (no JAX needed).

    Example:
        >>> from jpr.platform import current_target
        >>> t = current_target({"XLA_FLAGS": "--xla_cpu_max_isa=AVX"})
        >>> t.max_isa, t.source
        ('AVX', 'user')
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    isa = _flag_value(flags, _ISA_FLAG)
    pinned = env.get("_JPR_PINNED_FLAGS", "")
    if isa is None:
        source = "native"
    elif pinned and all(f in flags.split() for f in pinned.split()):
        source = "jpr"
    else:
        source = "user"
    return CpuTarget(_arch(), host_isa(), isa, source, flags)


def _backend_started() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


def pin_cpu_target(environ: MutableMapping[str, str] | None = None) -> CpuTarget:
    """Pin XLA:CPU's code-generation target before the JAX backend starts.

    Adds :func:`reference_flags` to ``XLA_FLAGS`` unless ``XLA_FLAGS`` already
    names a ``--xla_cpu_max_isa`` (yours wins) or ``JPR_CPU_TARGET=native``.
    Call it before the first JAX computation; calling it again is harmless.

    Returns:
        The :class:`CpuTarget` now in force.

    Raises:
        JprError: the backend already started without the pin (the target of a
            running backend cannot change).

    Example:
        >>> from jpr.platform import pin_cpu_target
        >>> env = {}
        >>> pin_cpu_target(env).max_isa in (None, "AVX2"), "XLA_FLAGS" in env or not env
        (True, True)
    """
    env = os.environ if environ is None else environ
    setting = env.get(ENV_TARGET, "").strip().lower()
    if setting not in ("", "native", "reference", "pinned"):
        raise JprError(f"{ENV_TARGET}={setting!r}: use 'native' (no pin) or leave it unset")
    flags = env.get("XLA_FLAGS", "")
    inherited = env.get("_JPR_PINNED_FLAGS", "").split()
    if setting == "native" and inherited:  # a pinned parent's flags: take them out
        flags = " ".join(f for f in flags.split() if f not in inherited)
        env["XLA_FLAGS"] = flags
        env.pop("_JPR_PINNED_FLAGS", None)
    wanted = [] if setting == "native" else reference_flags()
    if _flag_value(flags, _ISA_FLAG) is None and wanted:
        missing = [f for f in wanted if f not in flags.split()]
        if missing and env is os.environ and _backend_started():
            raise JprError(
                "the JAX backend already started without jpr's CPU target "
                f"({' '.join(wanted)}): call jpr.platform.pin_cpu_target() before the first "
                f"JAX computation, put it in XLA_FLAGS, or set {ENV_TARGET}=native"
            )
        env["XLA_FLAGS"] = " ".join([*flags.split(), *missing])
        env["_JPR_PINNED_FLAGS"] = " ".join(wanted)
    return current_target(env)


@functools.cache
def probe() -> str:
    """A 16-hex fingerprint of the code the backend generates (starts JAX).

    The hash of a small jitted program whose bits depend on FMA contraction,
    vector width and the matmul kernels: equal fingerprints mean the float
    code generation agreed on this program; different ones prove it did not.
    Measured once per process: a running backend's target cannot change.

    Example:
        >>> from jpr.platform import probe
        >>> len(probe())
        16
    """
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def program(key):
        ka, kb = jax.random.split(key)
        a = jax.random.normal(ka, (96, 64), jnp.float32)
        b = jax.random.normal(kb, (64, 48), jnp.float32)
        h = jnp.tanh(a @ b) * 1.25 + jnp.exp(-jnp.abs(a[:, :48]))
        z = jax.nn.log_softmax(h @ b.T, axis=-1)
        return z, jnp.sum(z * a), a[:, 0] * b[0, 0] + a[:, 1]

    out = jax.device_get(program(jax.random.key(0)))
    digest = hashlib.sha256()
    for leaf in out:
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]
