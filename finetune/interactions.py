"""Interaction logs and item catalogues → validated, indexed, leave-one-out splits.

Inputs (format from the suffix; ``format=`` overrides):

- interactions: CSV (``.csv``), TSV (``.tsv``), JSONL (``.jsonl``/``.ndjson``), Parquet
  (``.parquet``/``.pq``), RecBole atomic files (``.inter``: tab-separated, headers such as
  ``user_id:token``; the ``:type`` suffix is dropped) and MicroLens pair files (``user``,
  ``item``, ``timestamp``; ``user``/``item`` are accepted as aliases in every format).
  Columns: ``user_id``, ``item_id``, ``timestamp`` (unix time as a number, or ISO 8601 text,
  naive times read as UTC; only the order matters), optional ``label`` (1 engaged, 0 skipped)
  and ``weight`` (a non-negative float such as the watch ratio; RecBole's ``rating`` is read as
  the weight when no ``weight`` column exists).
- item catalogue: the same formats plus RecBole ``.item``. ``item_id`` → text fields and the
  shard sample keys of the item's clips (``video_keys`` or ``clip_keys``: a list in
  JSONL/Parquet, a ``;``-separated string in CSV). An item may have text only, clips only, or
  both. ``clip_keys_from_shards`` derives the clip keys from a shard directory when the
  catalogue does not carry them (the synthetic data does not).

Indices. Items are numbered 1..N in catalogue order; **index 0 is padding** and never an
item, so (N + 1, D) embedding tables and padded history tensors need no shift. Users are
numbered 0..U-1 in the order they first appear in the file.

Validation. ``load_interactions`` checks every row and drops the ones it cannot use, counting
each under the first reason that applies, in this order: malformed line, missing id, bad
timestamp, bad label (not 0/1), bad weight (negative or not finite), unknown item (not in
the catalogue), duplicate (same user, item and timestamp as an earlier row; the first is
kept), cold-start item in the training zone (see below), then users with too few engaged
interactions (all their rows). Malformed lines never become records and are counted apart.
Timestamps that go backwards in file order within a user (among rows that passed the row
checks) are counted but not dropped: histories are sorted by (timestamp, file order) anyway.
Everything lands in one ``ValidationReport``; a file that cannot be read at all, or lacks a
required column, raises ``InteractionFileError`` naming the file (and the line where there is one).

Split (leave-one-out by time, per user). In each user's sorted history the last engaged row
is the test target, the second-to-last engaged row the validation target, and every earlier
row is training data. Skipped rows (label 0) take the split of the zone they fall in (before
the validation target: train; between the two targets: validation; after the test target:
test); they never enter histories, which are built from engaged rows only, and serve the
pointwise (BCE/AUC) data. Cold-start items never reach training: a training-zone row with a
cold item is removed (counted), so cold items appear only as validation/test rows, and a cold
validation target is left out of the test history too. ``check_no_leakage`` verifies all of
this on the arrays training and evaluation actually consume.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_shards.records import is_missing, read_jsonl
from data_shards.shard_set import iter_samples, list_shards

logger = logging.getLogger(__name__)

PADDING_INDEX = 0
"""Item index reserved for padding; real items are 1..N."""

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "valid": VALID, "test": TEST}

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
COLUMN_ALIASES = {"user": "user_id", "item": "item_id"}
CLIP_KEY_COLUMNS = ("video_keys", "clip_keys")
NON_TEXT_COLUMNS = {"item_id", "key", "video", "url", "path", *CLIP_KEY_COLUMNS}
"""Catalogue columns that are never text fields by default (ids, paths, clip keys)."""

FORMATS = ("csv", "tsv", "jsonl", "parquet", "recbole", "microlens")
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".inter": "recbole",
    ".item": "recbole",
}
MAX_EXAMPLES = 5

# Drop reasons, in the order they are checked; a row is counted under the first that applies.
_OK = 0
_DROP_REASONS = (
    "missing_ids",
    "bad_timestamps",
    "bad_labels",
    "bad_weights",
    "unknown_items",
    "duplicates",
    "cold_in_train",
    "too_few_interactions",
)
_REASON_CODE = {name: code for code, name in enumerate(_DROP_REASONS, start=1)}


class InteractionFileError(ValueError):
    """A file that cannot be used at all; the message names the file (and line or column)."""


class LeakageError(AssertionError):
    """Validation or test data reached training inputs (raised by ``check_no_leakage``)."""


# ---------------------------------------------------------------------------------------------
# Reading files into columns


@dataclass
class RawTable:
    """A file's records as columns of Python values, in file order."""

    path: Path
    columns: dict[str, np.ndarray]
    """Column name (``:type`` suffix and aliases resolved) → (R,) object array."""
    column_types: dict[str, str]
    """RecBole column types (``token``, ``token_seq``, ``float``, ...); empty for other formats."""
    malformed: int = 0
    """Lines that could not be parsed (wrong field count, not JSON) and were skipped."""
    malformed_examples: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def detect_format(path: str | Path, format: str | None = None) -> str:
    """The reader for ``path``: ``format`` when given, else from the file suffix."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; one of {', '.join(FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise InteractionFileError(
            f"{path}: cannot tell the format from suffix {suffix!r} "
            f"({', '.join(sorted(_SUFFIX_FORMATS))}); pass format="
        )
    return _SUFFIX_FORMATS[suffix]


def read_table(path: str | Path, format: str | None = None) -> RawTable:
    """Read any supported file into columns; malformed lines are skipped and counted."""
    path = Path(path)
    fmt = detect_format(path, format)
    if not path.is_file():
        raise InteractionFileError(f"{path}: file not found")
    if fmt in ("csv", "microlens"):
        table = _read_delimited(path, ",", quoted=True)
    elif fmt == "tsv":
        table = _read_delimited(path, "\t", quoted=True)
    elif fmt == "recbole":
        # RecBole atomic files are tab-separated without quoting: titles may hold '"'.
        table = _read_delimited(path, "\t", quoted=False)
    elif fmt == "jsonl":
        table = _read_jsonl(path)
    else:
        table = _read_parquet(path)
    _resolve_names(table)
    return table


def _read_header(path: Path, delimiter: str) -> list[str]:
    # utf-8-sig: a byte-order mark would otherwise stick to the first column name.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        first = handle.readline()
    if not first.strip():
        raise InteractionFileError(f"{path}: empty file or empty header line")
    return next(csv.reader([first], delimiter=delimiter))


def _read_delimited(path: Path, delimiter: str, quoted: bool) -> RawTable:
    names = _read_header(path, delimiter)
    if len(set(names)) != len(names):
        raise InteractionFileError(f"{path}: repeated column names in the header {names}")
    malformed: list[dict[str, Any]] = []

    def skip_invalid(row) -> str:
        malformed.append({"line": row.number, "reason": "wrong field count", "text": row.text})
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if quoted else False,
                invalid_row_handler=skip_invalid,
            ),
            # Everything as text: one bad value must not fail a whole numeric column.
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in names},
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError) as err:
        raise InteractionFileError(f"{path}: cannot read ({err})") from err
    columns = {
        name: table.column(name).to_numpy(zero_copy_only=False).astype(object) for name in names
    }
    return RawTable(path, columns, {}, len(malformed), malformed[:MAX_EXAMPLES])


def _read_jsonl(path: Path) -> RawTable:
    malformed: list[dict[str, Any]] = []

    def skip(line_number: int, reason: str) -> None:
        malformed.append({"line": line_number, "reason": reason})

    try:
        records, names = read_jsonl(path, skip)
    except (UnicodeDecodeError, OSError) as err:
        raise InteractionFileError(f"{path}: cannot read ({err})") from err
    columns = {}
    for name in names:
        column = np.empty(len(records), dtype=object)
        column[:] = [record.get(name) for record in records]
        columns[name] = column
    return RawTable(path, columns, {}, len(malformed), malformed[:MAX_EXAMPLES])


def _read_parquet(path: Path) -> RawTable:
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise InteractionFileError(f"{path}: cannot read Parquet ({err})") from err
    columns = {}
    for name in table.column_names:
        column = np.empty(table.num_rows, dtype=object)
        column[:] = table.column(name).to_pylist()
        columns[name] = column
    return RawTable(path, columns, {}, 0, [])


def _resolve_names(table: RawTable) -> None:
    """Drop RecBole ``:type`` suffixes and map aliases (``user`` → ``user_id``) in place."""
    renamed: dict[str, np.ndarray] = {}
    for raw_name, column in table.columns.items():
        name, _, kind = raw_name.partition(":")
        name = name.strip()
        if kind:
            table.column_types[name] = kind.strip()
        if name in COLUMN_ALIASES and COLUMN_ALIASES[name] not in table.columns:
            name = COLUMN_ALIASES[name]
        if name in renamed:
            raise InteractionFileError(f"{table.path}: column {raw_name!r} repeats {name!r}")
        renamed[name] = column
    table.columns = renamed


# ---------------------------------------------------------------------------------------------
# Value parsing (vectorized where the common case allows)


def normalize_id(value: Any) -> str | None:
    """An id as text; ``None`` when missing. 7, 7.0 and "7" are one id."""
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _ids(values: np.ndarray):
    """(R,) ids as a pyarrow string array, null where missing (see ``normalize_id``)."""
    try:
        # Fast path (CSV, string columns): arrow trims and tests in C, not per Python object.
        array = pc.utf8_trim_whitespace(pa.array(values, type=pa.string()))
        return pc.if_else(pc.equal(array, ""), pa.scalar(None, pa.string()), array)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([normalize_id(value) for value in values], type=pa.string())


def _encode(ids) -> tuple[np.ndarray, list[str]]:
    """Codes 0..K-1 of non-null arrow ids, numbered in order of first appearance, and the ids
    per code (arrow's dictionary encoding numbers them that way)."""
    encoded = ids.dictionary_encode()
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary.to_pylist()


def _timestamp(value: Any) -> float:
    if is_missing(value) or isinstance(value, bool):
        return math.nan
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        moment = datetime.fromisoformat(str(value).strip())
    except ValueError:
        return math.nan
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _floats(values: np.ndarray, parse=None) -> np.ndarray:
    """(R,) float64; NaN where a value is missing or does not parse."""
    if parse is None:
        try:
            # Fast path: every value is a number or numeric text.
            return np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            parse = _float_or_nan
    return np.fromiter((parse(value) for value in values), dtype=np.float64, count=len(values))


def _float_or_nan(value: Any) -> float:
    if is_missing(value):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _timestamps(values: np.ndarray) -> np.ndarray:
    parsed = _floats(values)
    if np.isnan(parsed).any():
        # ISO dates, or genuinely bad values: the slow path, per value.
        parsed = _floats(values, _timestamp)
    return parsed


# ---------------------------------------------------------------------------------------------
# Catalogue


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

    ``text_fields`` picks (and orders) the text columns; by default every text column except
    ids, video paths and clip keys, in file order.
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
    return {item_id for item_id in _ids(table.columns[column]).to_pylist() if item_id is not None}


# ---------------------------------------------------------------------------------------------
# Validation report


@dataclass
class ValidationReport:
    """What validation found and dropped; ``str()`` prints it, ``to_dict()`` is JSON-able.

    Each dropped row is counted once, under the first reason that applies (see the module
    docstring), so ``rows_read == rows_used + rows_dropped``; malformed lines never became
    records and are counted apart.
    """

    source: str
    rows_read: int = 0
    """Records parsed from the file (malformed lines not included)."""
    malformed_lines: int = 0
    """Lines skipped by the reader (wrong field count, not JSON)."""
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_DROP_REASONS, 0))
    rows_used: int = 0
    users_dropped: int = 0
    """Users with fewer than ``min_interactions`` engaged interactions."""
    non_monotonic_rows: int = 0
    """Rows whose timestamp is earlier than the user's previous row in file order (kept)."""
    non_monotonic_users: int = 0
    users: int = 0
    items: int = 0
    """Catalogue items (interacted with or not)."""
    split_rows: dict[str, int] = field(default_factory=dict)
    engaged_rows: int = 0
    cold_items: int = 0
    """Cold-start items known to the catalogue."""
    cold_targets: dict[str, int] = field(default_factory=dict)
    """Validation/test targets that are cold-start items."""
    unknown_cold_items: int = 0
    """Cold-start ids not in the catalogue (ignored)."""
    catalogue_issues: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Up to ``MAX_EXAMPLES`` rows per problem; ``row`` is the 0-based record position."""

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows_dropped": self.rows_dropped}

    def __str__(self) -> str:
        lines = [
            f"interactions {self.source}: {self.rows_read} rows read, {self.rows_used} used, "
            f"{self.rows_dropped} dropped, {self.malformed_lines} malformed lines skipped",
            f"  users {self.users} ({self.users_dropped} dropped), catalogue items {self.items}, "
            f"engaged rows {self.engaged_rows}",
            f"  splits {self.split_rows}, cold-start items {self.cold_items}, "
            f"cold targets {self.cold_targets}",
        ]
        lines += [f"  dropped {name}: {count}" for name, count in self.dropped.items() if count]
        if self.non_monotonic_rows:
            lines.append(
                f"  timestamps out of order in the file: {self.non_monotonic_rows} rows of "
                f"{self.non_monotonic_users} users (sorted, not dropped)"
            )
        if self.unknown_cold_items:
            lines.append(f"  cold-start ids not in the catalogue: {self.unknown_cold_items}")
        if any(self.catalogue_issues.values()):
            lines.append(f"  catalogue rows skipped: {self.catalogue_issues}")
        for name, rows in self.examples.items():
            if rows:
                lines.append(f"  e.g. {name}: {rows[0]}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Indexed interactions and the leave-one-out split


@dataclass(frozen=True)
class Sequences:
    """Per-user item sequences in CSR form: user ``u`` has ``items[offsets[u]:offsets[u+1]]``."""

    offsets: np.ndarray
    """(U + 1,) int64."""
    items: np.ndarray
    """(total,) int64 item indices (1..N), each user's in time order."""
    rows: np.ndarray
    """(total,) int64 source record positions of those items (what leakage checks compare)."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def user(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def as_lists(self) -> list[np.ndarray]:
        return np.split(self.items, self.offsets[1:-1])


@dataclass(frozen=True)
class EvalSet:
    """One held-out target per user, with the history the model sees when predicting it."""

    users: np.ndarray
    """(E,) int64 user indices."""
    targets: np.ndarray
    """(E,) int64 item indices."""
    target_rows: np.ndarray
    """(E,) int64 source record positions of the targets."""
    is_cold: np.ndarray
    """(E,) bool: the target is a cold-start item."""
    histories: Sequences
    """Engaged history before each target (training rows, plus the validation target for the
    test set when it is warm); also the items to exclude from ranking."""

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class InteractionData:
    """Validated interactions, sorted by (user, timestamp, file order), with their split."""

    catalogue: ItemCatalogue
    user_ids: list[str]
    """User index → original id."""
    user: np.ndarray
    """(R,) int64."""
    item: np.ndarray
    """(R,) int64, 1..N."""
    timestamp: np.ndarray
    """(R,) float64."""
    label: np.ndarray
    """(R,) int8: 1 engaged, 0 skipped."""
    weight: np.ndarray
    """(R,) float32."""
    row: np.ndarray
    """(R,) int64: 0-based record position in the source file (file order)."""
    split: np.ndarray
    """(R,) int8: ``TRAIN``, ``VALID`` or ``TEST``."""
    cold_items: np.ndarray
    """(N + 1,) bool: cold-start items (never in training)."""
    report: ValidationReport

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        """Catalogue items, padding excluded."""
        return len(self.catalogue)

    def _sequences(self, mask: np.ndarray) -> Sequences:
        counts = np.bincount(self.user[mask], minlength=self.num_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Rows are already sorted by (user, time), so a mask keeps each user's order.
        return Sequences(offsets, self.item[mask], self.row[mask])

    def train_sequences(self) -> Sequences:
        """Each user's engaged training items in time order: the inputs (and next-item
        targets) of training. Cold items and held-out rows are never in it."""
        return self._sequences((self.split == TRAIN) & (self.label == 1))

    def pointwise(self, split: str) -> dict[str, np.ndarray]:
        """All rows of ``split`` (engaged and skipped) for BCE/AUC: user, item, label, weight."""
        mask = self.split == SPLIT_NAMES[split]
        return {
            "user": self.user[mask],
            "item": self.item[mask],
            "label": self.label[mask],
            "weight": self.weight[mask],
            "row": self.row[mask],
        }

    def eval_set(self, split: str) -> EvalSet:
        """The validation or test targets (one per user) and the histories that precede them."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        engaged = self.label == 1
        target_mask = engaged & (self.split == SPLIT_NAMES[split])
        history_mask = engaged & (self.split == TRAIN)
        if split == "test":
            # The validation target is history when predicting the test target, unless cold.
            history_mask |= engaged & (self.split == VALID) & ~self.cold_items[self.item]
        return EvalSet(
            users=self.user[target_mask],
            targets=self.item[target_mask],
            target_rows=self.row[target_mask],
            is_cold=self.cold_items[self.item[target_mask]],
            histories=self._sequences(history_mask),
        )

    def popularity(self) -> np.ndarray:
        """(N + 1,) int64 engaged training interactions per item (0 at padding and for cold
        items): the popularity baseline and the logQ correction's sampling frequencies."""
        mask = (self.split == TRAIN) & (self.label == 1)
        return np.bincount(self.item[mask], minlength=self.num_items + 1).astype(np.int64)


