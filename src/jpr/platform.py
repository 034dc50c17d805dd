"""The CPU target: part of a run's configuration, like the seed.

On the CPU backend a training hash is a function of (versions, program, **CPU
target**). Three places pick their code from the CPU a program runs on, and
each needs its own setting (measured; docs/hardware.md has the tables):

- XLA's own code generation (LLVM): with FMA a multiply-add rounds once, and
  the vector width decides how loops are split. ``--xla_cpu_max_isa`` caps it;
  ``--xla_cpu_enable_platform_dependent_math=false`` stops XLA from choosing
  per-CPU math (it did on AVX-512 hosts).
- YNNPACK, which XLA hands canonical matrix products and reductions: its dot
  kernels gave one result on AVX2, AVX-512 and arm64, its reduce kernels
  another on arm64 than on x86-64, so reductions stay with XLA
  (``--xla_cpu_experimental_ynn_fusion_type=-reduce``).
- oneDNN, whose sgemm Eigen calls for every *non-canonical* matrix product (the
  weight gradients autodiff writes): it reads CPUID and ignores XLA's cap.
  :func:`jpr.portable` keeps products out of it; ``ONEDNN_MAX_CPU_ISA=AVX2``
  pins whatever still reaches it.

jpr pins these before the JAX backend starts (:data:`PIN`). ``jpr run``, ``jpr
launch`` (each process), ``python -m jpr.run_repro`` and the docs tests call
:func:`pin_cpu_target`; library users call it first thing in their own script.
A value of your own (in ``XLA_FLAGS`` or the environment) wins and is recorded
as yours; ``JPR_CPU_TARGET=native`` turns the whole pin off, in child processes
too.

The pin is a request: :func:`probe` measures what the backend really does (one
small program per kernel family a training step uses), and records carry it, so
a kernel that escaped the pin shows up as a different target, never as a silent
match. The reference platform is every x86-64 CPU with AVX2 and FMA, AVX-512
ones included, under the whole pin.

This module does not import JAX unless :func:`probe` is called: pinning only
edits the environment, which must happen before the backend starts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform as _platform
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

from jpr.errors import JprError

__all__ = [
    "ENV_TARGET",
    "LIBRARY_FAMILIES",
    "PIN",
    "PORTABLE_FAMILIES",
    "REFERENCE_TARGETS",
    "CpuTarget",
    "Setting",
    "current_target",
    "host_isa",
    "pin_cpu_target",
    "probe",
    "probe_families",
    "reference_flags",
]

#: ``JPR_CPU_TARGET=native`` turns the pin off (XLA then targets the host).
ENV_TARGET = "JPR_CPU_TARGET"
# What jpr itself added to this process's environment ("NAME=value" words):
# a child with JPR_CPU_TARGET=native takes exactly these out again.
_PINNED_ENV = "_JPR_PINNED_FLAGS"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of the pin: an ``XLA_FLAGS`` flag or an environment variable.

    Attributes:
        name: ``--xla_cpu_…`` (a flag in ``XLA_FLAGS``) or a variable's name.
        value: the pinned value.
        governs: what it pins, in a few words.
    """

    name: str
    value: str
    governs: str

    @property
    def is_flag(self) -> bool:
        """Whether the setting lives in ``XLA_FLAGS`` (else it is a variable)."""
        return self.name.startswith("--")

    @property
    def word(self) -> str:
        """``name=value``, as it appears in ``XLA_FLAGS`` or ``env``."""
        return f"{self.name}={self.value}"


_ISA_FLAG = "--xla_cpu_max_isa"
_MATH = Setting("--xla_cpu_enable_platform_dependent_math", "false",
                "XLA's choice of per-CPU math")
_REDUCE = Setting("--xla_cpu_experimental_ynn_fusion_type", "-reduce",
                  "reductions by XLA's loops, not YNNPACK's per-CPU reduce kernels")

#: The pin per architecture (the settings :func:`pin_cpu_target` adds).
PIN: dict[str, tuple[Setting, ...]] = {
    "x86_64": (
        Setting(_ISA_FLAG, "AVX2", "XLA's own code generation (LLVM): AVX2 with FMA"),
        _MATH,
        _REDUCE,
        Setting("ONEDNN_MAX_CPU_ISA", "AVX2", "oneDNN's sgemm, which reads CPUID itself"),
    ),
    "aarch64": (_MATH, _REDUCE),
}

#: The pinned ``--xla_cpu_max_isa`` per architecture (``None``: none needed).
REFERENCE_TARGETS: dict[str, str | None] = {
    arch: next((s.value for s in pin if s.name == _ISA_FLAG), None) for arch, pin in PIN.items()
}
#: How a record's ``source`` reads to people.
SOURCE_WORDS = {"jpr": "pinned by jpr", "user": "set by you", "native": "not pinned"}

