"""``jpr run`` / ``python -m jpr.run_repro``: train, checkpoint, resume, record.

Every flag of the original product works as documented there::

    python -m jpr.run_repro --steps 50 --batch-size 64 --seed 0 --out runs/test1.json

The run is a pure function of its config: the batch of step ``t`` and the
dropout key of step ``t`` depend only on (seed, t), so a run resumed from a
checkpoint at step ``N`` continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from jpr._cli_common import Parser, guarded
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
    up. Each host kind gets its own sub-folder: JAX's cache key covers
    ``XLA_FLAGS`` (so the pinned CPU target of :mod:`jpr.platform`) but not the
    host's own instruction set, and a shared home folder must never hand one
    machine code compiled for another. A cached program is the program XLA would compile
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
        _write_from_every_process()
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
    _write_from_every_process()
    return where


def _write_from_every_process() -> None:
    """Let every process of a multi-process run add to the compilation cache.

    JAX writes cache entries from process 0 only. On CPU a program's key holds
    its devices, so the programs a process runs on its own device (jpr's
    checks, the probe, a microbatched step) were compiled again by every other
    process in every run: about 17 s of CPU for process 1 of a 20-step
    two-process `jpr run` here, against 6 s for process 0. jpr's cache is a
    local folder per user (:func:`compilation_cache_dir`), and an entry is
    written once (a key already present is left alone), so every process may
    write; the entries written are the programs XLA compiled, exactly as
    process 0's are. The rule is lifted only in jpr's own processes, and only
    for a cache in a local folder.
    """
    import jax
    from jax._src import compilation_cache, compiler, distributed

    folder = jax.config.jax_compilation_cache_dir or ""
    if "://" in folder or getattr(compiler._cache_write, "_jpr_every_process", False):
        return
    process_zero_only = compiler._cache_write

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable,
                    host_callbacks):
        too_quick = compile_time_secs < jax.config.jax_persistent_cache_min_compile_time_secs
        if distributed.global_state.process_id in (0, None) or host_callbacks or too_quick:
            return process_zero_only(cache_key, compile_time_secs, module_name, backend,
                                     executable, host_callbacks)  # JAX's own rules
        try:
            compilation_cache.put_executable_and_time(
                cache_key, module_name, executable, backend, int(compile_time_secs))
        except Exception as e:  # as JAX does: a cache that cannot be written is no error
            import warnings

            warnings.warn(f"cannot write compilation cache entry for {module_name!r}: {e}",
                          stacklevel=2)

    cache_write._jpr_every_process = True
    compiler._cache_write = cache_write


#: Most steps fused into one dispatch, and the most batch bytes staged for them.
MAX_CHUNK_STEPS = 256
MAX_CHUNK_BYTES = 8 << 20


def _chunk_width(cfg: RunConfig, process_count: int) -> int:
    """Steps per dispatch: a function of the config only (the bits never depend on it)."""
    per_step = (cfg.batch_size // max(process_count, 1)) * (cfg.features + 1) * 4
    return max(1, min(MAX_CHUNK_STEPS, MAX_CHUNK_BYTES // max(per_step, 1)))


def _chunk_end(
    step: int,
    *,
    width: int,
    steps: int,
    save_at: list[int] | tuple[int, ...] = (),
    save_every: int | None = None,
    perturb_at: int | None = None,
) -> int:
    """Where the chunk starting at ``step`` stops: ``width`` steps on, or sooner
    at a step the host must see (a save, the perturbation, the last step).

    Example:
        >>> from jpr.run_repro import _chunk_end
        >>> _chunk_end(0, width=256, steps=50), _chunk_end(0, width=256, steps=50, save_every=20)
        (50, 20)
        >>> _chunk_end(20, width=8, steps=50, save_at=[25], perturb_at=22)
        22
    """
    stop = min(step + width, steps)
    for n in save_at:
        if step < n < stop:
            stop = n
    if save_every is not None:
        stop = min(stop, (step // save_every + 1) * save_every)
    if perturb_at is not None and step < perturb_at < stop:
        stop = perturb_at
    return stop


def run(args: argparse.Namespace, *, out=print) -> dict[str, Any]:
    """Run training as described by parsed ``args``; returns the run record.

    The first SIGTERM or SIGINT stops the run at the next step boundary: the
    checkpoint being written is finished, the current step is saved (with
    ``--checkpoint-dir``) and :class:`jpr.signals.Stopped` is raised (exit
    status 128 + signal). In a multi-process run a signal to any one process
    stops them all: at every chunk boundary the processes exchange their stop
    flags, so they agree on one step, save it once, and all exit 128 + signal.

    The run is a short sequence of phases built on jpr's public pieces
    (:class:`jpr.Tracer` records the trajectory, :class:`jpr.Checkpointer`
    saves and restores): set up, restore, train chunk by chunk, finish the
    record.

    Example:
        >>> from jpr.run_repro import build_parser, run
        >>> lines = []
        >>> a = run(build_parser().parse_args(["--steps", "3"]), out=lines.append)
        >>> b = run(build_parser().parse_args(["--steps", "3"]), out=lines.append)
        >>> a["hash"] == b["hash"], a["steps"], lines[0].startswith("final step 3: eval loss")
        (True, 3, True)
    """
    from jpr.lock import releasing
    from jpr.platform import pin_cpu_target
    from jpr.signals import GracefulStop

    _validate(args)
    cfg = _config(args)
    pin_cpu_target()  # before JAX starts: the CPU target is part of the config
    # releasing(): a run that fails leaves no lock on its checkpoint folder.
    with releasing(), GracefulStop() as stop:
        enable_compilation_cache()  # first: joining compiles the check's all-gather
        joined_via = _init_distributed(args)
        setup = _setup(args, cfg, out=out)
        with _Saver(setup) as saver:
            state, tracer, resumed_from = _resume(setup, saver)
            trained = _train(setup, state, tracer=tracer, saver=saver, stop=stop)
            record = _finish(
                setup, trained, tracer=tracer, saver=saver, resumed_from=resumed_from,
                joined_via=joined_via,
            )
    return record


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What a run fixes before its first step (no state that training changes)."""

    args: argparse.Namespace
    cfg: RunConfig
    say: Any  # print on process 0, nothing elsewhere
    pidx: int
    pcount: int
    ds: Any
    graphdef: Any
    fresh: Any  # the TrainState at step 0
    root: Any
    mesh: Any
    width: int
    chunk_fn: Any


