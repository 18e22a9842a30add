"""Interaction logs → validated, indexed interactions, split leave-one-out by time per user.

In each user's history sorted by (timestamp, file order) the last engaged row is the test
target, the second-to-last engaged row the validation target, and every earlier row is
training data. Skipped rows (label 0) take the split of the zone they fall in (before the
validation target: train; between the two targets: validation; after the test target: test);
they never enter histories, which are built from engaged rows only, and serve the pointwise
(BCE/AUC) data. Cold-start items never reach training: a training-zone row with a cold item is
removed (counted), so cold items appear only as validation/test rows, and a cold validation
target is left out of the test history too. ``check_no_leakage`` verifies all of this on the
arrays training and evaluation actually consume.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune.catalogue import ItemCatalogue, read_catalogue, read_cold_items
from finetune.config import FinetuneDataSettings
from finetune.tables import (
    MAX_EXAMPLES,
    InteractionFileError,
    RawTable,
    normalize_id,
    parse_floats,
    parse_ids,
    parse_timestamps,
    read_table,
)

logger = logging.getLogger(__name__)

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "valid": VALID, "test": TEST}

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")

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


class LeakageError(AssertionError):
    """Validation or test data reached training inputs (raised by ``check_no_leakage``)."""


# ---------------------------------------------------------------------------------------------
# Validation report


@dataclass
class ValidationReport:
    """What validation found and dropped; ``str()`` prints it, ``to_dict()`` is JSON-able.

    Each dropped row is counted once, under the first reason that applies (see
    ``load_interactions``), so ``rows_read == rows_used + rows_dropped``; malformed lines never
    became records and are counted apart.
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


def _encode(ids) -> tuple[np.ndarray, list[str]]:
    """Codes 0..K-1 of non-null arrow ids, numbered in order of first appearance, and the ids
    per code (arrow's dictionary encoding numbers them that way)."""
    encoded = ids.dictionary_encode()
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary.to_pylist()


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
    """Read, validate, index and split one interaction file (any format of ``finetune.tables``).

    Columns: ``user_id``, ``item_id``, ``timestamp`` (unix time as a number, or ISO 8601 text,
    naive times read as UTC; only the order matters), optional ``label`` (1 engaged, 0 skipped)
    and ``weight`` (a non-negative float such as the watch ratio; RecBole's ``rating`` is read
    as the weight when no ``weight`` column exists). Users are numbered 0..U-1 in the order
    they first appear in the file.

    Every row is checked and the ones that cannot be used are dropped, each counted under the
    first reason that applies, in this order: missing id, bad timestamp, bad label (not 0/1),
    bad weight (negative or not finite), unknown item (not in the catalogue), duplicate (same
    user, item and timestamp as an earlier row; the first is kept), cold-start item in the
    training zone, then users with too few engaged interactions (all their rows). Malformed
    lines never become records and are counted apart. Timestamps that go backwards in file
    order within a user (among rows that passed the row checks) are counted but not dropped:
    histories are sorted by (timestamp, file order) anyway. Everything lands in one
    ``ValidationReport``; a file that cannot be read at all, or lacks a required column, raises
    ``InteractionFileError`` naming the file (and the line where there is one).

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

    users = parse_ids(table.columns["user_id"])
    items = parse_ids(table.columns["item_id"])
    missing_id = users.is_null().to_numpy(zero_copy_only=False)
    drop("missing_ids", missing_id | items.is_null().to_numpy(zero_copy_only=False))
    timestamp = parse_timestamps(table.columns["timestamp"])
    drop("bad_timestamps", ~np.isfinite(timestamp))
    if "label" in table.columns:
        label = parse_floats(table.columns["label"])
        drop("bad_labels", ~np.isin(label, (0.0, 1.0)))
    else:
        label = np.ones(n)
    if "weight" in table.columns:
        weight = parse_floats(table.columns["weight"])
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


def load_run_data(settings: FinetuneDataSettings) -> InteractionData:
    """A finetune run's interactions as training and export read them: with the catalogue's
    items, or the items the interactions name (known by id only) when there is none, and the
    cold-start ids listed in the config or in a file."""
    catalogue = None
    if settings.catalogue:
        catalogue = read_catalogue(settings.catalogue, text_fields=settings.text_fields)
    cold = settings.cold_items
    cold_ids = read_cold_items(cold) if isinstance(cold, str) and cold else set(cold or ())
    return load_interactions(
        settings.interactions,
        catalogue,
        cold_items=cold_ids,
        min_interactions=settings.min_interactions,
    )
