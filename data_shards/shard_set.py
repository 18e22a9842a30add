"""A built shard directory read back: its ``index.json``, its shard files, its raw samples.

A directory's shards are the ones its index lists, in the index's order; only a directory
without an index falls back to every ``*.tar`` in it, sorted by name.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

INDEX_FILE = "index.json"
"""What ``data_shards.build`` writes beside the shards (a partitioned build, once merged)."""


def read_index(directory: str | Path) -> dict[str, Any] | None:
    """The directory's ``index.json`` as written by the build; None when it has none."""
    path = Path(directory) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_local(url: str) -> bool:
    """A path on this machine, not a ``pipe:`` command or an ``http(s)://``-style URL."""
    return not (url.startswith("pipe:") or "://" in url)


def list_shards(directory: str | Path, *, allow_empty: bool = False) -> list[str]:
    """The shards of ``directory``: those its index lists (a URL entry kept as it is), else
    every ``*.tar`` in name order.

    Raises ``FileNotFoundError`` naming the directory when it has none, unless ``allow_empty``.
    """
    directory = Path(directory)
    index = read_index(directory)
    if index is None:
        shards = sorted(str(path) for path in directory.glob("*.tar"))
    else:
        # The build writes {"name": ...} records; a plain list of names works too.
        names = [entry["name"] if isinstance(entry, dict) else entry for entry in index["shards"]]
        shards = [str(directory / name) if is_local(name) else name for name in names]
    if not shards and not allow_empty:
        raise FileNotFoundError(f"{directory}: no shards (no {INDEX_FILE} and no *.tar)")
    return shards


def iter_samples(
    paths: Iterable[str | Path], extensions: Collection[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "mp4", "txt", "json", ...}`` in shard order, no decoding.

    With ``extensions`` only those members are read (e.g. ``{"json"}`` skips the clips), and a
    sample without any of them is not yielded.
    """
    for path in paths:
        with tarfile.open(path) as tar:
            current: dict[str, Any] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = member.name.partition(".")
                if extensions is not None and extension not in extensions:
                    continue
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current["__key__"] = key
                current[extension] = tar.extractfile(member).read()
            if current:
                yield current