def _quiet(*_a: Any, **_k: Any) -> None:
    pass


def _setup(args: argparse.Namespace, cfg: RunConfig, *, out) -> _Setup:
    import jax

    from jpr import data, distributed, rng, train

    pidx, pcount = jax.process_index(), jax.process_count()
    if pcount > 1:
        distributed.verify_cpu_targets()  # different targets would differ from the init on
    init = train.init_state
    if getattr(args, "bug_fold_process_into_init", False):
        init = distributed.buggy_init_state
    graphdef, fresh = init(cfg)
    mesh = train.make_mesh()
    fresh = train.replicate(fresh, mesh)  # as the chunk returns it: one compilation, not two
    width = _chunk_width(cfg, pcount)
    try:
        chunk_fn = train.make_train_chunk(cfg, graphdef, mesh=mesh, width=width)
    except ValueError as e:
        raise JprError(str(e)) from None
    return _Setup(
        args=args, cfg=cfg, say=out if pidx == 0 else _quiet, pidx=pidx, pcount=pcount,
        ds=data.make_dataset(cfg), graphdef=graphdef, fresh=fresh, root=rng.root_key(cfg.seed),
        mesh=mesh, width=width, chunk_fn=chunk_fn,
    )


class _Saver:
    """The run's checkpoints and its cross-process checks (a context manager).

    ``checked``: the steps at which every process was verified to hold the same
    state; ``saved``: ``{"step", "state_hash"}`` of each checkpoint written.
    """

    def __init__(self, setup: _Setup):
        self.setup, self.args = setup, setup.args
        self.saves = set(self.args.save_at)
        self.checked: list[int] = []
        self.saved: list[dict[str, Any]] = []
        self.ckpt = None
        if self.args.checkpoint_dir is not None:
            from jpr.checkpoint import Checkpointer

            # Restoring a given step needs the folder; "latest" on a fresh folder starts at 0.
            # The folder's lock is taken first, held until the end: one writer per folder.
            self.ckpt = Checkpointer(
                self.args.checkpoint_dir,
                create=not isinstance(self.args.restore_from, int),
                keep=self.args.keep,
                keep_every=self.args.keep_every,
            )
            if self.ckpt.lock is not None and self.ckpt.lock.notice:
                setup.say(self.ckpt.lock.notice)
            for s in self.ckpt.discarded:
                setup.say(
                    f"ignoring an incomplete save of step {s} in {self.args.checkpoint_dir} "
                    "(interrupted)"
                )

    def __enter__(self) -> _Saver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ckpt is not None:
            self.ckpt.close()

    def verify(self, state: Any) -> None:
        """Every process holds ``state`` (a collective, so also a barrier)."""
        if self.setup.pcount > 1:
            from jpr import distributed

            distributed.verify_training_state(self.setup.cfg, state, self.setup.root)
            self.checked.append(state.step)

    def due(self, step: int) -> bool:
        """Whether the run saves after ``step``."""
        every = self.args.save_every
        return self.ckpt is not None and (
            step in self.saves or (every is not None and step % every == 0)
        )

    def save(self, state: Any, trajectory: list[dict[str, Any]]) -> None:
        """Save ``state`` (after checking every process holds it), unless it is saved already."""
        from jpr import hashing, train

        step, where, ckpt = state.step, self.args.checkpoint_dir, self.ckpt
        self.verify(state)  # before anyone looks at the folder
        if step in ckpt.steps():
            existing = ckpt.read_meta(step)["state_hash"]
            mine = hashing.hash_pytree(train.state_tree(state, self.setup.root))
            if existing != mine:
                raise JprError(
                    f"checkpoint step {step} already exists in {where} "
                    "with a different state; use another --checkpoint-dir"
                )
            ckpt.verify(step)  # the same hash in its metadata is not enough: read the arrays
            self.setup.say(f"checkpoint step {step} already in {where} (identical)")
            return
        h = ckpt.save(
            state, root=self.setup.root, cfg=self.setup.cfg, trajectory=trajectory,
            extra={"topology": _saved_topology(self.setup)},
        )
        self.saved.append({"step": step, "state_hash": h})
        self.setup.say(f"saved step {step} to {where} (state_hash {h[:16]})")


