"""Atomic file IO, advisory locks and stable hashing: the primitives every record, cache and checkpoint uses."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, length: int = 12) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: store them as strings so a bad number is visible, never silently parsed."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies under ``root`` once both are resolved (symlinks, ``..``)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file in ``path``'s folder to write; renamed over ``path`` when the block succeeds, deleted when
    it fails, so readers see the old file or the new one, never half of one. The file gets the mode a plain
    ``open`` would give it (0o666 less the umask), not ``mkstemp``'s 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes | str) -> None:
    """``data`` (str as UTF-8) to ``path`` atomically, fsynced before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON (NaN refused), written atomically."""
    write_bytes_atomic(path, json.dumps(_json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing, unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


@contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path``; yields False when non-blocking and someone else holds it. The holder
    writes ``pid <pid> on <host>`` into the file (``lock_holder`` reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            try:
                f.seek(0)
                f.truncate()
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                f.flush()
            except OSError:  # a full disk: the note is informative only, the lock holds without it
                pass
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(path: Path) -> str:
    """Who holds the lock at ``path`` (``pid <pid> on <host>``), as its holder wrote it; ``unknown`` if unread."""
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"
