"""Atomic file writes (a reader sees the old file or the new one, never half of one) and
file content hashes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def make_output_dir(path: str | Path) -> Path:
    """Create the directory ``path`` (and its parents) if missing. A file where the directory
    or one of its parents should be is refused by name, not as "FILE/sub: Not a directory"."""
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists() and not place.is_dir():
            where = "" if place == path else f"{path}: "
            raise NotADirectoryError(f"{where}{place} is a file, not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the file the permissions a plain open() would.
        os.chmod(temp_name, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weight files need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