def _restore(setup: _Setup, saver: _Saver) -> tuple[Any, dict[str, Any] | None]:
    """The checkpoint ``--restore-from`` names, or ``(fresh state, None)``."""
    from jpr.checkpoint import CorruptCheckpoint

    args, ckpt = setup.args, saver.ckpt
    step = ckpt.latest() if args.restore_from == "latest" else args.restore_from
    if step is None:
        setup.say(f"no complete checkpoint in {args.checkpoint_dir} yet: starting from step 0")
        return setup.fresh, None
    try:
        state, meta = ckpt.restore(step, cfg=setup.cfg, template=setup.fresh)
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
    setup.say(
        f"restored step {state.step} from {args.checkpoint_dir} "
        f"(state_hash {meta['state_hash'][:16]} verified)"
    )
    return state, meta


def _resume(setup: _Setup, saver: _Saver) -> tuple[Any, Any, dict[str, Any] | None]:
    """Phase 2: the state to start from (restored or fresh), its tracer, ``resumed_from``."""
    import jpr

    args = setup.args
    state, meta = setup.fresh, None
    if args.restore_from is not None:
        state, meta = _restore(setup, saver)
    trajectory, resumed_from = [], None
    if meta is not None:
        trajectory = [e for e in meta.get("trajectory", []) if e["step"] <= state.step]
        resumed_from = {
            "step": state.step,
            "checkpoint_dir": str(args.checkpoint_dir),
            "state_hash": meta["state_hash"],
            # The topology that saved it (None for checkpoints older than this field).
            "topology": meta.get("topology"),
        }
        _say_if_topology_changed(setup, meta.get("topology"))
    # SHA-256 entries: a run record's trajectory (and its checkpoints') keep one kind of digest.
    tracer = jpr.Tracer(
        every=args.trace_every, last_step=args.steps, entries=trajectory, digest="sha256"
    )
    # Every process holds the same state: verified (at step 0 this catches an
    # init key that depends on the process), then checked again at each save and
    # at the end.
    saver.verify(state)
    state = _replicate(setup, state)
    if state.step == 0 and not trajectory:
        tracer.step(0, state.params)
    if saver.ckpt is not None and state.step in saver.saves and resumed_from is None:
        saver.save(state, tracer.entries())
    return state, tracer, resumed_from


