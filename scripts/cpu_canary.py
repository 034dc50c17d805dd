"""The CPU canary: the reference training hashes, computed on this CPU.

Pins the CPU target (jpr.platform), then prints, as one JSON object:

- ``target``: what the pin asked for, and the host;
- ``families``: the probe's fingerprint of each kernel family
  (:func:`jpr.platform.probe_families`) and ``probe``, their hash;
- ``home``: the home page's library example, 10 steps of seed 0 (the hash of
  the whole state), and ``home_steps``: the params hash after each step;
- ``run5``: the record hash of ``jpr run --steps 5 --seed 0``.

``--check FILE`` compares with the recorded values (``scripts/cpu_canary.json``):
the training values (``home``, ``home_steps``, ``run5``) must equal the
recorded ones on *every* CPU; the probe must equal the one recorded for this
architecture. It exits 1 with one line per value that differs.

It is short on purpose: CI runs it under emulated CPUs (``qemu-x86_64 -cpu
Haswell``, an AVX2 machine; arm64 in a chroot), about 25 times slower than
native. See ``scripts/emulated_canaries.sh``.

    python scripts/cpu_canary.py [--check scripts/cpu_canary.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from jpr.platform import current_target, pin_cpu_target

pin_cpu_target()  # before JAX starts

import jax  # noqa: E402  (after the pin)

from jpr import data, hashing, rng, train  # noqa: E402
from jpr.config import RunConfig  # noqa: E402
from jpr.platform import probe, probe_families  # noqa: E402
from jpr.run_repro import build_parser, run  # noqa: E402

TRAINING = ("home", "home_steps", "run5")


def home_page(seed: int = 0, steps: int = 10) -> tuple[str, list[str]]:
    """The home page's ``run(seed)``, with the params hash after every step."""
    cfg = RunConfig(seed=seed)
    graphdef, state = train.init_state(cfg)
    ds = data.make_dataset(cfg)
    root = rng.root_key(cfg.seed)
    step_fn = train.make_train_step(cfg, graphdef, mesh=train.make_mesh(jax.devices()[:1]))
    per_step = []
    for step in range(steps):
        x, y = data.get_batch(step, ds=ds, batch_size=cfg.batch_size)
        state.params, state.opt_state, _ = step_fn(
            state.params, state.opt_state, root, x, y, step
        )
        state.step = step + 1
        per_step.append(hashing.hash_pytree(state.params)[:12])
    return hashing.hash_pytree(train.state_tree(state, root)), per_step


def measure() -> dict:
    """Every value the canary checks, measured in this process."""
    target = current_target()
    home, home_steps = home_page()
    with tempfile.TemporaryDirectory() as folder:
        args = build_parser().parse_args(
            ["--steps", "5", "--seed", "0", "--out", str(Path(folder) / "run.json")]
        )
        record = run(args, out=lambda *a, **k: None)
    return {
        "target": {"arch": target.arch, "host_isa": target.host_isa,
                   "describe": target.describe(), "settings": target.settings},
        "families": probe_families(),
        "probe": probe(),
        "home": home,
        "home_steps": home_steps,
        "run5": record["hash"],
    }


def differences(got: dict, recorded: dict) -> list[str]:
    """What differs from the recorded values, one line each."""
    lines = [
        f"{key}: {got[key]} != recorded {recorded['training'][key]}"
        for key in TRAINING
        if got[key] != recorded["training"][key]
    ]
    arch = got["target"]["arch"]
    want = recorded["probe"].get(arch)
    if want is None:
        lines.append(f"probe: nothing recorded for {arch}")
    elif got["probe"] != want["probe"]:
        moved = sorted(k for k, v in got["families"].items() if want["families"].get(k) != v)
        lines.append(f"probe: {got['probe']} != recorded {want['probe']} ({', '.join(moved)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", type=Path, help="the recorded values to compare with")
    args = p.parse_args(argv)
    got = measure()
    print(json.dumps(got, indent=1))
    if args.check is None:
        return 0
    diff = differences(got, json.loads(args.check.read_text(encoding="utf-8")))
    where = got["target"]["describe"]
    for line in diff:
        print(f"cpu canary ({where}): {line}", file=sys.stderr)
    if not diff:
        print(f"cpu canary ({where}): every value equals the recorded one", file=sys.stderr)
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
