"""Writing files so that a kill, a power loss or a full disk never leaves half of one.

A file that other code or a later run reads back (``summary.json``, ``config.json``,
manifests, exported configs) is written whole or not at all: to a temporary file in the same
folder, flushed and ``fsync``-ed, then renamed over the target (``rename`` is atomic on POSIX),
and the folder is ``fsync``-ed so that the rename itself survives a power loss. This is what
orbax does for checkpoints and git for its refs.

JSON written here is strict JSON (RFC 8259): a non-finite float (NaN, inf) becomes ``null``,
so other tools (``jq``, JavaScript, ``json.loads(..., parse_constant=...)``) can read it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

from ffrag_jax.errors import UserError


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's content. A missing, binary (NUL bytes) or non-UTF-8 file is a
    one-line UserError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    if b"\x00" in data[:8192]:
        raise UserError(f"{path}: binary content (NUL bytes), not a text {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); convert "
                        "it (iconv -t UTF-8)") from None


def jsonl_records(path: str | Path, what: str = "file"):
    """``(line number, value)`` of each non-blank line of a UTF-8 JSON-lines file; a
    malformed line is a UserError naming the file and the line."""
    for number, line in enumerate(read_text(path, what).splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: malformed JSON line ({e.msg})") from None


def fsync_dir(folder: str | Path) -> None:
    """Makes a rename or a new file in ``folder`` durable (a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """Strict JSON text of ``value`` (non-finite floats as ``null``)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, value, indent: int | None = 2) -> Path:
    return atomic_write_text(path, dumps(value, indent=indent) + "\n")