def _saved_topology(setup: _Setup) -> dict[str, int]:
    """What a checkpoint records of the run that saved it."""
    import jax

    return {"process_count": setup.pcount, "device_count": jax.device_count()}


def _say_if_topology_changed(setup: _Setup, saved: dict[str, int] | None) -> None:
    """Resuming elsewhere is fine; without ``--microbatches`` it changes the bits."""
    now = _saved_topology(setup)
    if saved is None or saved == now or setup.cfg.microbatches is not None:
        return

    def shown(t: dict[str, int]) -> str:
        p, d = t["process_count"], t["device_count"]
        return f"{p} process{'es' * (p != 1)}, {d} device{'s' * (d != 1)}"

    setup.say(
        f"resuming on {shown(now)} a checkpoint saved on {shown(saved)}: without "
        "--microbatches the bits will differ from a run on the original topology"
    )


def _replicate(setup: _Setup, state: Any) -> Any:
    if setup.mesh.devices.size <= 1:
        return state
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    # From host copies: restored arrays are committed to a local device, and
    # moving those onto other processes' devices is a cross-host transfer.
    host = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
    params, opt_state = jax.device_put(host, NamedSharding(setup.mesh, P()))
    return dataclasses.replace(state, params=params, opt_state=opt_state)


def _put(setup: _Setup, a: Any) -> Any:
    # a is stacked per step: [width, local batch, ...]; the batch axis is sharded.
    if setup.mesh.devices.size <= 1:
        return a
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpr.train import AXIS

    global_shape = (a.shape[0], a.shape[1] * setup.pcount, *a.shape[2:])
    sharding = NamedSharding(setup.mesh, P(None, AXIS))
    return jax.make_array_from_process_local_data(sharding, a, global_shape)


#: The leaf that ``--perturb-at`` changes by one ULP.
PERTURB_LEAF = "params/fc1/kernel"


def _perturbed(params: Any) -> Any:
    import jax
    import jax.numpy as jnp

    k = jax.lax.bitcast_convert_type(params["fc1"]["kernel"], jnp.uint32)
    k = k.at[0, 0].set(k[0, 0] ^ jnp.uint32(1))
    kernel = jax.lax.bitcast_convert_type(k, jnp.float32)
    return {**params, "fc1": {**params["fc1"], "kernel": kernel}}


