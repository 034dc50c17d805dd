"""The environment fingerprint: everything outside the config that can change bits."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

__all__ = ["determinism_risks", "environment"]

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions, backend, devices, processes and the JAX flags that decide the bits.

    Example:
        >>> from jpr.envinfo import environment
        >>> env = environment()
        >>> env["backend"], env["jax_default_prng_impl"]
        ('cpu', 'threefry2x32')
        >>> sorted(env["cpu_target"])[:4]
        ['arch', 'effective', 'host_isa', 'max_isa']
    """
    import jax

    from jpr import platform as cpu

    devices = jax.devices()
    env: dict[str, Any] = {"python": platform.python_version()}
    env.update({name: _version(name) for name in _PACKAGES})
    env.update(
        backend=jax.default_backend(),
        device_kind=devices[0].device_kind,
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        jax_threefry_partitionable=bool(jax.config.jax_threefry_partitionable),
        jax_default_prng_impl=str(jax.config.jax_default_prng_impl),
        jax_enable_x64=bool(jax.config.jax_enable_x64),
        XLA_FLAGS=os.environ.get("XLA_FLAGS", ""),
        machine=platform.machine(),
        cpu_target={**cpu.current_target().as_dict(), "probe": cpu.probe(),
                    "probe_families": cpu.probe_families()},
    )
    return env


# What each PRNG implementation promises, from the summary table of the `jax.random`
# module documentation (jax/random.py, JAX 0.10.2): Threefry and Philox (both widths)
# are identical across shardings and across CPU/GPU/TPU; rbg and unsafe_rbg across
# shardings only (not under --xla_tpu_spmd_rng_bit_generator_unsafe=1), not across
# backends, and `jax.vmap` over their keys is not exact.
_COUNTER_BASED = "identical across shardings and CPU/GPU/TPU, but another stream than threefry2x32"
_RBG = (
    "identical across shardings{sharding}, not across CPU/GPU/TPU; "
    "jax.vmap over its keys is not exact"
)
_PRNG_PROMISES = {  # impl: (what it is, what it promises)
    "threefry4x32": ("", _COUNTER_BASED),
    "philox2x32": ("", _COUNTER_BASED),
    "philox4x32": ("", _COUNTER_BASED),
    "rbg": (" (XLA's RandomBitGenerator; keys derived with threefry)", _RBG),
    "unsafe_rbg": (" (XLA's RandomBitGenerator, for keys too)", _RBG),
}
_RBG_UNSAFE_FLAG = "xla_tpu_spmd_rng_bit_generator_unsafe"


def _prng_risks(env: dict[str, Any]) -> list[str]:
    """The risks of the threefry flag and of the default PRNG implementation in ``env``.

    Example:
        >>> from jpr.envinfo import _prng_risks
        >>> _prng_risks({"jax_default_prng_impl": "philox2x32"})[0][:44]
        'default PRNG impl is philox2x32: identical a'
    """
    risks = []
    impl = env.get("jax_default_prng_impl", "threefry2x32")
    if not env.get("jax_threefry_partitionable", True) and impl in ("threefry2x32", "rbg"):
        risks.append(
            "jax_threefry_partitionable is off: threefry draws and split keys are another "
            "stream than the default since JAX 0.5.0, and sharded random arrays are not "
            "generated shard by shard (the bits still do not depend on the sharding)"
        )
    if impl == "threefry2x32":
        return risks
    what, promise = _PRNG_PROMISES.get(impl, ("", "not in JAX's table: nothing is promised"))
    if _RBG_UNSAFE_FLAG in env.get("XLA_FLAGS", ""):
        sharding = f" only without --{_RBG_UNSAFE_FLAG} (which is set)"
    else:
        sharding = f" (not under --{_RBG_UNSAFE_FLAG}=1)"
    risks.append(
        f"default PRNG impl is {impl}{what}: {promise.format(sharding=sharding)}; every key "
        "made without impl= changes (jpr's own keys still use threefry2x32)"
    )
    return risks


def determinism_risks(env: dict[str, Any]) -> list[str]:
    """Plain-language risks to bitwise reproducibility seen in ``env``.

    The PRNG messages follow the summary table of the ``jax.random`` module
    documentation, one message per implementation.

    Example:
        >>> from jpr.envinfo import determinism_risks
        >>> determinism_risks({"jax_threefry_partitionable": False, "backend": "cpu",
        ...                    "jax_default_prng_impl": "threefry2x32", "XLA_FLAGS": ""})[0][:47]
        'jax_threefry_partitionable is off: threefry dra'
    """
    risks = _prng_risks(env)
    flags = env.get("XLA_FLAGS", "")
    if env.get("backend") == "gpu" and "xla_gpu_deterministic_ops=true" not in flags:
        risks.append(
            "GPU without --xla_gpu_deterministic_ops=true: scatter-adds, matrix products, "
            "convolutions and attention may differ run to run (XLA's list), and autotuning "
            "may pick other kernels at each compilation"
        )
    if env.get("jax_enable_x64"):
        risks.append(
            "jax_enable_x64 is on: default dtypes are 64-bit, so hashes differ from x64-off runs"
        )
    target = env.get("cpu_target")
    if env.get("backend") == "cpu" and target and not target.get("reference"):
        risks.append(_cpu_risk(target))
    if env.get("process_count", 1) > 1:
        risks.append(
            "multi-process run: the bits are independent of the process count only with "
            "--microbatches (a fixed-order reduction)"
        )
    return risks


def _cpu_risk(target: dict) -> str:
    from jpr.platform import CpuTarget

    t = CpuTarget.from_dict(target)
    return (
        f"CPU target {t.arch} {t.effective} (host {t.host_isa}) is {t.verdict()}: float "
        "results (training hashes) may differ from those printed on the reference platform"
    )