# x86 levels in order; a cap at a level also caps everything above it.
_X86_LEVELS = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_CORE")
# Hosts whose pinned target is the reference: AVX2 with FMA, and AVX-512 ones
# (whose every kernel family the pin brings down to AVX2; measured).
_REFERENCE_HOSTS = ("AVX2+FMA", "AVX512")


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
    """The ``XLA_FLAGS`` entries of the pin of ``arch`` (its variables: :data:`PIN`).

    Example:
        >>> from jpr.platform import reference_flags
        >>> reference_flags("x86_64")[0], len(reference_flags("aarch64"))
        ('--xla_cpu_max_isa=AVX2', 2)
    """
    return [s.word for s in PIN.get(arch or _arch(), ()) if s.is_flag]


def _flag_value(flags: str, name: str) -> str | None:
    value = None
    for word in flags.split():
        if word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def _in_force(env: Mapping[str, str], setting: Setting) -> str | None:
    if setting.is_flag:
        return _flag_value(env.get("XLA_FLAGS", ""), setting.name)
    return env.get(setting.name)


@dataclasses.dataclass(frozen=True)
class CpuTarget:
    """What XLA:CPU and the libraries it calls generate code for, and who chose it.

    Attributes:
        arch: ``x86_64``, ``aarch64``, …
        host_isa: what the host supports (:func:`host_isa`).
        max_isa: the ``--xla_cpu_max_isa`` in force, or ``None`` (the host's own).
        source: ``"jpr"`` (pinned by jpr), ``"user"`` (a pinned setting has a
            value of yours) or ``"native"`` (no pin: ``JPR_CPU_TARGET=native``).
        xla_flags: the whole ``XLA_FLAGS`` string.
        settings: every setting of the architecture's pin, with the value in
            force (``None``: not set).
        user: the names of the settings whose value you set yourself.
    """

    arch: str
    host_isa: str
    max_isa: str | None
    source: str
    xla_flags: str
    settings: dict[str, str | None] = dataclasses.field(default_factory=dict)
    user: tuple[str, ...] = ()

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
        """Whether this is the reference platform: an x86-64 host with AVX2+FMA
        (AVX-512 included) with every setting of the pin in force."""
        if self.arch != "x86_64" or self.host_isa not in _REFERENCE_HOSTS:
            return False
        pinned = {s.name: s.value for s in PIN["x86_64"]}
        return self.settings == pinned and self.effective == REFERENCE_TARGETS["x86_64"]

    def verdict(self) -> str:
        """Whether this is the reference platform, and why not, in plain words.

        Example:
            >>> from jpr.platform import PIN, CpuTarget
            >>> pin = {s.name: s.value for s in PIN["x86_64"]}
            >>> print(CpuTarget("x86_64", "AVX512", "AVX2", "jpr", "", pin).verdict())
            the reference platform (x86-64 with AVX2 and FMA, AVX-512 included, under jpr's pin)
            >>> CpuTarget("x86_64", "AVX512", None, "native", "").verdict()[:46]
            'not the reference platform: the pin is off (JP'
        """
        if self.is_reference:
            return ("the reference platform (x86-64 with AVX2 and FMA, AVX-512 included, "
                    "under jpr's pin)")
        if self.source == "native" and not self.user:
            why = f"the pin is off ({ENV_TARGET}=native)"
        elif self.user and self.arch == "x86_64":
            why = "settings of yours replace jpr's: " + ", ".join(
                f"{n}={self.settings[n]}" for n in self.user)
        elif self.arch == "x86_64":
            why = f"this CPU ({self.host_isa}) lacks AVX2 with FMA"
        elif self.arch == "aarch64":
            why = ("arm64 computes some kernel families (products left to a runtime "
                   "library, convolutions) otherwise; jpr.portable training steps agree "
                   "(docs/hardware.md)")
        else:
            why = f"no reference is recorded for {self.arch}"
        return f"not the reference platform: {why}"

    def describe(self) -> str:
        """One line for people, e.g. ``x86_64 AVX2 (pinned by jpr; host AVX512)``."""
        return f"{self.arch} {self.effective} ({SOURCE_WORDS[self.source]}; host {self.host_isa})"

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> CpuTarget:
        """The target a record's ``env.cpu_target`` entry describes (its inverse).

        Example:
            >>> from jpr.platform import CpuTarget
            >>> t = CpuTarget("x86_64", "AVX512", "AVX", "user", "", {"a": "b"}, ("a",))
            >>> CpuTarget.from_dict(t.as_dict()) == t
            True
        """
        return cls(entry["arch"], entry["host_isa"], entry.get("max_isa"), entry["source"],
                   entry.get("xla_flags", ""), dict(entry.get("settings") or {}),
                   tuple(entry.get("user") or ()))

    def as_dict(self) -> dict[str, Any]:
        """The record's ``env.cpu_target`` entry (without the probe)."""
        return {**dataclasses.asdict(self), "user": list(self.user),
                "effective": self.effective, "reference": self.is_reference}


