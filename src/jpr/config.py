"""The run configuration and its fingerprint.

Everything that changes the bits of a run lives in :class:`RunConfig`. The
number of steps does not: a run of 40 steps resumed to 60 is the same run as
one of 60 steps, so ``steps`` is kept out of the fingerprint that checkpoints
are checked against.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

__all__ = ["RunConfig", "config_diff", "fingerprint"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides the bits of a training run.

    Attributes:
        seed: root seed of every key in the run.
        batch_size: global batch size (summed over all processes).
        lr: Adam learning rate.
        dropout: dropout rate of the hidden layer (0 turns dropout off).
        hidden: width of the hidden layer (the seed's MLP is 64 -> 32 -> 10).
        features: input features of the synthetic data.
        classes: number of classes.
        dataset_size: examples in the synthetic training set.
        eval_size: examples in the held-out evaluation set.
        microbatches: split each global batch into this many microbatches whose
            gradients are summed in one fixed order (topology-invariant bits);
            ``None`` means plain data parallelism.

    Example:
        >>> from jpr.config import RunConfig
        >>> RunConfig(seed=0).fingerprint()[:12]
        '8bfb23cb21a4'
    """

    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    dropout: float = 0.1
    hidden: int = 32
    features: int = 64
    classes: int = 10
    dataset_size: int = 4096
    eval_size: int = 1024
    microbatches: int | None = None

    def __post_init__(self) -> None:
        problems = list(self.problems())
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self):
        """Yield a message for every invalid field (used for CLI errors)."""
        ints = ("seed", "batch_size", "hidden", "features", "classes", "dataset_size", "eval_size")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                yield f"{name} must be an integer, got {v!r}"
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            yield f"seed must be in [0, 2**32), got {self.seed}"
        for name in ("batch_size", "hidden", "features", "eval_size"):
            v = getattr(self, name)
            if isinstance(v, int) and v <= 0:
                yield f"{name} must be positive, got {v}"
        if isinstance(self.classes, int) and self.classes < 2:
            yield f"classes must be at least 2, got {self.classes}"
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and self.lr < float("inf")):
            yield f"lr must be a positive finite number, got {self.lr!r}"
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            yield f"dropout must be in [0, 1), got {self.dropout!r}"
        b, n = self.batch_size, self.dataset_size
        if isinstance(b, int) and isinstance(n, int) and b > 0 and n < b:
            yield f"dataset_size ({n}) must be at least batch_size ({b})"
        m = self.microbatches
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
                yield f"microbatches must be a positive integer, got {m!r}"
            elif isinstance(b, int) and b > 0 and b % m:
                yield f"batch_size ({b}) must be divisible by microbatches ({m})"

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error.

        Example:
            >>> from jpr.config import RunConfig
            >>> RunConfig.from_dict(RunConfig(seed=3).to_dict()).seed
            3
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the config (64 hex digits)."""
        return fingerprint(self.to_dict())


def fingerprint(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of any JSON-able config dict (64 hex digits).

    Keys are sorted and no whitespace is written, so the order in which a dict
    was built does not matter. ``RunConfig.fingerprint()`` is this of its dict.

    Example:
        >>> from jpr.config import RunConfig, fingerprint
        >>> fingerprint({"lr": 0.1, "seed": 0}) == fingerprint({"seed": 0, "lr": 0.1})
        True
        >>> fingerprint(RunConfig().to_dict()) == RunConfig().fingerprint()
        True
    """
    try:
        blob = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config is not JSON-able: {e}") from None
    return hashlib.sha256(blob.encode()).hexdigest()


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The fields that differ between two config dicts, as ``name: a -> b``.

    Example:
        >>> from jpr.config import RunConfig, config_diff
        >>> config_diff(RunConfig(seed=1).to_dict(), RunConfig(seed=2, lr=0.01).to_dict())
        ['lr: 0.001 -> 0.01', 'seed: 1 -> 2']
    """
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            out.append(f"{k}: {a.get(k, '<missing>')} -> {b.get(k, '<missing>')}")
    return out
