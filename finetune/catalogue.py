"""The item catalogue: each item's id, text fields and clip keys, numbered for the models.

Items are numbered 1..N in catalogue order; **index 0 is padding** and never an item, so
(N + 1, D) embedding tables and padded history tensors need no shift. An item may have text
only, clips only, or both; ``clip_keys_from_shards`` supplies the clip keys when the catalogue
does not carry them (the synthetic data does not).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_shards.records import is_missing
from data_shards.shard_set import iter_samples, list_shards
from finetune.tables import (
    MAX_EXAMPLES,
    InteractionFileError,
    normalize_id,
    parse_ids,
    read_table,
)

logger = logging.getLogger(__name__)

PADDING_INDEX = 0
"""Item index reserved for padding; real items are 1..N."""

CLIP_KEY_COLUMNS = ("video_keys", "clip_keys")
NON_TEXT_COLUMNS = {"item_id", "key", "video", "url", "path", *CLIP_KEY_COLUMNS}
"""Catalogue columns that are never text fields by default (ids, paths, clip keys)."""


@dataclass
class ItemCatalogue:
    """Items in catalogue order; item ``i`` (1-based, 0 is padding) is ``item_ids[i - 1]``."""

    item_ids: list[str]
    text_fields: tuple[str, ...]
    """Fields joined into an item's text, in this order."""
    texts: list[dict[str, str]]
    """Per item: field → non-empty text."""
    clip_keys: list[tuple[str, ...]]
    """Per item: shard sample keys of its clips (empty for text-only items)."""
    source: str = ""
    issues: dict[str, int] = field(default_factory=dict)
    """Catalogue rows that were skipped: ``missing_ids``, ``duplicate_ids``, ``malformed``."""
    issue_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {item_id: i for i, item_id in enumerate(self.item_ids, start=1)}
        if not len(self.item_ids) == len(self.texts) == len(self.clip_keys):
            raise ValueError("item_ids, texts and clip_keys must have one entry per item")

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def num_embeddings(self) -> int:
        """Rows of an item embedding table: the items plus the padding row 0."""
        return len(self.item_ids) + 1

    @classmethod
    def from_ids(cls, item_ids: Iterable[str], source: str = "") -> ItemCatalogue:
        """Items known by id only (no text, no clips), e.g. when only pairs are available."""
        ids = list(item_ids)
        return cls(ids, (), [{} for _ in ids], [() for _ in ids], source=source)

    def item_index(self, item_id: str) -> int:
        return self.index[item_id]

    def text(self, index: int, separator: str = ". ") -> str:
        """The item's text fields joined in ``text_fields`` order ('' for video-only items)."""
        fields = self.texts[index - 1]
        return separator.join(fields[name] for name in self.text_fields if name in fields)

    def has_text(self) -> np.ndarray:
        """(N + 1,) bool, False at padding."""
        return np.array([False] + [bool(fields) for fields in self.texts])

    def has_video(self) -> np.ndarray:
        """(N + 1,) bool, False at padding."""
        return np.array([False] + [bool(keys) for keys in self.clip_keys])

    def with_clip_keys(self, clip_keys: Mapping[str, Iterable[str]]) -> ItemCatalogue:
        """A copy whose items take their clip keys from ``clip_keys`` (item id → keys)."""
        unknown = [item_id for item_id in clip_keys if item_id not in self.index]
        if unknown:
            logger.warning(
                "%d item ids with clips are not in the catalogue (e.g. %s); ignored",
                len(unknown),
                unknown[:3],
            )
        keys = [tuple(clip_keys.get(item_id, ())) for item_id in self.item_ids]
        return dataclasses.replace(self, clip_keys=keys)


def _clip_key_list(value: Any) -> tuple[str, ...]:
    if is_missing(value):
        return ()
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(str(key).strip() for key in value if str(key).strip())
    return tuple(key.strip() for key in str(value).split(";") if key.strip())


def _text_value(value: Any) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(part) for part in value if not is_missing(part))
    return str(value).strip()


