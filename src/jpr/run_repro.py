"""``jpr run`` / ``python -m jpr.run_repro``: train, checkpoint, resume, record.

Every flag of the original product works as documented there::

    python -m jpr.run_repro --steps 50 --batch-size 64 --seed 0 --out runs/test1.json

The run is a pure function of its config: the batch of step ``t`` and the
dropout key of step ``t`` depend only on (seed, t), so a run resumed from a
checkpoint at step ``N`` continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from jpr.config import RunConfig
from jpr.errors import JprError

__all__ = ["build_parser", "compilation_cache_dir", "enable_compilation_cache", "main", "run"]


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
    c.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="keep only the newest N checkpoints (older ones are removed once a newer one "
        "is saved and verified; default: keep all)",
    )
    c.add_argument(
        "--keep-every",
        type=int,
        metavar="K",
        help="with --keep, also keep every checkpoint whose step is a multiple of K",
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
    # The classic multi-host bug, on purpose (docs and tests): fold the process
    # index into the init key. The cross-process check catches it at step 0.
    m.add_argument("--bug-fold-process-into-init", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m jpr.run_repro``.

    Example:
        >>> from jpr.run_repro import build_parser
        >>> args = build_parser().parse_args(["--steps", "60", "--restore-from", "latest"])
        >>> args.steps, args.restore_from, args.batch_size
        (60, 'latest', 64)
    """
    from jpr.cli import Parser

    p = Parser(prog="python -m jpr.run_repro", description=__doc__.split("\n")[0])
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
    for flag, value in (("--keep", args.keep), ("--keep-every", args.keep_every)):
        if value is not None and value < 1:
            raise JprError(f"{flag} must be at least 1, got {value}")
    if args.keep_every is not None and args.keep is None:
        raise JprError("--keep-every needs --keep (without --keep every checkpoint is kept)")
    if args.keep is not None and args.checkpoint_dir is None:
        raise JprError("--keep needs --checkpoint-dir")
    if isinstance(args.restore_from, int) and args.restore_from > args.steps:
        raise JprError(f"--restore-from {args.restore_from} is past --steps {args.steps}")
    if args.out is not None and args.out.is_dir():
        raise JprError(f"--out {args.out} is a directory")
    if args.out is not None:
        _check_writable(args.out)


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written before training, not after it."""
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # missing folders are created when the record is written
    if not parent.is_dir():
        raise JprError(f"--out {out}: cannot write there ({parent.name} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JprError(f"--out {out}: cannot write there (no write permission)")


def _init_distributed(args: argparse.Namespace) -> str | None:
    # Flags, else the environment of `jpr launch`, else a cluster JAX detects.
    from jpr import distributed

    return distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


class _Progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.last = enabled, total, 0.0

    def update(self, step: int, loss: Any) -> None:
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or step == self.total):
            self.last = now
            import numpy as np

            losses, i = loss  # (losses of the chunk, index): read only when printed
            loss = np.asarray(losses)[i]
            print(f"\rstep {step}/{self.total} loss {float(loss):.4f}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def compilation_cache_dir() -> Path | None:
    """Where ``jpr run`` keeps compiled XLA programs between runs, or ``None`` (off).

    ``$JPR_COMPILATION_CACHE`` set to ``0`` turns the cache off and set to a path
    moves it; by default it is ``$XDG_CACHE_HOME/jpr/xla`` (``~/.cache/jpr/xla``).
    A ``JAX_COMPILATION_CACHE_DIR`` of your own wins, and is used as you set it
    up. Each host kind gets its own sub-folder: JAX's cache key does not cover the
    CPU's instruction set, and a shared home folder must never hand one machine
    code compiled for another. A cached program is the program XLA would compile
    again, so the bits do not depend on the cache (the benchmarks check it).

    Example:
        >>> import os
        >>> from unittest import mock
        >>> from jpr.run_repro import compilation_cache_dir
        >>> with mock.patch.dict(os.environ, {"JPR_COMPILATION_CACHE": "0"}):
        ...     print(compilation_cache_dir())
        None
    """
    setting = os.environ.get("JPR_COMPILATION_CACHE", "").strip()
    if setting.lower() in {"0", "off", "false", "no"} or os.environ.get(
        "JAX_COMPILATION_CACHE_DIR"
    ):
        return None
    if setting:
        base = Path(setting).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jpr" / "xla"
    return base / _host_tag()


def _host_tag() -> str:
    import hashlib
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    cpu += line
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        cpu = platform.processor()
    blob = f"{platform.system()}|{platform.machine()}|{cpu}".encode()
    return f"{platform.machine()}-{hashlib.sha256(blob).hexdigest()[:12]}"


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in :func:`compilation_cache_dir`.

    Does nothing if the cache is off, already configured in this process, or its
    folder cannot be written. Returns the folder in use, or ``None``.

    Example:
        >>> from jpr.run_repro import enable_compilation_cache
        >>> where = enable_compilation_cache()
        >>> where is None or where.is_dir()
        True
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return None
    where = compilation_cache_dir()
    if where is None:
        return None
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(where, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    # jpr's programs are small: each compiles in well under JAX's default 1 s
    # threshold, and together they are most of a short run's start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


#: Most steps fused into one dispatch, and the most batch bytes staged for them.
MAX_CHUNK_STEPS = 256
MAX_CHUNK_BYTES = 8 << 20


def _chunk_width(cfg: RunConfig, process_count: int) -> int:
    """Steps per dispatch: a function of the config only (the bits never depend on it)."""
    per_step = (cfg.batch_size // max(process_count, 1)) * (cfg.features + 1) * 4
    return max(1, min(MAX_CHUNK_STEPS, MAX_CHUNK_BYTES // max(per_step, 1)))


def _chunk_end(step: int, args: argparse.Namespace, width: int) -> int:
    """Where the chunk starting at ``step`` stops: ``width`` steps on, or sooner
    at a step the host must see (a save, the perturbation, the last step)."""
    stop = min(step + width, args.steps)
    for n in args.save_at:
        if step < n < stop:
            stop = n
    if args.save_every is not None:
        stop = min(stop, (step // args.save_every + 1) * args.save_every)
    if args.perturb_at is not None and step < args.perturb_at < stop:
        stop = args.perturb_at
    return stop


def run(args: argparse.Namespace, *, out=print) -> dict[str, Any]:
    """Run training as described by parsed ``args``; returns the run record.

    The first SIGTERM or SIGINT stops the run at the next step boundary: the
    checkpoint being written is finished, the current step is saved (with
    ``--checkpoint-dir``) and :class:`jpr.signals.Stopped` is raised (exit
    status 128 + signal). Multi-process runs keep the usual handlers (their
    processes would have to agree on the step to stop at); their checkpoints
    are just as safe from a kill.

    Example:
        >>> from jpr.run_repro import build_parser, run
        >>> lines = []
        >>> a = run(build_parser().parse_args(["--steps", "3"]), out=lines.append)
        >>> b = run(build_parser().parse_args(["--steps", "3"]), out=lines.append)
        >>> a["hash"] == b["hash"], a["steps"], lines[0].startswith("final step 3: eval loss")
        (True, 3, True)
    """
    from jpr.lock import releasing
    from jpr.signals import GracefulStop

    # releasing(): a run that fails leaves no lock on its checkpoint folder.
    with releasing(), GracefulStop(enabled=(args.num_processes or 1) <= 1) as stop:
        return _run(args, out=out, stop=stop)


def _run(args: argparse.Namespace, *, out, stop) -> dict[str, Any]:
    _validate(args)
    cfg = _config(args)
    joined_via = _init_distributed(args)
    enable_compilation_cache()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpr import data, distributed, hashing, rng, train
    from jpr.envinfo import environment
    from jpr.record import SCHEMA, write_json_atomic

    pidx, pcount = jax.process_index(), jax.process_count()
    if pcount > 1:
        stop.release()  # processes would have to agree where to stop: signals act as usual
    say = out if pidx == 0 else (lambda *a, **k: None)
    ds = data.make_dataset(cfg)
    init = train.init_state
    if getattr(args, "bug_fold_process_into_init", False):
        init = distributed.buggy_init_state
    graphdef, state = init(cfg)
    root = rng.root_key(cfg.seed)
    mesh = train.make_mesh()
    width = _chunk_width(cfg, pcount)
    try:
        chunk_fn = train.make_train_chunk(cfg, graphdef, mesh=mesh, width=width)
    except ValueError as e:
        raise JprError(str(e)) from None
    multi = mesh.devices.size > 1
    batch_sharding = NamedSharding(mesh, P(None, train.AXIS))
    replicated = NamedSharding(mesh, P())

    ckpt = None
    if args.checkpoint_dir is not None:
        from jpr.checkpoint import Checkpointer, CorruptCheckpoint

        # Restoring a given step needs the folder; "latest" on a fresh folder starts at 0.
        # The folder's lock is taken first, held until the end: one writer per folder.
        ckpt = Checkpointer(
            args.checkpoint_dir,
            create=not isinstance(args.restore_from, int),
            keep=args.keep,
            keep_every=args.keep_every,
        )
        if ckpt.lock is not None and ckpt.lock.notice:
            say(ckpt.lock.notice)
        for s in ckpt.discarded:
            say(f"ignoring an incomplete save of step {s} in {args.checkpoint_dir} (interrupted)")

    trajectory: list[dict[str, Any]] = []
    resumed_from = None
    if args.restore_from is not None:
        step = ckpt.latest() if args.restore_from == "latest" else args.restore_from
        if step is None:
            say(f"no complete checkpoint in {args.checkpoint_dir} yet: starting from step 0")
        else:
            try:
                state, meta = ckpt.restore(step, cfg=cfg, template=state)
            except CorruptCheckpoint as e:
                if args.restore_from != "latest":
                    raise
                older = [s for s in ckpt.steps() if s < step]
                away = Path(args.checkpoint_dir) / str(step)
                hint = (
                    f"older checkpoints: {', '.join(map(str, older))}; move {away} away "
                    f"and rerun to resume from step {older[-1]}"
                    if older
                    else f"no older checkpoint; move {away} away and rerun to start from step 0"
                )
                raise JprError(f"{e}; --restore-from latest does not skip it: {hint}") from None
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
    # Every process holds the same state: verified (at step 0 this catches an
    # init key that depends on the process), then checked again at each save and
    # at the end.
    step0, checked = state.step, []

    def verify(st: train.TrainState) -> None:
        if pcount > 1:
            distributed.verify_training_state(cfg, st, root)  # a collective: also a barrier
            checked.append(st.step)

    verify(state)
    data_fp = distributed.DataFingerprint()
    if multi:
        # From host copies: restored arrays are committed to a local device, and
        # moving those onto other processes' devices is a cross-host transfer.
        host = jax.tree_util.tree_map(np.asarray, (params, opt_state))
        params, opt_state = jax.device_put(host, replicated)

    def put(a):
        # a is stacked per step: [width, local batch, ...]; the batch axis is sharded.
        if not multi:
            return a
        global_shape = (a.shape[0], a.shape[1] * pcount, *a.shape[2:])
        return jax.make_array_from_process_local_data(batch_sharding, a, global_shape)

    # (step, loss, params, digests): trajectory entries not written yet; params
    # are hashed in flush() unless their digests were computed already.
    pending: list[tuple[int, Any, Any, Any]] = []
    # The chunk dispatched last, hashed only after the next one is dispatched, so
    # hashing on the host overlaps training on the device.
    inflight: list[tuple[int, int, Any, Any, Any]] = []

    def collect() -> None:
        for start, n, losses, history, last in inflight:
            traced = [
                i
                for i in range(n)
                if (start + i + 1) % args.trace_every == 0 or start + i + 1 == args.steps
            ]
            if not traced:
                continue
            losses = np.asarray(losses)
            perturbed = last is not None and traced[-1] == n - 1
            from_history = traced[:-1] if perturbed else traced
            # The params after each step are stacked in `history`: hash the rows.
            history = jax.tree_util.tree_map(np.asarray, history)
            digests = hashing.hash_slices(history, from_history)
            for i, d in zip(from_history, digests, strict=True):
                pending.append((start + i + 1, losses[i], None, d))
            if perturbed:
                pending.append((start + n, losses[n - 1], last, None))
        inflight.clear()

    def flush() -> list[dict[str, Any]]:
        collect()
        for step, loss, p, digests in pending:
            params_hash, leaves = digests or hashing.hash_pytree_and_leaves(p)
            trajectory.append(
                {
                    "step": step,
                    "loss": None if loss is None else float(loss).hex(),
                    "params_hash": params_hash,
                    "leaves": leaves,
                }
            )
        pending.clear()
        return trajectory

    if state.step == 0 and not trajectory:
        pending.append((0, None, params, None))

    saves = set(args.save_at)
    saved: list[dict[str, Any]] = []

    def save(step: int) -> None:
        flush()
        st = train.TrainState(params=params, opt_state=opt_state, step=step)
        verify(st)  # before anyone looks at the folder
        if step in ckpt.steps():
            existing = ckpt.read_meta(step)["state_hash"]
            mine = hashing.hash_pytree(train.state_tree(st, root))
            if existing != mine:
                raise JprError(
                    f"checkpoint step {step} already exists in {args.checkpoint_dir} "
                    "with a different state; use another --checkpoint-dir"
                )
            ckpt.verify(step)  # the same hash in its metadata is not enough: read the arrays
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
    step = state.step
    while step < args.steps:
        if stop.requested:
            progress.close()
            if ckpt is None:
                where = "nothing saved (no --checkpoint-dir): a rerun starts from step 0"
            else:
                if step not in ckpt.steps():
                    save(step)
                ckpt.close()
                where = (
                    f"step {step} is saved in {args.checkpoint_dir}; to resume, run the "
                    "same command with --restore-from latest"
                )
            raise stop.stopped(f"stopped by {stop.name} after step {step}: {where}")
        # One chunk of up to `width` steps per dispatch; a chunk ends wherever the
        # host must see the state (a save, the perturbation, the last step).
        done = _chunk_end(step, args, width)
        n = done - step
        x, y = data.get_batches(
            step, n, ds=ds, batch_size=cfg.batch_size, process_index=pidx,
            process_count=pcount, pad_to=width,
        )
        data_fp.update(x[:n], y[:n])
        steps = np.arange(step, step + width, dtype=np.uint32)
        params, opt_state, losses, history = chunk_fn(
            params, opt_state, root, put(x), put(y), steps, np.int32(n)
        )
        flush()  # hash the previous chunk and record it while this one trains
        last = None
        if args.perturb_at == done:
            k = jax.lax.bitcast_convert_type(params["fc1"]["kernel"], jnp.uint32)
            k = k.at[0, 0].set(k[0, 0] ^ jnp.uint32(1))
            kernel = jax.lax.bitcast_convert_type(k, jnp.float32)
            params = last = {**params, "fc1": {**params["fc1"], "kernel": kernel}}
            say(f"perturbed {perturb_leaf}[0, 0] by one ULP after step {done}")
        inflight.append((step, n, losses, history, last))
        loss = (losses, n - 1)
        if ckpt is not None and (
            done in saves or (args.save_every is not None and done % args.save_every == 0)
        ):
            save(done)
        progress.update(done, loss)
        step = done
    progress.close()
    flush()
    if loss is not None:
        loss = np.asarray(loss[0])[loss[1]]

    final = train.TrainState(params=params, opt_state=opt_state, step=args.steps)
    if args.steps not in checked:
        verify(final)
    eval_loss, eval_acc = train.evaluate(graphdef, params, ds.eval_x, ds.eval_y)
    params_hash = hashing.hash_pytree(params)
    state_hash, state_leaves = hashing.hash_pytree_and_leaves(train.state_tree(final, root))
    record = {
        "schema": SCHEMA,
        "hash": params_hash,
        "state_hash": state_hash,
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
        "leaf_hashes": state_leaves,
        "trace_every": args.trace_every,
        "trajectory": trajectory,
        "perturb_at": args.perturb_at,
        "resumed_from": resumed_from,
        "checkpoints_saved": saved,
        "env": environment(),
        "topology": {
            "process_count": pcount,
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "joined_via": joined_via,
            "verified_identical_at": checked,
            "processes": distributed.process_table(
                data_hash=data_fp.hexdigest(),
                params_hash=params_hash,
                root=root,
                first_step=step0,
                last_step=args.steps,
            ),
        },
    }
    if ckpt is not None:
        ckpt.close()
    say(f"final step {args.steps}: eval loss {eval_loss:.4f} acc {eval_acc:.4f}")
    say(f"hash       {record['hash']}")
    say(f"state_hash {record['state_hash']}")
    if pcount > 1:
        topo = record["topology"]
        at = ", ".join(map(str, checked))
        say(
            f"{pcount} processes, {topo['device_count']} devices: "
            f"state identical on every process at steps {at}"
        )
        for row in topo["processes"]:
            say(
                f"process {row['process_index']}: data {row['data_hash'][:16]}  "
                f"params {row['params_hash'][:16]}"
            )
    if args.out is not None and pidx == 0:
        write_json_atomic(args.out, record)
        say(f"wrote {args.out}")
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m jpr.run_repro``; returns the exit code.

    Example:
        >>> import contextlib, io
        >>> from jpr.run_repro import main
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = main(["--save-at", "40"])
        >>> code, err.getvalue().strip()
        (2, 'jpr run: error: --save-at, --save-every and --restore-from need --checkpoint-dir')
    """
    from jpr.cli import guarded

    return guarded(lambda: run(build_parser().parse_args(argv)) and 0, prog="jpr run")


if __name__ == "__main__":
    sys.exit(main())
