"""jpr: the JAX PRNG Reproducibility Playbook library.

The public API for your own training loop, in one namespace::

    import jpr

    jpr.pin_cpu_target()                           # first: the CPU target is part of the run
    step = jax.jit(jpr.portable(step))            # every product in the form every CPU agrees on
    key = jpr.step_key(root, "dropout", t)        # keys from (seed, stream, step)
    tracer = jpr.Tracer("runs/a.json", config=cfg) # per-step hashes, for `jpr compare`
    with jpr.Checkpointer("ckpt") as ckpt:         # verified Orbax checkpoints of any pytree
        ckpt.save_pytree(t, state, config=cfg)
    jpr.testing.assert_resume_equivalent(init, step, steps=6, at=3)

Names are loaded on first use (module ``__getattr__``): ``import jpr`` stays
light, and ``jpr compare``, which imports ``jpr.compare`` through this
package, never loads JAX (importing ``jpr.rng`` would, at once, and that costs
more than the comparison itself).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it.
_EXPORTS = {
    "root_key": "jpr.rng",
    "stream_key": "jpr.rng",
    "step_key": "jpr.rng",
    "microbatch_key": "jpr.rng",
    "hash_pytree": "jpr.hashing",
    "leaf_hashes": "jpr.hashing",
    "Tracer": "jpr.trace",
    "Checkpointer": "jpr.checkpoint",
    "CorruptCheckpoint": "jpr.checkpoint",
    "JprError": "jpr.errors",
    "pin_cpu_target": "jpr.platform",
    "portable": "jpr.portability",
    "read_record": "jpr.record",
    "compare_records": "jpr.compare",
    "format_result": "jpr.compare",
}
_SUBMODULES = ("testing",)

__all__ = [
    "Checkpointer",
    "CorruptCheckpoint",
    "JprError",
    "Tracer",
    "__version__",
    "compare_records",
    "format_result",
    "hash_pytree",
    "leaf_hashes",
    "microbatch_key",
    "pin_cpu_target",
    "portable",
    "read_record",
    "root_key",
    "step_key",
    "stream_key",
    "testing",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from jpr import testing
    from jpr.checkpoint import Checkpointer, CorruptCheckpoint
    from jpr.compare import compare_records, format_result
    from jpr.errors import JprError
    from jpr.hashing import hash_pytree, leaf_hashes
    from jpr.platform import pin_cpu_target
    from jpr.portability import portable
    from jpr.record import read_record
    from jpr.rng import microbatch_key, root_key, step_key, stream_key
    from jpr.trace import Tracer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"jpr.{name}")
    else:
        raise AttributeError(f"module 'jpr' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