def _is_text_column(values: np.ndarray, kind: str | None) -> bool:
    """A column holds text when RecBole says so, or when its values are strings (or lists of
    strings) that are not all numbers (CSV gives every value as a string)."""
    if kind is not None:
        return kind in ("token", "token_seq")
    present = [value for value in values if not is_missing(value) and value != ""]
    if not present:
        return False
    for value in present:
        if isinstance(value, (list, tuple)):
            if not all(isinstance(part, str) for part in value):
                return False
        elif not isinstance(value, str):
            return False
    return not all(isinstance(value, str) and _is_number(value) for value in present)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_catalogue(
    path: str | Path,
    *,
    format: str | None = None,
    text_fields: Iterable[str] | None = None,
) -> ItemCatalogue:
    """Read an item catalogue; rows without an id or repeating an earlier id are skipped.

    Columns: ``item_id``, text fields, and optionally the shard sample keys of the item's clips
    (``video_keys`` or ``clip_keys``: a list in JSONL/Parquet, a ``;``-separated string in
    CSV). ``text_fields`` picks (and orders) the text columns; by default every text column
    except ids, video paths and clip keys, in file order.
    """
    table = read_table(path, format)
    if "item_id" not in table.columns:
        raise InteractionFileError(
            f"{table.path}: missing required column 'item_id' "
            f"(found: {', '.join(table.columns) or 'none'})"
        )
    if text_fields is None:
        fields = tuple(
            name
            for name, values in table.columns.items()
            if name not in NON_TEXT_COLUMNS
            and _is_text_column(values, table.column_types.get(name))
        )
    else:
        fields = tuple(text_fields)
        missing = [name for name in fields if name not in table.columns]
        if missing:
            raise InteractionFileError(
                f"{table.path}: text field(s) {', '.join(missing)} are not columns "
                f"(found: {', '.join(table.columns)})"
            )
    key_column = next((name for name in CLIP_KEY_COLUMNS if name in table.columns), None)

    issues = {"missing_ids": 0, "duplicate_ids": 0, "malformed": table.malformed}
    examples: dict[str, list[dict[str, Any]]] = {"malformed": table.malformed_examples}
    item_ids, texts, clip_keys, seen = [], [], [], {}
    raw_ids = table.columns["item_id"]
    for row in range(len(table)):
        item_id = normalize_id(raw_ids[row])
        problem = None
        if item_id is None:
            problem = "missing_ids"
        elif item_id in seen:
            problem = "duplicate_ids"
        if problem:
            issues[problem] += 1
            if len(examples.setdefault(problem, [])) < MAX_EXAMPLES:
                examples[problem].append(
                    {"row": row, "item_id": item_id, "first_row": seen.get(item_id)}
                )
            continue
        seen[item_id] = row
        item_ids.append(item_id)
        item_text = {name: _text_value(table.columns[name][row]) for name in fields}
        texts.append({name: text for name, text in item_text.items() if text})
        clip_keys.append(_clip_key_list(table.columns[key_column][row]) if key_column else ())
    if not item_ids:
        raise InteractionFileError(f"{table.path}: no usable catalogue rows ({issues})")
    if any(issues.values()):
        logger.warning("catalogue %s: skipped rows %s", table.path, issues)
    return ItemCatalogue(item_ids, fields, texts, clip_keys, str(table.path), issues, examples)


def clip_keys_from_shards(shards_dir: str | Path) -> dict[str, list[str]]:
    """Item id → sorted sample keys of its clips, read from the shards' JSON members.

    The keys (``{row:09d}_{clip:03d}``) number rows of the manifest a shard set was built
    from, so they are unique within one shard directory only: the warm and cold shard sets of
    the synthetic data both start at ``000000000_000``. Only the small ``.json`` members are
    read; the clips are not decoded.
    """
    keys: dict[str, list[str]] = {}
    for sample in iter_samples(list_shards(shards_dir), extensions={"json"}):
        metadata = json.loads(sample["json"])
        item_id = normalize_id(metadata.get("item_id")) or normalize_id(metadata.get("key"))
        if item_id is not None:
            # Without a member's folder, as item_content matches the reader's keys.
            keys.setdefault(item_id, []).append(Path(sample["__key__"]).name)
    return {item_id: sorted(item_keys) for item_id, item_keys in keys.items()}


def read_cold_items(path: str | Path) -> set[str]:
    """Cold-start item ids from ``synth.json`` (``cold_start_items``), a manifest/catalogue
    (its ``item_id`` column, else ``key``; e.g. ``manifest_cold.jsonl``) or a text file with
    one id per line."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        description = json.loads(path.read_text())
        return {normalize_id(item_id) for item_id in description["cold_start_items"]}
    if path.suffix.lower() == ".txt":
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    table = read_table(path)
    column = "item_id" if "item_id" in table.columns else "key"
    if column not in table.columns:
        raise InteractionFileError(f"{path}: no item_id or key column for cold-start items")
    return {
        item_id for item_id in parse_ids(table.columns[column]).to_pylist() if item_id is not None
    }
