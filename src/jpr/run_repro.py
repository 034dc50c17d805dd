"""``jpr run`` / ``python -m jpr.run_repro``: train, checkpoint, resume, record.

Every flag of the original product works as documented there::

    python -m jpr.run_repro --steps 50 --batch-size 64 --seed 0 --out runs/test1.json

The run is a pure function of its config: the batch of step ``t`` and the
dropout key of step ``t`` depend only on (seed, t), so a run resumed from a
checkpoint at step ``N`` continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from jpr.config import RunConfig
from jpr.errors import JprError

__all__ = ["build_parser", "main", "run"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise JprError(message)


def _restore_arg(text: str) -> int | str:
    if text == "latest":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a step number or 'latest', got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value}")
    return value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``run`` flags to a parser (shared by ``jpr run`` and ``run_repro``)."""
    d = RunConfig()
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=50, help="train until this step (default 50)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    g.add_argument("--seed", type=int, default=d.seed, help="root seed (default 0)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default 1e-3)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout rate (default 0.1)")
    g.add_argument("--hidden", type=int, default=d.hidden, help="hidden width (default 32)")
    g.add_argument("--dataset-size", type=int, default=d.dataset_size, help="training examples")
    g.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help="split each batch into M microbatches reduced in a fixed order "
        "(bits independent of device and process count)",
    )
    g.add_argument("--out", type=Path, help="write the run record (JSON) here")
    g.add_argument(
        "--trace-every",
        type=int,
        default=1,
        metavar="K",
        help="record (step, loss, params hash) every K steps (default 1)",
    )
    g.add_argument(
        "--perturb-at",
        type=int,
        metavar="STEP",
        help="after STEP, flip the lowest bit of params/fc1/kernel[0, 0] (a one-ULP change)",
    )
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-dir", type=Path, help="Orbax checkpoint folder")
    c.add_argument(
        "--save-at", type=int, action="append", default=[], metavar="N", help="save after step N"
    )
    c.add_argument("--save-every", type=int, metavar="K", help="save every K steps")
    c.add_argument(
        "--restore-from",
        type=_restore_arg,
        metavar="N|latest",
        help="resume from the checkpoint at step N, or the newest complete one",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: only on a terminal)",
    )
    m = p.add_argument_group("multi-process")
    m.add_argument("--coordinator-address", help="host:port of process 0")
    m.add_argument("--num-processes", type=int, help="total processes")
    m.add_argument("--process-id", type=int, help="index of this process")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m jpr.run_repro``."""
    p = _Parser(prog="python -m jpr.run_repro", description=__doc__.split("\n")[0])
    add_run_arguments(p)
    return p


def _config(args: argparse.Namespace) -> RunConfig:
    try:
        return RunConfig(
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
            dropout=args.dropout,
            hidden=args.hidden,
            dataset_size=args.dataset_size,
            microbatches=args.microbatches,
        )
    except ValueError as e:
        raise JprError(str(e)) from None


def _validate(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise JprError(f"--steps must be at least 1, got {args.steps}")
    for n in args.save_at:
        if not 0 <= n <= args.steps:
            raise JprError(f"--save-at {n} is outside [0, --steps {args.steps}]")
    if args.save_every is not None and args.save_every < 1:
        raise JprError(f"--save-every must be at least 1, got {args.save_every}")
    if args.trace_every < 1:
        raise JprError(f"--trace-every must be at least 1, got {args.trace_every}")
    if args.perturb_at is not None and not 1 <= args.perturb_at <= args.steps:
        raise JprError(f"--perturb-at must be in [1, --steps {args.steps}], got {args.perturb_at}")
    wants_dir = args.save_at or args.save_every is not None or args.restore_from is not None
    if wants_dir and args.checkpoint_dir is None:
        raise JprError("--save-at, --save-every and --restore-from need --checkpoint-dir")
    if isinstance(args.restore_from, int) and args.restore_from > args.steps:
        raise JprError(f"--restore-from {args.restore_from} is past --steps {args.steps}")
    if args.out is not None and args.out.is_dir():
        raise JprError(f"--out {args.out} is a directory")


def _init_distributed(args: argparse.Namespace) -> None:
    given = [args.coordinator_address, args.num_processes, args.process_id]
    if all(v is None for v in given):
        return
    if any(v is None for v in given):
        raise JprError(
            "--coordinator-address, --num-processes and --process-id go together"
        )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
    )


class _Progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.last = enabled, total, 0.0

    def update(self, step: int, loss: Any) -> None:
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or step == self.total):
            self.last = now
            print(f"\rstep {step}/{self.total} loss {float(loss):.4f}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def run(args: argparse.Namespace, *, out=print) -> dict[str, Any]:
    """Run training as described by parsed ``args``; returns the run record."""
    _validate(args)
    cfg = _config(args)
    _init_distributed(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpr import data, hashing, rng, train
    from jpr.envinfo import environment
    from jpr.record import SCHEMA, write_json_atomic

    pidx, pcount = jax.process_index(), jax.process_count()
    say = out if pidx == 0 else (lambda *a, **k: None)
    ds = data.make_dataset(cfg)
    graphdef, state = train.init_state(cfg)
    root = rng.root_key(cfg.seed)
    mesh = train.make_mesh()
    try:
        step_fn = train.make_train_step(cfg, graphdef, mesh=mesh)
    except ValueError as e:
        raise JprError(str(e)) from None
    multi = mesh.devices.size > 1
    batch_sharding = NamedSharding(mesh, P(train.AXIS))
    replicated = NamedSharding(mesh, P())

    ckpt = None
    if args.checkpoint_dir is not None:
        from jpr.checkpoint import Checkpointer

        # Restoring a given step needs the folder; "latest" on a fresh folder starts at 0.
        ckpt = Checkpointer(args.checkpoint_dir, create=not isinstance(args.restore_from, int))

    trajectory: list[dict[str, Any]] = []
    resumed_from = None
    if args.restore_from is not None:
        step = ckpt.latest() if args.restore_from == "latest" else args.restore_from
        if step is None:
            say(f"no complete checkpoint in {args.checkpoint_dir} yet: starting from step 0")
        else:
            state, meta = ckpt.restore(step, cfg=cfg, template=state)
            if state.step > args.steps:
                raise JprError(f"checkpoint step {state.step} is past --steps {args.steps}")
            trajectory = [e for e in meta.get("trajectory", []) if e["step"] <= state.step]
            resumed_from = {
                "step": state.step,
                "checkpoint_dir": str(args.checkpoint_dir),
                "state_hash": meta["state_hash"],
            }
            say(
                f"restored step {state.step} from {args.checkpoint_dir} "
                f"(state_hash {meta['state_hash'][:16]} verified)"
            )

    params, opt_state = state.params, state.opt_state
    if multi:
        params, opt_state = jax.device_put((params, opt_state), replicated)

    def put(a):
        if not multi:
            return a
        global_shape = (a.shape[0] * pcount, *a.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding, a, global_shape)

    pending: list[tuple[int, Any, Any]] = []

    def flush() -> list[dict[str, Any]]:
        for step, loss, p in pending:
            leaves = hashing.leaf_hashes(p)
            trajectory.append(
                {
                    "step": step,
                    "loss": None if loss is None else float(loss).hex(),
                    "params_hash": hashing.hash_pytree(p),
                    "leaves": leaves,
                }
            )
        pending.clear()
        return trajectory

    if state.step == 0 and not trajectory:
        pending.append((0, None, params))

    saves = set(args.save_at)
    saved: list[dict[str, Any]] = []

    def save(step: int) -> None:
        flush()
        st = train.TrainState(params=params, opt_state=opt_state, step=step)
        if step in ckpt.steps():
            existing = ckpt.read_meta(step)["state_hash"]
            mine = hashing.hash_pytree(train.state_tree(st, root))
            if existing != mine:
                raise JprError(
                    f"checkpoint step {step} already exists in {args.checkpoint_dir} "
                    "with a different state; use another --checkpoint-dir"
                )
            say(f"checkpoint step {step} already in {args.checkpoint_dir} (identical)")
            return
        h = ckpt.save(st, root=root, cfg=cfg, trajectory=list(trajectory))
        saved.append({"step": step, "state_hash": h})
        say(f"saved step {step} to {args.checkpoint_dir} (state_hash {h[:16]})")

    if ckpt is not None and state.step in saves and resumed_from is None:
        save(state.step)

    progress = _Progress(
        args.progress if args.progress is not None else sys.stderr.isatty() and pidx == 0,
        args.steps,
    )
    perturb_leaf = "params/fc1/kernel"
    loss = None
    for step in range(state.step, args.steps):
        x, y = data.get_batch(
            step, ds=ds, batch_size=cfg.batch_size, process_index=pidx, process_count=pcount
        )
        params, opt_state, loss = step_fn(params, opt_state, root, put(x), put(y), np.uint32(step))
        done = step + 1
        if args.perturb_at == done:
            k = jax.lax.bitcast_convert_type(params["fc1"]["kernel"], jnp.uint32)
            k = k.at[0, 0].set(k[0, 0] ^ jnp.uint32(1))
            kernel = jax.lax.bitcast_convert_type(k, jnp.float32)
            params = {**params, "fc1": {**params["fc1"], "kernel": kernel}}
            say(f"perturbed {perturb_leaf}[0, 0] by one ULP after step {done}")
        if done % args.trace_every == 0 or done == args.steps:
            pending.append((done, loss, params))
        if ckpt is not None and (
            done in saves or (args.save_every is not None and done % args.save_every == 0)
        ):
            save(done)
        progress.update(done, loss)
    progress.close()
    flush()

    final = train.TrainState(params=params, opt_state=opt_state, step=args.steps)
    eval_loss, eval_acc = train.evaluate(graphdef, params, ds.eval_x, ds.eval_y)
    tree = train.state_tree(final, root)
    record = {
        "schema": SCHEMA,
        "hash": hashing.hash_pytree(params),
        "state_hash": hashing.hash_pytree(tree),
        "steps": args.steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "backend": jax.default_backend(),
        "final": {
            # JSON has no NaN: a diverged run records null (loss_hex keeps "nan").
            "loss": eval_loss if np.isfinite(eval_loss) else None,
            "acc": eval_acc,
            "loss_hex": float(eval_loss).hex(),
            # A run resumed at its last step trains nothing: the checkpoint's trajectory knows.
            "train_loss_hex": float(loss).hex() if loss is not None else next(
                (e["loss"] for e in trajectory if e["step"] == args.steps), None
            ),
        },
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "leaf_hashes": hashing.leaf_hashes(tree),
        "trace_every": args.trace_every,
        "trajectory": trajectory,
        "perturb_at": args.perturb_at,
        "resumed_from": resumed_from,
        "checkpoints_saved": saved,
        "env": environment(),
    }
    if ckpt is not None:
        ckpt.close()
    say(f"final step {args.steps}: eval loss {eval_loss:.4f} acc {eval_acc:.4f}")
    say(f"hash       {record['hash']}")
    say(f"state_hash {record['state_hash']}")
    if args.out is not None and pidx == 0:
        write_json_atomic(args.out, record)
        say(f"wrote {args.out}")
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m jpr.run_repro``; returns the exit code."""
    from jpr.cli import guarded

    return guarded(lambda: run(build_parser().parse_args(argv)) and 0, prog="jpr run")


if __name__ == "__main__":
    sys.exit(main())