def _sorted_by(rows: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """``rows`` (in file order) sorted by ``keys``, most significant first, ties by file order.

    Successive stable argsorts from the least significant key; stability keeps file order
    among ties, so the row number needs no sort key of its own.
    """
    for key in reversed(keys):
        rows = rows[np.argsort(key[rows], kind="stable")]
    return rows


def _example(table: RawTable, row: int) -> dict[str, Any]:
    record = {"row": int(row)}
    for name in ("user_id", "item_id", "timestamp", "label", "weight"):
        if name in table.columns:
            value = table.columns[name][row]
            record[name] = (
                value if isinstance(value, (int, float, str)) or value is None else str(value)
            )
            if isinstance(value, float) and not math.isfinite(value):
                record[name] = str(value)
    return record


def load_interactions(
    path: str | Path,
    catalogue: ItemCatalogue | None = None,
    *,
    format: str | None = None,
    cold_items: Iterable[str] = (),
    min_interactions: int = 3,
) -> InteractionData:
    """Read, validate, index and split one interaction file (see the module docstring).

    Without a catalogue the items are the ones the file mentions, in order of first
    appearance. ``min_interactions`` (at least 3: one training row plus the two held-out
    targets) counts a user's engaged rows that survive validation and cold-start removal.
    """
    if min_interactions < 3:
        raise ValueError(f"min_interactions must be >= 3 for leave-one-out, got {min_interactions}")
    table = read_table(path, format)
    missing = [name for name in REQUIRED_COLUMNS if name not in table.columns]
    if "weight" not in table.columns and "rating" in table.columns:
        table.columns["weight"] = table.columns["rating"]
    if missing:
        raise InteractionFileError(
            f"{table.path}: missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(table.columns) or 'none'})"
        )
    n = len(table)
    report = ValidationReport(source=str(table.path), rows_read=n)
    report.malformed_lines = table.malformed
    report.examples["malformed_lines"] = table.malformed_examples
    reason = np.zeros(n, dtype=np.int8)

    def drop(name: str, bad: np.ndarray) -> None:
        new = bad & (reason == _OK)
        reason[new] = _REASON_CODE[name]
        report.dropped[name] += int(new.sum())
        report.examples[name] = [_example(table, r) for r in np.flatnonzero(new)[:MAX_EXAMPLES]]

    users = _ids(table.columns["user_id"])
    items = _ids(table.columns["item_id"])
    missing_id = users.is_null().to_numpy(zero_copy_only=False)
    drop("missing_ids", missing_id | items.is_null().to_numpy(zero_copy_only=False))
    timestamp = _timestamps(table.columns["timestamp"])
    drop("bad_timestamps", ~np.isfinite(timestamp))
    if "label" in table.columns:
        label = _floats(table.columns["label"])
        drop("bad_labels", ~np.isin(label, (0.0, 1.0)))
    else:
        label = np.ones(n)
    if "weight" in table.columns:
        weight = _floats(table.columns["weight"])
        drop("bad_weights", ~(np.isfinite(weight) & (weight >= 0)))
    else:
        weight = np.ones(n)

    if catalogue is None:
        catalogue = ItemCatalogue.from_ids(_encode(items.drop_null())[1], str(path))
    # Position in the catalogue's id list (0-based, null when unknown) + 1: the item index.
    position = pc.index_in(items, value_set=pa.array(catalogue.item_ids, type=pa.string()))
    item_index = position.fill_null(-2).to_numpy().astype(np.int64) + 1
    drop("unknown_items", item_index < 0)
    report.items = len(catalogue)

    ok = reason == _OK
    user_codes = np.full(n, -1, dtype=np.int64)
    all_user_ids: list[Any] = []
    if ok.any():
        user_codes[ok], all_user_ids = _encode(users.filter(pa.array(ok)))
    rows = np.arange(n, dtype=np.int64)

    # Duplicates: same (user, item, timestamp) as an earlier record.
    order = _sorted_by(rows[ok], user_codes, item_index, timestamp)
    repeat = (
        (user_codes[order[1:]] == user_codes[order[:-1]])
        & (item_index[order[1:]] == item_index[order[:-1]])
        & (timestamp[order[1:]] == timestamp[order[:-1]])
    )
    duplicate = np.zeros(n, dtype=bool)
    duplicate[order[1:][repeat]] = True
    drop("duplicates", duplicate)

    ok = reason == _OK
    # Timestamps going backwards in file order, per user: reported, then sorted away.
    by_user = rows[ok][np.argsort(user_codes[ok], kind="stable")]
    same_user = user_codes[by_user[1:]] == user_codes[by_user[:-1]]
    backwards = same_user & (timestamp[by_user[1:]] < timestamp[by_user[:-1]])
    report.non_monotonic_rows = int(backwards.sum())
    report.non_monotonic_users = len(np.unique(user_codes[by_user[1:]][backwards]))
    report.examples["non_monotonic"] = [
        _example(table, r) for r in by_user[1:][backwards][:MAX_EXAMPLES]
    ]

    # Sort the usable rows by (user, time, file order) and assign the splits.
    ok = reason == _OK
    order = _sorted_by(rows[ok], user_codes, timestamp)
    split = _leave_one_out(user_codes[order], label[order] == 1)

    cold = np.zeros(len(catalogue) + 1, dtype=bool)
    cold_ids = {normalize_id(item_id) for item_id in cold_items}
    cold_known = [catalogue.index[i] for i in cold_ids if i in catalogue.index]
    cold[cold_known] = True
    report.cold_items = len(cold_known)
    report.unknown_cold_items = len(cold_ids) - len(cold_known)
    if report.unknown_cold_items:
        logger.warning("%d cold-start ids are not in the catalogue", report.unknown_cold_items)
    cold_in_train = (split == TRAIN) & cold[item_index[order]]
    drop_rows = np.zeros(n, dtype=bool)
    drop_rows[order[cold_in_train]] = True
    drop("cold_in_train", drop_rows)
    order, split = order[~cold_in_train], split[~cold_in_train]

    # Users need min_interactions engaged rows: the two targets plus enough training rows.
    engaged_train = (split == TRAIN) & (label[order] == 1)
    train_counts = np.bincount(user_codes[order][engaged_train], minlength=user_codes.max() + 1)
    has_targets = np.zeros_like(train_counts, dtype=bool)
    has_targets[user_codes[order][(split == TEST) & (label[order] == 1)]] = True
    has_valid = np.zeros_like(has_targets)
    has_valid[user_codes[order][(split == VALID) & (label[order] == 1)]] = True
    keep_user = has_targets & has_valid & (train_counts + 2 >= min_interactions)
    too_few = ~keep_user[user_codes[order]]
    drop_rows = np.zeros(n, dtype=bool)
    drop_rows[order[too_few]] = True
    drop("too_few_interactions", drop_rows)
    report.users_dropped = len(np.unique(user_codes[order[too_few]]))
    order, split = order[~too_few], split[~too_few]
    if len(order) == 0:
        raise InteractionFileError(f"{table.path}: no usable interactions\n{report}")

    # Renumber the surviving users 0..U-1, still in order of first appearance in the file; the
    # map is monotone, so the (user, time, file order) sort still holds.
    kept_codes = np.unique(user_codes[order])
    user_index = np.searchsorted(kept_codes, user_codes[order])
    user_ids = [str(all_user_ids[code]) for code in kept_codes]

    data = InteractionData(
        catalogue=catalogue,
        user_ids=user_ids,
        user=user_index,
        item=item_index[order],
        timestamp=timestamp[order],
        label=label[order].astype(np.int8),
        weight=weight[order].astype(np.float32),
        row=order,
        split=split.astype(np.int8),
        cold_items=cold,
        report=report,
    )
    report.rows_used = len(order)
    report.users = data.num_users
    report.items = data.num_items
    report.engaged_rows = int((data.label == 1).sum())
    report.split_rows = {
        name: int((data.split == code).sum()) for name, code in SPLIT_NAMES.items()
    }
    target = data.label == 1
    report.cold_targets = {
        name: int((target & (data.split == SPLIT_NAMES[name]) & cold[data.item]).sum())
        for name in ("valid", "test")
    }
    report.catalogue_issues = dict(catalogue.issues)
    for name, rows_ in catalogue.issue_examples.items():
        if rows_:
            report.examples[f"catalogue_{name}"] = rows_
    report.examples = {name: rows_ for name, rows_ in report.examples.items() if rows_}
    logger.info("%s", report)
    return data


def _leave_one_out(user: np.ndarray, engaged: np.ndarray) -> np.ndarray:
    """(R,) split per row of a (user, time)-sorted table, from the engaged rows strictly after
    each row within its user: none → TEST (the last engaged row and the skips after it), one →
    VALID (the second-to-last engaged row and the skips up to the test target), more → TRAIN."""
    if len(user) == 0:
        return np.zeros(0, dtype=np.int8)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    engaged = engaged.astype(np.int64)
    cumulative = np.cumsum(engaged)  # engaged rows up to and including each row
    totals = np.add.reduceat(engaged, starts)  # (users,)
    before_user = np.repeat(cumulative[starts] - engaged[starts], counts)
    engaged_after = np.repeat(totals, counts) - (cumulative - before_user)
    split = np.full(len(user), TRAIN, dtype=np.int8)
    split[engaged_after == 1] = VALID
    split[engaged_after == 0] = TEST
    return split


def _before(ts_a, row_a, ts_b, row_b) -> np.ndarray:
    """Elementwise: (ts_a, row_a) sorts strictly before (ts_b, row_b)."""
    return (ts_a < ts_b) | ((ts_a == ts_b) & (row_a < row_b))


def check_no_leakage(data: InteractionData) -> None:
    """Raise ``LeakageError`` if a held-out row or a cold-start item reaches training inputs.

    The held-out targets are derived afresh from the rows, not read from ``data.split``: per
    user, the last and second-to-last engaged rows in (timestamp, file order). Then everything
    training consumes (``train_sequences()`` and the training pointwise rows) must sort before
    the user's validation target, the evaluation sets must hold exactly those targets, every
    evaluation history must precede its target, and no cold-start item may be in any of them.
    Rows are compared by source record position, so a re-watched item is not a false alarm.
    """
    problems = []
    engaged = np.flatnonzero(data.label == 1)
    engaged = engaged[np.lexsort((data.row[engaged], data.timestamp[engaged], data.user[engaged]))]
    users = data.user[engaged]
    is_last = np.r_[users[1:] != users[:-1], True]
    is_second = np.r_[is_last[1:] & (users[:-1] == users[1:]), False]
    test_at = np.full(data.num_users, -1, dtype=np.int64)  # index into data's arrays
    test_at[users[is_last]] = engaged[is_last]
    valid_at = np.full(data.num_users, -1, dtype=np.int64)
    valid_at[users[is_second]] = engaged[is_second]
    if (valid_at < 0).any():
        problems.append(f"{int((valid_at < 0).sum())} users have no validation target")
        raise LeakageError("; ".join(problems))

    position = np.full(int(data.row.max()) + 1, -1, dtype=np.int64)
    position[data.row] = np.arange(len(data.row))

    def not_before(rows: np.ndarray, row_users: np.ndarray, limit: np.ndarray) -> int:
        at = position[rows]
        bound = limit[row_users]
        ok = _before(data.timestamp[at], data.row[at], data.timestamp[bound], data.row[bound])
        return int((~ok).sum())

    train = data.train_sequences()
    train_users = np.repeat(np.arange(len(train)), train.lengths())
    pointwise = data.pointwise("train")
    for name, rows, row_users in (
        ("training sequence", train.rows, train_users),
        ("training pointwise", pointwise["row"], pointwise["user"]),
    ):
        late = not_before(rows, row_users, valid_at)
        if late:
            problems.append(f"{late} {name} rows are held out or after the validation target")
    for name, limit in (("valid", valid_at), ("test", test_at)):
        eval_set = data.eval_set(name)
        if not np.array_equal(eval_set.users, np.arange(data.num_users)) or not np.array_equal(
            eval_set.target_rows, data.row[limit]
        ):
            problems.append(f"the {name} targets are not each user's held-out row")
            continue
        history_users = np.repeat(eval_set.users, eval_set.histories.lengths())
        late = not_before(eval_set.histories.rows, history_users, limit)
        if late:
            problems.append(f"{late} {name} history rows are the target or after it")
        if data.cold_items[eval_set.histories.items].any():
            problems.append(f"{name} histories contain cold-start items")
    cold = int(data.cold_items[train.items].sum() + data.cold_items[pointwise["item"]].sum())
    if cold:
        problems.append(f"{cold} training rows have cold-start items")
    if problems:
        raise LeakageError("; ".join(problems))