def _train_chunk(setup: _Setup, state: Any, done: int, *, tracer: Any, data_fp: Any):
    """Steps ``state.step .. done - 1`` in one dispatch; returns ``(state, losses)``."""
    import numpy as np

    from jpr import data

    args, step, n = setup.args, state.step, done - state.step
    x, y = data.get_batches(
        step, n, ds=setup.ds, batch_size=setup.cfg.batch_size, process_index=setup.pidx,
        process_count=setup.pcount, pad_to=setup.width,
    )
    data_fp.update(x[:n], y[:n])
    steps = np.arange(step, step + setup.width, dtype=np.uint32)
    params, opt_state, losses, history = setup.chunk_fn(
        state.params, state.opt_state, setup.root, _put(setup, x), _put(setup, y), steps,
        np.int32(n),
    )
    if args.perturb_at == done:
        params = _perturbed(params)
        setup.say(f"perturbed {PERTURB_LEAF}[0, 0] by one ULP after step {done}")
        # The params after the last step are the perturbed ones, not history's last row.
        tracer.stacked(step + 1, history, losses=losses, count=n - 1)
        if tracer.wants(done):
            tracer.step(done, params, loss=np.asarray(losses)[n - 1])
    else:
        tracer.stacked(step + 1, history, losses=losses, count=n)
    return dataclasses.replace(state, params=params, opt_state=opt_state, step=done), losses


def _train(setup: _Setup, state: Any, *, tracer: Any, saver: _Saver, stop: Any) -> _Trained:
    """Phase 3: train chunk by chunk to ``--steps``, saving where asked."""
    from jpr import distributed

    args = setup.args
    progress = _Progress(
        args.progress if args.progress is not None else sys.stderr.isatty() and setup.pidx == 0,
        args.steps,
    )
    data_fp = distributed.DataFingerprint()
    last_loss = None
    while state.step < args.steps:
        asked = _agreed_stop(setup, stop)
        if asked is not None:
            progress.close()
            _stop_now(setup, state, tracer=tracer, saver=saver, asked=asked)
        # One chunk of up to `width` steps per dispatch; a chunk ends wherever the
        # host must see the state (a save, the perturbation, the last step).
        done = _chunk_end(
            state.step, width=setup.width, steps=args.steps, save_at=args.save_at,
            save_every=args.save_every, perturb_at=args.perturb_at,
        )
        n = done - state.step
        state, losses = _train_chunk(setup, state, done, tracer=tracer, data_fp=data_fp)
        last_loss = (losses, n - 1)
        if saver.due(done):
            saver.save(state, list(tracer.entries()))
        progress.update(done, last_loss)
    progress.close()
    return _Trained(state=state, last_loss=last_loss, data_hash=data_fp.hexdigest())


class _Trained(NamedTuple):
    state: Any
    last_loss: Any  # (losses of the last chunk, index of the last step), or None
    data_hash: str


def _agreed_stop(setup: _Setup, stop: Any) -> tuple[int, int | None] | None:
    """``(signal, process that got it)`` if any process was asked to stop, else ``None``.

    Multi-process: every process calls this at the same chunk boundary and the
    one-byte flags are all-gathered (:func:`jpr.distributed.stop_requested_anywhere`),
    so all of them stop at the same step or none does.
    """
    if setup.pcount == 1:
        return None if stop.signum is None else (stop.signum, None)
    from jpr import distributed

    return distributed.stop_requested_anywhere(stop.signum)


def _stop_now(
    setup: _Setup, state: Any, *, tracer: Any, saver: _Saver, asked: tuple[int, int | None]
) -> None:
    import signal

    from jpr.signals import Stopped

    signum, by = asked
    name = signal.Signals(signum).name + ("" if by is None else f" to process {by}")
    where = setup.args.checkpoint_dir
    if saver.ckpt is None:
        text = "nothing saved (no --checkpoint-dir): a rerun starts from step 0"
    else:
        if state.step not in saver.ckpt.steps():
            saver.save(state, list(tracer.entries()))
        saver.ckpt.close()
        saver.ckpt = None
        text = (
            f"step {state.step} is saved in {where}; to resume, run the "
            "same command with --restore-from latest"
        )
    raise Stopped(signum, f"stopped by {name} after step {state.step}: {text}")


