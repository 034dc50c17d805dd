"""How far the bits move when the device count changes, and what invariance costs.

Without ``--microbatches`` the gradient of a batch is reduced across devices in
an order that depends on how many there are, so runs on 1, 2, 4 and 8 devices
drift apart. This script trains the default config plain data parallel on
meshes of 1, 2, 4 and 8 simulated CPU devices (one process) and on 2
processes (``jpr launch -n 2 -- jpr run``, read back from its checkpoint), and
reports against the 1-device run:

* the first step whose params differ (by hash);
* the largest ULP distance over all params after steps 1, 10, 100, ... and at
  the end, and the largest absolute difference at the end;
* the largest ULP distance of the training loss over all steps.

Then it times a step with ``microbatches=8`` against a plain step on the same
mesh (interleaved, best of ``--repeat``): ``RATIO topology.invariance_cost.Nd``
is what bitwise invariance costs on N devices (reported, no target).

    python benchmarks/topology_ulps.py [--steps 200] [--no-processes] [--quick] [--json out.json]
"""

from __future__ import annotations

import os

# Before `import jax`: eight simulated CPU devices.
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=8"])

import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import _common as c  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jpr import data, hashing, rng, train  # noqa: E402
from jpr.config import RunConfig  # noqa: E402

DEVICES = (1, 2, 4, 8)


def ordered(x) -> np.ndarray:
    """float32 bits as integers in the order of the floats (so ULP distance = difference)."""
    i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def ulps(a, b) -> int:
    """Largest ULP distance between two pytrees of float32 arrays."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(int(np.abs(ordered(x) - ordered(y)).max()) for x, y in pairs)


def max_abs(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs)


class Trainer:
    """The jitted step of ``cfg`` on a mesh of ``n`` devices, and a run from step 0."""

    def __init__(self, cfg: RunConfig, n: int):
        self.cfg, self.mesh = cfg, train.make_mesh(jax.devices()[:n])
        self.graphdef, self.state = train.init_state(cfg)
        self.step_fn = train.make_train_step(cfg, self.graphdef, mesh=self.mesh)
        self.ds, self.root = data.make_dataset(cfg), rng.root_key(cfg.seed)
        self.batch = NamedSharding(self.mesh, P(train.AXIS))
        self.replicated = NamedSharding(self.mesh, P())

    def start(self):
        return jax.device_put((self.state.params, self.state.opt_state), self.replicated)

    def step(self, params, opt_state, step: int):
        xy = data.get_batch(step, ds=self.ds, batch_size=self.cfg.batch_size)
        x, y = jax.device_put(xy, self.batch)
        return self.step_fn(params, opt_state, self.root, x, y, np.uint32(step))

    def run(self, steps: int):
        """Params after every step (host copies) and the loss of every step."""
        params, opt_state = self.start()
        history, losses = [], []
        for step in range(steps):
            params, opt_state, loss = self.step(params, opt_state, step)
            history.append(jax.tree.map(np.asarray, params))
            losses.append(np.float32(loss))
        return history, losses


def two_processes(steps: int) -> tuple[list[str], dict, list[np.float32]]:
    """Per-step params hashes, final params and losses of ``jpr run`` in 2 processes."""
    from jpr.checkpoint import Checkpointer

    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable,
            "-m",
            "jpr",
            "launch",
            "-n",
            "2",
            "--",
            "jpr",
            "run",
            "--steps",
            str(steps),
            "--no-progress",
            "--checkpoint-dir",
            f"{d}/ck",
            "--save-at",
            str(steps),
        ]
        env = c.child_env(XLA_FLAGS=" ".join(_flags) or None)
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=1800)
        cfg = RunConfig(seed=0)
        ckpt = Checkpointer(f"{d}/ck", create=False)
        state, meta = ckpt.restore(steps, cfg=cfg, template=train.init_state(cfg)[1])
        ckpt.close()
    traj = {e["step"]: e for e in meta["trajectory"]}
    hashes = [traj[s]["params_hash"] for s in range(1, steps + 1)]
    losses = [np.float32(float.fromhex(traj[s]["loss"])) for s in range(1, steps + 1)]
    return hashes, jax.tree.map(np.asarray, state.params), losses


def main() -> None:
    p = c.parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 200)")
    p.add_argument("--no-processes", action="store_true", help="skip the 2-process run")
    args = p.parse_args()
    steps = args.steps or (10 if args.quick else 200)
    repeat = args.repeat or (3 if args.quick else 20)
    report = c.Report("topology_ulps", args)
    marks = [s for s in (1, 10, 100, 1000, 10000) if s < steps] + [steps]

    plain = RunConfig(seed=0)
    runs = {f"{n}d": Trainer(plain, n).run(steps) for n in DEVICES}
    ref_hist, ref_loss = runs["1d"]
    ref_hashes = [hashing.hash_pytree(h) for h in ref_hist]
    results = {
        name: (
            [hashing.hash_pytree(h) for h in hist],
            hist[-1],
            loss,
            {s: ulps(hist[s - 1], ref_hist[s - 1]) for s in marks},
        )
        for name, (hist, loss) in runs.items()
    }
    if not args.no_processes:
        hashes, final, loss = two_processes(steps)
        results["2p"] = (hashes, final, loss, {steps: ulps(final, ref_hist[-1])})

    print(f"data parallel, {steps} steps, against 1 device:")
    for name, (hashes, final, loss, by_step) in results.items():
        differ = [i + 1 for i, (a, b) in enumerate(zip(hashes, ref_hashes, strict=True)) if a != b]
        loss_ulps = max(
            abs(int(ordered(a)) - int(ordered(b))) for a, b in zip(loss, ref_loss, strict=True)
        )
        report.figure(f"{name}.first_diverging_step", differ[0] if differ else None)
        report.figure(f"{name}.params_ulps_by_step", by_step)
        report.figure(f"{name}.max_abs_diff_at_end", max_abs(final, ref_hist[-1]))
        report.figure(f"{name}.max_loss_ulps", loss_ulps)

    print(
        f"cost of invariance: a step with microbatches=8 against a plain step (best of {repeat}):"
    )
    micro = RunConfig(seed=0, microbatches=8)
    for n in DEVICES:
        trainers = {"plain": Trainer(plain, n), "micro": Trainer(micro, n)}
        states = {k: t.start() for k, t in trainers.items()}

        def one(k, trainers=trainers, states=states):
            jax.block_until_ready(trainers[k].step(*states[k], 0))

        for k in trainers:
            one(k)  # compile
        times = c.interleaved({k: (lambda k=k: one(k)) for k in trainers}, repeat)
        t_plain, t_micro = c.best(times["plain"]), c.best(times["micro"])
        report.figure(
            f"{n}d.step_seconds",
            {"plain": t_plain, "micro": t_micro},
            f"plain {t_plain * 1e3:.2f} ms, microbatches=8 {t_micro * 1e3:.2f} ms",
        )
        report.ratio(
            f"topology.invariance_cost.{n}d",
            t_micro / t_plain,
            target="reported",
            met=None,
            baseline=f"plain data-parallel step on {n} device(s)",
            jpr=f"microbatches=8 step on {n} device(s)",
            what="time of a bitwise topology-invariant step relative to a plain one",
        )
    report.finish()


if __name__ == "__main__":
    main()
