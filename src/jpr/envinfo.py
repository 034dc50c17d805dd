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


def determinism_risks(env: dict[str, Any]) -> list[str]:
    """Plain-language risks to bitwise reproducibility seen in ``env``.

    Example:
        >>> from jpr.envinfo import determinism_risks
        >>> determinism_risks({"jax_threefry_partitionable": False, "backend": "cpu",
        ...                    "jax_default_prng_impl": "threefry2x32", "XLA_FLAGS": ""})[0][:40]
        'jax_threefry_partitionable is off: rando'
    """
    risks = []
    if not env.get("jax_threefry_partitionable", True):
        risks.append(
            "jax_threefry_partitionable is off: random bits depend on sharding and differ "
            "from the default since JAX 0.5.0"
        )
    impl = env.get("jax_default_prng_impl", "threefry2x32")
    if impl != "threefry2x32":
        risks.append(
            f"default PRNG impl is {impl}: its bits are not guaranteed stable across "
            "backends, shardings or JAX versions (jpr's own keys still use threefry2x32)"
        )
    flags = env.get("XLA_FLAGS", "")
    if env.get("backend") == "gpu" and "xla_gpu_deterministic_ops=true" not in flags:
        risks.append(
            "GPU without --xla_gpu_deterministic_ops=true: scatter-add and some reductions "
            "may differ run to run"
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