def current_target(environ: Mapping[str, str] | None = None) -> CpuTarget:
    """The CPU target that the environment asks for (no JAX needed).

    Example:
        >>> from jpr.platform import current_target
        >>> t = current_target({"XLA_FLAGS": "--xla_cpu_max_isa=AVX"})
        >>> t.max_isa, t.source
        ('AVX', 'user')
    """
    env = os.environ if environ is None else environ
    arch = _arch()
    pin = PIN.get(arch, ())
    settings = {s.name: _in_force(env, s) for s in pin}
    mine = set(env.get(_PINNED_ENV, "").split())
    user = tuple(s.name for s in pin
                 if settings[s.name] is not None and f"{s.name}={settings[s.name]}" not in mine)
    if user:
        source = "user"
    elif any(v is not None for v in settings.values()):
        source = "jpr"
    else:
        source = "native"
    flags = env.get("XLA_FLAGS", "")
    return CpuTarget(arch, host_isa(), _flag_value(flags, _ISA_FLAG), source, flags,
                     settings, user)


def _backend_started() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


def _unpin(env: MutableMapping[str, str]) -> None:
    """Take out what a pinned parent process added (``JPR_CPU_TARGET=native``)."""
    inherited = set(env.pop(_PINNED_ENV, "").split())
    flags = env.get("XLA_FLAGS", "")
    kept = [f for f in flags.split() if f not in inherited]
    if kept != flags.split():
        env["XLA_FLAGS"] = " ".join(kept)
    for word in inherited:
        name, _, value = word.partition("=")
        if not name.startswith("--") and env.get(name) == value:
            del env[name]


def pin_cpu_target(environ: MutableMapping[str, str] | None = None) -> CpuTarget:
    """Pin the CPU target (every setting of :data:`PIN`) before JAX's backend starts.

    Adds each setting of the architecture's pin that the environment does not
    already set: a value of your own wins and is recorded as yours.
    ``JPR_CPU_TARGET=native`` pins nothing and takes out what a pinned parent
    process added. Call it before the first JAX computation; calling it again is
    harmless.

    Returns:
        The :class:`CpuTarget` now in force.

    Raises:
        JprError: the backend already started without the pin (the target of a
            running backend cannot change), or ``JPR_CPU_TARGET`` is not understood.

    Example:
        >>> from jpr.platform import pin_cpu_target
        >>> env = {}
        >>> target = pin_cpu_target(env)
        >>> target.source in ("jpr", "native"), target.user
        (True, ())
    """
    env = os.environ if environ is None else environ
    setting = env.get(ENV_TARGET, "").strip().lower()
    if setting not in ("", "native", "reference", "pinned"):
        raise JprError(f"{ENV_TARGET}={setting!r}: use 'native' (no pin) or leave it unset")
    if setting == "native":
        _unpin(env)
        return current_target(env)
    missing = [s for s in PIN.get(_arch(), ()) if _in_force(env, s) is None]
    if missing and env is os.environ and _backend_started():
        raise JprError(
            "the JAX backend already started without jpr's CPU target "
            f"({' '.join(s.word for s in missing)}): call jpr.pin_cpu_target() before the "
            f"first JAX computation, set them yourself, or set {ENV_TARGET}=native"
        )
    flags = env.get("XLA_FLAGS", "").split()
    for s in missing:
        if s.is_flag:
            flags.append(s.word)
        else:
            env[s.name] = s.value
    if missing:
        env["XLA_FLAGS"] = " ".join(flags)
        env[_PINNED_ENV] = " ".join([*env.get(_PINNED_ENV, "").split(),
                                     *(s.word for s in missing)])
    return current_target(env)


#: The kernel families a step written through :func:`jpr.portable` reaches: the
#: ones :func:`probe` fingerprints.
PORTABLE_FAMILIES = ("dot", "dot_portable", "conv_portable", "reduce", "transcendental", "fma")
#: The families left to a runtime library (Eigen, oneDNN): recorded, not probed.
LIBRARY_FAMILIES = ("dot_library", "conv_library")


def _weight_grad(a: Any, b: Any) -> Any:
    # h.T @ g of a 32-wide layer and 10 classes: XLA leaves this one a plain dot
    return a[:64, :32].T @ b[:64, :10]


