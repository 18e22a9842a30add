"""Manifests: which videos to shard and the text that goes with them.

Accepted inputs:
- CSV, JSONL or Parquet with a ``video`` column (local path, relative paths resolved against the
  manifest's directory, or an ``http(s)://`` URL) and a ``caption`` column; optional ``key``,
  ``item_id``, ``title``, ``tags``, ``description``; every other column travels into each
  sample's JSON metadata.
- A directory of videos, each with an optional sidecar ``<name>.txt`` caption.

The whole manifest is validated before any video is touched; errors name the row and column.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_shards.records import is_missing, read_jsonl

REQUIRED_COLUMNS = ("video", "caption")
OPTIONAL_COLUMNS = ("key", "item_id", "title", "tags", "description")
# Fields the builder writes into each sample's JSON; a manifest column of the same name would be
# silently overwritten, so it is refused instead.
RESERVED_FIELDS = (
    "source",
    "source_key",
    "row",
    "clip_index",
    "clip_start",
    "clip_end",
    "fps",
    "width",
    "height",
    "num_frames",
    "source_duration",
    "source_fps",
    "source_codec",
    "source_rotation",
)
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts"}
_KEY_PATTERN = re.compile(r"[^A-Za-z0-9_\-]")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, row and column."""


@dataclass(frozen=True)
class ManifestRow:
    row: int
    """0-based position in the manifest; partitions and sample keys derive from it."""
    key: str
    video: str
    """Absolute local path or URL."""
    caption: str
    item_id: str
    title: str = ""
    tags: list[str] = field(default_factory=list)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_url(self) -> bool:
        return self.video.startswith(("http://", "https://"))


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read and validate a manifest file or a directory of videos."""
    path = Path(path)
    if path.is_dir():
        return _read_directory(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records, columns = _read_csv(path)
    elif suffix in (".jsonl", ".ndjson"):
        records, columns = _read_jsonl(path)
    elif suffix in (".parquet", ".pq"):
        records, columns = _read_parquet(path)
    else:
        raise ManifestError(f"{path}: unknown manifest type {suffix!r} (csv, jsonl or parquet)")
    return _validate(path, records, columns)


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    # utf-8-sig: spreadsheet exports start with a byte-order mark, which would otherwise stick
    # to the first column's name ("\ufeffvideo") and make it look missing.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        records = []
        for line_number, record in enumerate(reader, start=2):
            if None in record:
                raise ManifestError(
                    f"{path}: row {line_number - 2} (line {line_number}) has more fields "
                    f"than the header's {len(columns)}"
                )
            records.append(record)
    return records, columns


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    def refuse(line_number: int, reason: str) -> None:
        raise ManifestError(f"{path}: line {line_number} is {reason}")

    return read_jsonl(path, refuse)


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise ManifestError(f"{path}: cannot read Parquet ({err})") from err
    return table.to_pylist(), table.column_names


def _text(value: Any) -> str:
    return "" if is_missing(value) else str(value)


def _tags(value: Any) -> list[str]:
    if is_missing(value):
        return []
    if isinstance(value, (list, tuple)):
        return [str(tag) for tag in value]
    return [tag.strip() for tag in str(value).split(",") if tag.strip()]


def _validate(path: Path, records: list[dict], columns: list[str]) -> list[ManifestRow]:
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {', '.join(missing)} (found: {', '.join(columns)})"
        )
    reserved = [column for column in columns if column in RESERVED_FIELDS]
    if reserved:
        raise ManifestError(
            f"{path}: column(s) {', '.join(reserved)} clash with fields the builder writes; "
            "rename them"
        )
    if not records:
        raise ManifestError(f"{path}: manifest has no rows")
    base = path.parent.resolve()
    rows, seen_keys = [], {}
    for index, record in enumerate(records):
        video = _text(record.get("video")).strip()
        if not video:
            raise ManifestError(f"{path}: row {index} has an empty 'video' value")
        caption = record.get("caption")
        if not is_missing(caption) and not isinstance(caption, str):
            raise ManifestError(f"{path}: row {index} column 'caption' is not text: {caption!r}")
        if not video.startswith(("http://", "https://")):
            video = str((base / video).resolve()) if not Path(video).is_absolute() else video
        key = _text(record.get("key")).strip() or f"{index:09d}"
        if key in seen_keys:
            raise ManifestError(
                f"{path}: row {index} repeats key {key!r} of row {seen_keys[key]} (column 'key')"
            )
        seen_keys[key] = index
        extra = {
            name: value
            for name, value in record.items()
            if name not in REQUIRED_COLUMNS and name not in OPTIONAL_COLUMNS
        }
        try:
            json.dumps(extra)
        except TypeError as err:
            raise ManifestError(f"{path}: row {index} has a value that is not JSON: {err}") from err
        rows.append(
            ManifestRow(
                row=index,
                key=key,
                video=video,
                caption=_text(caption),
                item_id=_text(record.get("item_id")).strip() or key,
                title=_text(record.get("title")),
                tags=_tags(record.get("tags")),
                description=_text(record.get("description")),
                extra=extra,
            )
        )
    return rows


def _read_directory(directory: Path) -> list[ManifestRow]:
    videos = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
    )
    if not videos:
        raise ManifestError(f"{directory}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
    rows, seen_keys = [], {}
    for index, video in enumerate(videos):
        sidecar = video.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
        relative = video.relative_to(directory).with_suffix("").as_posix()
        key = _KEY_PATTERN.sub("_", relative)
        # Keys become item ids: "a.mp4" and "a.webm", or "a b.mp4" and "a_b.mp4", would be
        # one item (and share one sidecar caption), so they are refused like a manifest's.
        if key in seen_keys:
            raise ManifestError(
                f"{directory}: {video.relative_to(directory)} and {seen_keys[key]} both "
                f"give the key {key!r}; rename one"
            )
        seen_keys[key] = video.relative_to(directory)
        rows.append(
            ManifestRow(
                row=index, key=key, video=str(video.resolve()), caption=caption, item_id=key
            )
        )
    return rows


def partition(rows: list[ManifestRow], part: int, num_parts: int) -> list[ManifestRow]:
    """Rows of partition ``part`` of ``num_parts``: every ``num_parts``-th row, stable by row."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} is outside 0..{num_parts - 1}")
    return [row for row in rows if row.row % num_parts == part]
