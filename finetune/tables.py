"""Interaction logs and item catalogues read into columns, and the value parsers that training
and serving share.

Formats (from the suffix; ``format=`` overrides): CSV, TSV, JSONL, Parquet, RecBole atomic
files (``.inter``/``.item``: tab-separated, no quoting, ``name:type`` headers) and MicroLens
pair files (CSV); ``user``/``item`` are aliases of ``user_id``/``item_id`` in every format.
Values are read as text (or the file's own types) and parsed per column afterwards, so one bad
value costs its row, never the file; lines that do not parse are skipped and counted.
"""

from __future__ import annotations

import csv
import math
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

COLUMN_ALIASES = {"user": "user_id", "item": "item_id"}
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
"""Example rows kept per problem in reports."""


class InteractionFileError(ValueError):
    """A file that cannot be used at all; the message names the file (and line or column)."""


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


def parse_ids(values: np.ndarray):
    """(R,) ids as a pyarrow string array, null where missing (see ``normalize_id``)."""
    try:
        # Fast path (CSV, string columns): arrow trims and tests in C, not per Python object.
        array = pc.utf8_trim_whitespace(pa.array(values, type=pa.string()))
        return pc.if_else(pc.equal(array, ""), pa.scalar(None, pa.string()), array)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([normalize_id(value) for value in values], type=pa.string())


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


def parse_floats(values: np.ndarray, parse=None) -> np.ndarray:
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


def parse_timestamps(values: np.ndarray) -> np.ndarray:
    parsed = parse_floats(values)
    if np.isnan(parsed).any():
        # ISO dates, or genuinely bad values: the slow path, per value.
        parsed = parse_floats(values, _timestamp)
    return parsed