def _probe_programs() -> dict[str, Any]:
    """One small jitted program per kernel family a training step uses."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jpr.portability import portable

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def conv_loss(w, x):
        return jnp.mean(jnp.tanh(conv(jax.nn.relu(conv(x, w[0])), w[1])) ** 2)

    def convs(x, w):
        return conv(jax.nn.relu(conv(x, w[0])), w[1]), jax.grad(conv_loss)(w, x)

    return {
        # canonical products: YNNPACK's dot kernels
        "dot": lambda a, b, **_: jnp.tanh(a[:, :48] @ b[:48]) @ b[48:],
        # a weight gradient's product, rewritten by jpr.portable
        "dot_portable": lambda a, b, **_: portable(_weight_grad)(a, b),
        # the same product as autodiff writes it: Eigen → oneDNN on x86-64
        "dot_library": lambda a, b, **_: _weight_grad(a, b),
        # two convolutions and their gradients, rewritten by jpr.portable
        "conv_portable": lambda x, w, **_: portable(convs)(x, w),
        # the same left to the runtime library (oneDNN on x86-64)
        "conv_library": lambda x, w, **_: convs(x, w),
        "reduce": lambda a, v, **_: (jnp.sum(v), jnp.mean(a, axis=0), jnp.max(v),
                                     jax.nn.logsumexp(a, axis=-1)),
        "transcendental": lambda v, **_: (jnp.exp(v), jnp.tanh(v), jnp.log1p(jnp.abs(v)),
                                          jax.nn.sigmoid(v), jnp.sin(v), lax.erf(v)),
        "fma": lambda a, b, **_: a[:, :48] * b[0, :48] + a[:, 1:49],
    }


def _probe_inputs() -> dict[str, Any]:
    """Inputs from NumPy's PCG64: the same bits on every machine, nothing to compile."""
    import numpy as np

    r = np.random.default_rng(0)

    def normal(*shape: int, scale: float = 1.0) -> Any:
        return (r.standard_normal(shape) * scale).astype(np.float32)

    return {
        "a": normal(96, 64),
        "b": normal(96, 48),
        "v": normal(8192),
        "x": normal(4, 12, 12, 3),
        "w": (normal(3, 3, 3, 8, scale=0.3), normal(3, 3, 8, 16, scale=0.2)),
    }


@functools.cache
def probe_families() -> dict[str, str]:
    """An 8-hex fingerprint per kernel family a training step uses (starts JAX).

    ``dot`` (canonical products), ``dot_portable`` (a weight gradient's
    product as :func:`jpr.portable` writes it), ``dot_library`` (the same
    product left to the runtime library), ``conv_portable`` and
    ``conv_library`` (two convolutions and their gradients, the same two
    ways), ``reduce``, ``transcendental`` and ``fma``. Equal fingerprints mean that
    family computed the same bits; measured once per process (a running
    backend's target cannot change).

    Example:
        >>> from jpr.platform import probe_families
        >>> sorted(probe_families())[:3]
        ['conv_library', 'conv_portable', 'dot']
    """
    import hashlib

    import jax
    import numpy as np

    inputs = _probe_inputs()
    programs = _probe_programs()

    @jax.jit
    def every_family(inputs):  # one compilation: under emulation each costs seconds
        return {name: fn(**{k: v for k, v in inputs.items() if k in fn.__code__.co_varnames})
                for name, fn in programs.items()}

    out = {}
    for name, result in jax.device_get(every_family(inputs)).items():
        digest = hashlib.sha256()
        for leaf in jax.tree_util.tree_leaves(result):
            digest.update(np.ascontiguousarray(leaf).tobytes())
        out[name] = digest.hexdigest()[:8]
    return dict(sorted(out.items(), key=lambda kv: list(programs).index(kv[0])))


@functools.cache
def probe() -> str:
    """A 16-hex fingerprint of what the backend computes (starts JAX).

    The hash of the :data:`PORTABLE_FAMILIES` of :func:`probe_families`, the
    kernels a training step written through :func:`jpr.portable` reaches:
    equal fingerprints mean they computed the same bits; different ones prove
    some did not (:func:`probe_families` says which). The families left to a
    runtime library are recorded beside it, not in it: they differ between
    x86-64 machines even under the pin (oneDNN's convolutions follow the
    CPU's caches, measured) and on arm64, and no portable step reaches them.

    Example:
        >>> from jpr.platform import probe
        >>> len(probe())
        16
    """
    import hashlib

    families = probe_families()
    text = " ".join(f"{k}={families[k]}" for k in sorted(PORTABLE_FAMILIES))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
