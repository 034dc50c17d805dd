"""The CPU canary: the reference training hashes, computed on this CPU.

Pins the CPU target (jpr.platform), then prints, as one JSON object:

- ``target``: what the pin asked for, and the host;
- ``families``: the fingerprint of each kernel family
  (:func:`jpr.platform.probe_families`) and ``probe``, the hash of those a
  portable step reaches;
- ``home``: the home page's library example, 10 steps of seed 0 (the hash of
  the whole state), and ``home_steps``: the params hash after each step;
- ``run5``: the record hash of ``jpr run --steps 5 --seed 0``.

``--check FILE`` compares with the recorded values (``scripts/cpu_canary.json``):
the training values (``home``, ``home_steps``, ``run5``) must equal the
recorded ones on *every* CPU; the probe must equal the one recorded for this
architecture. It exits 1 with one line per value that differs. ``--write
FILE --label NAME`` records what it measured instead (see CONTRIBUTING.md).

It is short on purpose: CI runs it under emulated CPUs (``qemu-x86_64 -cpu
Haswell``, an AVX2 machine; arm64 in a chroot), about 25 times slower than
native. See ``scripts/emulated_canaries.sh``.

    python scripts/cpu_canary.py [--check FILE] [--write FILE --label NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from jpr.platform import current_target, pin_cpu_target

pin_cpu_target()  # before JAX starts

import jax  # noqa: E402  (after the pin)

from jpr import data, hashing, rng, train  # noqa: E402
from jpr.config import RunConfig  # noqa: E402
from jpr.platform import (  # noqa: E402
    LIBRARY_FAMILIES,
    PORTABLE_FAMILIES,
    probe,
    probe_families,
)
from jpr.run_repro import build_parser, run  # noqa: E402

TRAINING = ("home", "home_steps", "run5")


def home_page(seed: int = 0, steps: int = 10) -> tuple[str, list[str]]:
    """The home page's ``run(seed)``, with the params hash after every step."""
    cfg = RunConfig(seed=seed)
    mesh = train.make_mesh(jax.devices()[:1])
    graphdef, state = train.init_state(cfg, mesh=mesh)
    ds = data.make_dataset(cfg)
    root = rng.root_key(cfg.seed)
    step_fn = train.make_train_step(cfg, graphdef, mesh=mesh)
    per_step = []
    for step in range(steps):
        x, y = data.get_batch(step, ds=ds, batch_size=cfg.batch_size)
        state.params, state.opt_state, _ = step_fn(
            state.params, state.opt_state, root, x, y, step
        )
        state.step = step + 1
        per_step.append(hashing.hash_pytree(state.params)[:12])
    return hashing.hash_pytree(train.state_tree(state, root)), per_step


def _phase(name: str, since: list[float]) -> None:
    """One line on stderr per phase: under emulation the canary takes minutes."""
    now = time.perf_counter()
    print(f"cpu canary: {name} in {now - since[0]:.1f} s", file=sys.stderr, flush=True)
    since[0] = now


def measure() -> dict:
    """Every value the canary checks, measured in this process."""
    since = [time.perf_counter()]
    target = current_target()
    families = probe_families()
    _phase("probe", since)
    home, home_steps = home_page()
    _phase("home page, 10 steps", since)
    with tempfile.TemporaryDirectory() as folder:
        args = build_parser().parse_args(
            ["--steps", "5", "--seed", "0", "--out", str(Path(folder) / "run.json")]
        )
        record = run(args, out=lambda *a, **k: None)
    _phase("jpr run --steps 5", since)
    return {
        "target": {"arch": target.arch, "host_isa": target.host_isa,
                   "describe": target.describe(), "settings": target.settings},
        "families": families,
        "probe": probe(),
        "home": home,
        "home_steps": home_steps,
        "run5": record["hash"],
    }


def differences(got: dict, recorded: dict) -> list[str]:
    """What differs from the recorded values, one line each.

    The training values and the probe (the families a portable step reaches)
    must be the recorded ones on every CPU. The families left to a runtime
    library are not checked: they differ between CPUs even under the pin.
    """
    lines = [
        f"{key}: {got[key]} != recorded {recorded['training'][key]}"
        for key in TRAINING
        if got[key] != recorded["training"][key]
    ]
    if got["probe"] != recorded["probe"]:
        moved = sorted(k for k in PORTABLE_FAMILIES
                       if got["families"][k] != recorded["families"].get(k))
        lines.append(f"probe: {got['probe']} != recorded {recorded['probe']} "
                     f"({', '.join(moved)})")
    return lines


def write(got: dict, path: Path, label: str) -> None:
    """Record ``got`` in ``path`` as measured on the CPU ``label``.

    A change of the training values or of the probe starts the record anew
    (every CPU kind must then be measured again); the library families are
    kept per CPU.
    """
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    training = {key: got[key] for key in TRAINING}
    if recorded.get("training") != training or recorded.get("probe") != got["probe"]:
        recorded = {"training": training, "probe": got["probe"],
                    "families": {k: got["families"][k] for k in PORTABLE_FAMILIES},
                    "library": {}}
    recorded["library"][label] = {k: got["families"][k] for k in LIBRARY_FAMILIES}
    recorded["library"] = dict(sorted(recorded["library"].items()))
    path.write_text(json.dumps(recorded, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", type=Path, help="the recorded values to compare with")
    p.add_argument("--write", type=Path, help="record the values measured here in this file")
    p.add_argument("--label", help="the CPU's name in the record (default: its target)")
    args = p.parse_args(argv)
    got = measure()
    print(json.dumps(got, indent=1))
    if args.write is not None:
        write(got, args.write, args.label or got["target"]["describe"])
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