def _finish(
    setup: _Setup, trained: _Trained, *, tracer: Any, saver: _Saver, resumed_from: Any,
    joined_via: str | None,
) -> dict[str, Any]:
    """Phase 4: check the final state, evaluate, write and report the run record."""
    import numpy as np

    from jpr import train
    from jpr.record import write_json_atomic

    args, state = setup.args, trained.state
    trajectory = tracer.entries()
    loss = None
    if trained.last_loss is not None:
        loss = np.asarray(trained.last_loss[0])[trained.last_loss[1]]
    if args.steps not in saver.checked:
        saver.verify(state)
    tracer.shutdown()
    ds = setup.ds
    eval_loss, eval_acc = train.evaluate(setup.graphdef, state.params, ds.eval_x, ds.eval_y)
    record = _make_record(
        setup, state, trajectory=trajectory, eval_loss=eval_loss, eval_acc=eval_acc,
        train_loss=loss, resumed_from=resumed_from, saver=saver, joined_via=joined_via,
        data_hash=trained.data_hash,
    )
    if saver.ckpt is not None:
        saver.ckpt.close()
        saver.ckpt = None
    _report(setup, record, eval_loss=eval_loss, eval_acc=eval_acc)
    if args.out is not None and setup.pidx == 0:
        write_json_atomic(args.out, record)
        setup.say(f"wrote {args.out}")
    return record


def _make_record(
    setup: _Setup, state: Any, *, trajectory: list, eval_loss: float, eval_acc: float,
    train_loss: Any, resumed_from: Any, saver: _Saver, joined_via: str | None, data_hash: str,
) -> dict[str, Any]:
    """The ``jpr.run/1`` record of a finished run (read back by :func:`jpr.record.read_record`)."""
    import jax
    import numpy as np

    from jpr import distributed, hashing, train
    from jpr.envinfo import environment
    from jpr.record import SCHEMA

    args, cfg = setup.args, setup.cfg
    params_hash = hashing.hash_pytree(state.params)
    state_hash, state_leaves = hashing.hash_pytree_and_leaves(train.state_tree(state, setup.root))
    return {
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
            "train_loss_hex": float(train_loss).hex() if train_loss is not None else next(
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
        "checkpoints_saved": saver.saved,
        "env": environment(),
        "topology": {
            "process_count": setup.pcount,
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "joined_via": joined_via,
            "cluster_job": distributed.cluster_job(),  # the scheduler's job, step, restart
            "verified_identical_at": saver.checked,
            "processes": distributed.process_table(
                data_hash=data_hash,
                params_hash=params_hash,
                root=setup.root,
                first_step=resumed_from["step"] if resumed_from else 0,
                last_step=args.steps,
            ),
        },
    }


def _report(setup: _Setup, record: dict[str, Any], *, eval_loss: float, eval_acc: float) -> None:
    say, topo = setup.say, record["topology"]
    say(f"final step {setup.args.steps}: eval loss {eval_loss:.4f} acc {eval_acc:.4f}")
    say(f"hash       {record['hash']}")
    say(f"state_hash {record['state_hash']}")
    if setup.pcount > 1:
        at = ", ".join(map(str, topo["verified_identical_at"]))
        say(
            f"{setup.pcount} processes, {topo['device_count']} devices: "
            f"state identical on every process at steps {at}"
        )
        for row in topo["processes"]:
            say(
                f"process {row['process_index']}: data {row['data_hash'][:16]}  "
                f"params {row['params_hash'][:16]}"
            )


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
    return guarded(lambda: run(build_parser().parse_args(argv)) and 0, prog="jpr run")


if __name__ == "__main__":
    sys.exit(main())
