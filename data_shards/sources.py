"""Shard specs and the weighted sources of a training mix: what they are and which shard
files they name. Light (no torch, no webdataset), so configs check them before any rank starts.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from data_shards.shard_set import is_local, list_shards


@dataclass
class ShardSource:
    """One named, weighted source of a training mix."""

    name: str
    shards: str | list[str]
    """A shard spec, as ``ReaderConfig.shards``."""
    weight: float = 1.0
    """Relative share of the samples drawn (the weights need not sum to 1)."""

    def __post_init__(self):
        if not self.name:
            raise ValueError(f"a source needs a name (shards {self.shards!r})")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ValueError(f"source {self.name!r}: weight {self.weight!r} is not a number")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(
                f"source {self.name!r}: weight must be finite and >= 0, got {self.weight}"
            )
        if not self.shards:
            raise ValueError(f"source {self.name!r}: no shard spec")


DEFAULT_SOURCE = "default"
"""The name of the one source of a plain shard spec."""


def check_sources(sources: Sequence[ShardSource]) -> None:
    """Names unique, some weight above zero; raises ValueError naming the source."""
    names = [source.name for source in sources]
    if not names:
        raise ValueError("no sources")
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise ValueError(f"source {duplicate!r} is named twice")
    if sum(source.weight for source in sources) <= 0:
        raise ValueError(f"every source has weight 0: {', '.join(names)}")


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec to a list of URLs and paths webdataset can open, in a fixed order."""
    items = spec.split("::") if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if not is_local(item):
            urls.extend(braceexpand(item))
        elif os.path.isdir(os.path.expanduser(item)):
            # An empty directory among several adds nothing; no shards at all is refused below.
            urls.extend(list_shards(Path(item).expanduser(), allow_empty=True))
        else:
            for pattern in braceexpand(os.path.expanduser(item)):
                if any(char in pattern for char in "*?["):
                    matches = sorted(glob.glob(pattern))
                    if not matches:
                        raise FileNotFoundError(f"no shards match {pattern}")
                    urls.extend(matches)
                else:
                    urls.append(pattern)
    missing = [url for url in urls if is_local(url) and not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def resolve_sources(sources: Sequence[ShardSource]) -> list[list[str]]:
    """Each source's shard list; a source without shards raises an error naming it."""
    resolved = []
    for source in sources:
        try:
            resolved.append(resolve_shards(source.shards))
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"source {source.name!r}: {err}") from err
    return resolved
