"""The same run on 1, 2, 4 and 8 devices and on 2 processes: which bits move?

Run it from the repository root, or with the records of 2-process runs of the
same config (see docs/multi-host.md)::

    python snippets/multi_host/topology_table.py [RECORD.json ...]

It simulates 8 CPU devices (XLA must be told before JAX starts, so this is a
script of its own), trains the default config for 20 steps on meshes of 1, 2,
4 and 8 of them, once with ``microbatches=8`` and once plain data parallel,
and compares every run with the 1-device run: final params hash, first step
whose params differ, and the largest distance in ULPs over all params. Each
record (``jpr run --out`` in two processes, ``--steps 20``) fills its column of
a "2 processes" row from the params hashes it holds for every step.
"""

from __future__ import annotations

import argparse
import json
import os

# Before `import jax`: ask XLA for eight simulated CPU devices.
flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jpr import data, hashing, rng, train  # noqa: E402
from jpr.config import RunConfig  # noqa: E402

MODES = {"microbatches=8": 8, "data parallel": None}


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in units in the last place between two float32 arrays."""

    def ordered(x):  # float32 bits -> integers in the order of the floats
        i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    return int(np.abs(ordered(a) - ordered(b)).max())


def train_on(cfg: RunConfig, devices: list, steps: int) -> tuple[list[str], dict]:
    """Train on a mesh of ``devices``: params hash after each step, final params."""
    mesh = train.make_mesh(devices)
    graphdef, state = train.init_state(cfg)
    step_fn = train.make_train_step(cfg, graphdef, mesh=mesh)
    params, opt_state = jax.device_put((state.params, state.opt_state), NamedSharding(mesh, P()))
    ds, root = data.make_dataset(cfg), rng.root_key(cfg.seed)
    batch = NamedSharding(mesh, P(train.AXIS))
    hashes = []
    for step in range(steps):
        x, y = jax.device_put(data.get_batch(step, ds=ds, batch_size=cfg.batch_size), batch)
        params, opt_state, _ = step_fn(params, opt_state, root, x, y, np.uint32(step))
        hashes.append(hashing.hash_pytree(params))
    return hashes, jax.tree.map(np.asarray, params)


def from_record(path: str, steps: int) -> tuple[int | None, list[str]]:
    """The mode of a 2-process ``jpr run`` record and its params hash after each step."""
    with open(path) as f:
        record = json.load(f)
    cfg = RunConfig.from_dict(record["config"])
    if cfg != RunConfig(seed=0, microbatches=cfg.microbatches) or record["steps"] != steps:
        raise SystemExit(f"{path}: not the default config trained for {steps} steps")
    by_step = {e["step"]: e["params_hash"] for e in record["trajectory"]}
    return cfg.microbatches, [by_step[s] for s in range(1, steps + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="*", help="run records of 2-process runs")
    parser.add_argument("--steps", type=int, default=20, help="steps per run (default 20)")
    args = parser.parse_args()

    print(f"{'':<22}" + "".join(f"{mode:<34}" for mode in MODES).rstrip())
    print((f"{'topology':<22}" + "params hash       diverges  ULPs    " * 2).rstrip())
    reference: dict = {}  # mode -> hashes and final params of the 1-device run
    known: dict = {}  # final params hash -> final params (identical hash, identical bits)
    rows = {f"{n} device{'s' * (n > 1)}": {} for n in (1, 2, 4, 8)}
    for n, row in zip((1, 2, 4, 8), rows.values(), strict=True):
        for m in MODES.values():
            row[m] = train_on(RunConfig(seed=0, microbatches=m), jax.devices()[:n], args.steps)
            known[row[m][0][-1]] = row[m][1]
    if args.records:
        rows["2 processes"] = {}
        for path in args.records:
            m, hashes = from_record(path, args.steps)
            rows["2 processes"][m] = (hashes, known.get(hashes[-1]))
    for name, row in rows.items():
        line = f"{name:<22}"
        for m in MODES.values():
            if m not in row:
                line += f"{'(not run)':<38}"
                continue
            hashes, params = row[m]
            ref_hashes, ref_params = reference.setdefault(m, row[m])
            steps = zip(hashes, ref_hashes, strict=True)
            differ = [i + 1 for i, (a, b) in enumerate(steps) if a != b]
            if params is None:  # bits seen nowhere here: the distance is unknown
                ulp = "?"
            else:
                pairs = zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
                ulp = max(ulps(a, b) for a, b in pairs)
            line += f"{hashes[-1][:16]}  {differ[0] if differ else '-':>8}  {ulp:>4}    "
        print(line.rstrip())


if __name__ == "__main__":
    main()
