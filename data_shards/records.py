"""Record files shared by the manifest and the finetune tables: JSON Lines and missing values.

The readers here name no file in their errors: each caller words its own (manifests refuse a
bad line, interaction logs skip and count it), so ``read_jsonl`` hands bad lines to a callback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_missing(value: Any) -> bool:
    """None, or a float NaN (how pandas and Parquet write an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_jsonl(
    path: str | Path, on_malformed: Callable[[int, str], None]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects of a JSON Lines file, and their keys in order of first appearance.

    Blank lines are skipped; a line that is not a JSON object is not a record: it goes to
    ``on_malformed(line_number, reason)`` (1-based; the reason reads "not JSON (...)" or
    "not a JSON object"), which may raise to refuse the file.
    """
    records: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    # utf-8-sig: a byte-order mark would otherwise make the first line unparseable.
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                on_malformed(line_number, f"not JSON ({err.msg})")
                continue
            if not isinstance(record, dict):
                on_malformed(line_number, "not a JSON object")
                continue
            records.append(record)
            columns.update(dict.fromkeys(record))
    return records, list(columns)
