"""Run records: the JSON files that ``jpr compare`` reads.

Two schemas of one family: ``jpr.run/1``, written by ``jpr run --out``, and
``jpr.trace/1``, written by :class:`jpr.Tracer` for any training loop. Both
carry the fields ``compare`` reads: the final hashes, a trajectory of per-step
hashes, the config and the environment.

This module does not import JAX, so comparing two records starts instantly.
Records are written atomically: a temporary file in the same folder, flushed
and fsynced, then renamed over the target, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from jpr.errors import JprError

__all__ = ["SCHEMA", "SCHEMAS", "SEED_KEYS", "TRACE_SCHEMA", "read_record", "write_json_atomic"]

#: Version of the record layout; a reader refuses any other.
SCHEMA = "jpr.run/1"

#: Version of the layout of a :class:`jpr.Tracer` record.
TRACE_SCHEMA = "jpr.trace/1"

#: The schemas a reader accepts.
SCHEMAS = (SCHEMA, TRACE_SCHEMA)

#: Keys of the original product's record, kept at the top level.
SEED_KEYS = ("hash", "steps", "batch_size", "seed", "lr", "backend", "final")


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (temp file + fsync + rename).

    Parent folders are created. On any error the target is left as it was.

    Example:
        >>> import json, tempfile, pathlib
        >>> from jpr.record import write_json_atomic
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> p = write_json_atomic(d / "runs" / "r.json", {"a": 1})
        >>> json.loads(p.read_text())
        {'a': 1}
    """
    path = Path(path)
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:  # NaN/inf or an object JSON cannot hold
        raise JprError(f"cannot write {path}: {e}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise JprError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise JprError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise JprError(f"{path}: not a jpr run record ({what})")


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a run record; any problem is a :class:`JprError`.

    Checks that the file exists, is complete JSON, has this schema version and
    carries the fields that ``compare`` relies on.

    Example:
        >>> import tempfile, pathlib
        >>> from jpr.record import read_record
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "empty.json"
        >>> _ = p.write_text("")
        >>> try:
        ...     read_record(p)
        ... except Exception as e:
        ...     print(str(e).split(": ", 1)[1])
        empty file, not a jpr run record
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise JprError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise JprError(f"{path}: is a directory, expected a run record (.json)") from None
    except OSError as e:
        raise JprError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.strip():
        raise JprError(f"{path}: empty file, not a jpr run record")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = getattr(e, "msg", str(e))
        raise JprError(f"{path}: not valid JSON ({msg}); truncated or not a run record?") from None
    except (ValueError, RecursionError) as e:  # JSON, but absurd: no record looks like this
        what = "nested too deeply" if isinstance(e, RecursionError) else "a number too long"
        raise JprError(f"{path}: not a jpr run record (JSON {what})") from None
    _require(isinstance(data, dict), path, "top level is not an object")
    schema = data.get("schema")
    if schema not in SCHEMAS:
        if schema is None:
            raise JprError(f"{path}: not a jpr run record (no schema field)")
        shown = repr(schema) if len(repr(schema)) <= 40 else repr(schema)[:37] + "..."
        raise JprError(f"{path}: schema {shown} is not supported (this jpr reads {SCHEMA!r})")
    _check_fields(data, path)
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def _is_loss_hex(v: Any) -> bool:
    if v is None:
        return True
    try:
        float.fromhex(v)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _check_fields(data: dict[str, Any], path: Path) -> None:
    """Every field ``compare`` reads, with the type it reads it as."""
    for key in ("hash", "state_hash", "steps", "final", "trajectory", "env", "config"):
        _require(key in data, path, f"missing {key!r}")
    for key in ("hash", "state_hash"):
        _require(isinstance(data[key], str), path, f"{key!r} is not a string")
    _require(_is_int(data["steps"]), path, "'steps' is not an integer")
    for key in ("final", "env", "config"):
        _require(isinstance(data[key], dict), path, f"{key!r} is not an object")
    if "leaf_hashes" in data:
        _require(_is_str_map(data["leaf_hashes"]), path, "'leaf_hashes' is not an object of hashes")
    _require(isinstance(data["trajectory"], list), path, "'trajectory' is not a list")
    for i, entry in enumerate(data["trajectory"]):
        where = f"bad trajectory entry {i}:"
        _require(isinstance(entry, dict), path, f"{where} not an object")
        _require(_is_int(entry.get("step")), path, f"{where} no integer 'step'")
        _require(_is_loss_hex(entry.get("loss")), path, f"{where} 'loss' is not a float in hex")
        hash_ok = isinstance(entry.get("params_hash", ""), str)
        _require(hash_ok, path, f"{where} 'params_hash' is not a string")
        _require(_is_str_map(entry.get("leaves", {})), path, f"{where} 'leaves' is not an object")
