"""Atomic file writes: a crash or a full disk never leaves a half-written key or certificate."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tapproof.errors import ConfigError


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename; the old file survives any failure.

    The temp file is created with ``mode`` from the start (never readable by
    others, even for a moment, when ``mode`` is 0600).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing; refuse a path that is not a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--data-dir: {path} exists and is not a directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def read_bytes(path: Path, *, what: str) -> bytes:
    """Read a file, turning OS errors into a :class:`ConfigError` that names ``what``."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: {path} is missing") from exc
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
