"""Interaction and catalogue readers, validation report, leave-one-out split, leakage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.catalogue import (
    PADDING_INDEX,
    clip_keys_from_shards,
    read_catalogue,
    read_cold_items,
)
from finetune.interactions import (
    TEST,
    TRAIN,
    VALID,
    LeakageError,
    check_no_leakage,
    load_interactions,
)
from finetune.tables import InteractionFileError

COLUMNS = ("user_id", "item_id", "timestamp", "label", "weight")
# File order; u2's second row goes back in time; u1's i3 and u3's i1 are skips (label 0).
ROWS = [
    ("u1", "i1", 100, 1, 0.9),
    ("u1", "i2", 200, 1, 0.8),
    ("u1", "i3", 300, 0, 0.1),
    ("u1", "i4", 400, 1, 1.0),
    ("u1", "i5", 500, 1, 0.7),
    ("u2", "i2", 150, 1, 0.5),
    ("u2", "i3", 50, 1, 0.6),
    ("u2", "i1", 250, 1, 0.4),
    ("u3", "i5", 10, 1, 1.0),
    ("u3", "i4", 20, 1, 1.0),
    ("u3", "i3", 30, 1, 1.0),
    ("u3", "i1", 40, 0, 0.2),
]
CATALOGUE = [
    {"item_id": "i1", "title": "Red ball", "caption": "a red ball rolls", "video_keys": ["k1a"]},
    {"item_id": "i2", "title": "Blue box", "caption": "a blue box slides"},  # text only
    {"item_id": "i3", "video_keys": ["k3a", "k3b"]},  # video only
    {"item_id": "i4", "title": "Green star", "video": "videos/i4.mp4", "duration": 3.5},
    {"item_id": "i5", "caption": "a yellow cross"},
]


def write_csv(path, rows, columns=COLUMNS):
    lines = [",".join(columns)] + [",".join(str(value) for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def catalogue(tmp_path):
    return read_catalogue(write_jsonl(tmp_path / "items.jsonl", CATALOGUE))


def assert_reference_split(data):
    """The split of ROWS, worked out by hand (items i1..i5 are 1..5, users in file order)."""
    assert data.user_ids == ["u1", "u2", "u3"]
    # u1: i1, i2 train, skip i3 (before the validation target) train, i4 valid, i5 test.
    # u2 sorted by time: i3 (50) train, i2 (150) valid, i1 (250) test.
    # u3: i5 train, i4 valid, i3 test, and the skip i1 after the test target is test.
    assert data.item.tolist() == [1, 2, 3, 4, 5, 3, 2, 1, 5, 4, 3, 1]
    assert data.split.tolist() == [
        TRAIN, TRAIN, TRAIN, VALID, TEST, TRAIN, VALID, TEST, TRAIN, VALID, TEST, TEST,
    ]  # fmt: skip
    assert data.label.tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert data.row.tolist() == [0, 1, 2, 3, 4, 6, 5, 7, 8, 9, 10, 11]
    train = data.train_sequences()
    assert [seq.tolist() for seq in train.as_lists()] == [[1, 2], [3], [5]]
    valid, test = data.eval_set("valid"), data.eval_set("test")
    assert valid.targets.tolist() == [4, 2, 4]
    assert [h.tolist() for h in valid.histories.as_lists()] == [[1, 2], [3], [5]]
    assert test.targets.tolist() == [5, 1, 3]
    assert [h.tolist() for h in test.histories.as_lists()] == [[1, 2, 4], [3, 2], [5, 4]]
    assert data.popularity().tolist() == [0, 1, 1, 1, 0, 1]
    assert data.report.non_monotonic_rows == 1 and data.report.non_monotonic_users == 1
    assert data.report.rows_used == 12 and data.report.rows_dropped == 0
    check_no_leakage(data)


def test_csv(tmp_path, catalogue):
    assert_reference_split(load_interactions(write_csv(tmp_path / "x.csv", ROWS), catalogue))


def test_jsonl(tmp_path, catalogue):
    records = [dict(zip(COLUMNS, row, strict=True)) for row in ROWS]
    assert_reference_split(load_interactions(write_jsonl(tmp_path / "x.jsonl", records), catalogue))


def test_jsonl_malformed_lines_are_skipped_and_counted(tmp_path, catalogue):
    records = [json.dumps(dict(zip(COLUMNS, row, strict=True))) for row in ROWS]
    lines = records[:3] + ["{not json", "", "[1, 2]"] + records[3:]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    data = load_interactions(tmp_path / "x.jsonl", catalogue)
    assert_reference_split(data)
    assert data.report.malformed_lines == 2
    examples = data.report.examples["malformed_lines"]
    assert [example["line"] for example in examples] == [4, 6]
    assert examples[0]["reason"].startswith("not JSON (")
    assert examples[1]["reason"] == "not a JSON object"


def test_parquet(tmp_path, catalogue):
    table = pa.table({name: [row[i] for row in ROWS] for i, name in enumerate(COLUMNS)})
    pq.write_table(table, tmp_path / "x.parquet")
    assert_reference_split(load_interactions(tmp_path / "x.parquet", catalogue))


def test_iso_timestamps_and_format_override(tmp_path, catalogue):
    rows = [
        (u, i, f"1970-01-01T00:{ts // 60:02d}:{ts % 60:02d}", lab, w) for u, i, ts, lab, w in ROWS
    ]
    path = write_csv(tmp_path / "log.txt", rows)
    with pytest.raises(InteractionFileError, match="log.txt"):
        load_interactions(path, catalogue)
    assert_reference_split(load_interactions(path, catalogue, format="csv"))


def test_recbole_atomic_files(tmp_path):
    header = "user_id:token\titem_id:token\ttimestamp:float\tlabel:float\trating:float"
    lines = [header] + ["\t".join(str(value) for value in row) for row in ROWS]
    (tmp_path / "x.inter").write_text("\n".join(lines) + "\n")
    (tmp_path / "x.item").write_text(
        "item_id:token\ttitle:token_seq\tyear:float\tgenre:token_seq\n"
        + "".join(f'i{n}\tHe said "item {n}"\t199{n}\tdrama\n' for n in range(1, 6))
    )
    catalogue = read_catalogue(tmp_path / "x.item")
    assert catalogue.text_fields == ("title", "genre")  # year is a float column
    assert catalogue.text(1) == 'He said "item 1". drama'  # no CSV quoting in atomic files
    data = load_interactions(tmp_path / "x.inter", catalogue)
    assert_reference_split(data)
    assert data.weight[:2].tolist() == pytest.approx([0.9, 0.8])  # rating read as the weight


def test_microlens_pairs_without_labels(tmp_path):
    rows = [(user, item, ts) for user, item, ts, _, _ in ROWS]
    path = write_csv(tmp_path / "pairs.csv", rows, columns=("user", "item", "timestamp"))
    data = load_interactions(path)  # no catalogue: items numbered by first appearance
    assert data.catalogue.item_ids == ["i1", "i2", "i3", "i4", "i5"]
    assert data.label.tolist() == [1] * 12  # no label column: every row is engaged
    assert data.weight.tolist() == [1.0] * 12
    # Every row engaged: u3's i1 (40) is now its test target and i3 its validation target.
    assert [s.tolist() for s in data.train_sequences().as_lists()] == [[1, 2, 3], [3], [5, 4]]
    assert data.eval_set("test").targets.tolist() == [5, 1, 1]
    assert load_interactions(path, format="microlens").item.tolist() == data.item.tolist()
    check_no_leakage(data)


def test_catalogue_formats_and_modalities(tmp_path, catalogue):
    # JSONL: the defaults skip ids, the video path, the clip keys and numeric columns.
    assert catalogue.text_fields == ("title", "caption")
    assert catalogue.item_ids == ["i1", "i2", "i3", "i4", "i5"]
    assert catalogue.index["i1"] == 1 and catalogue.num_embeddings == 6
    assert catalogue.text(1) == "Red ball. a red ball rolls"
    assert catalogue.text(3) == ""  # video only
    assert catalogue.clip_keys[2] == ("k3a", "k3b")
    assert catalogue.has_text().tolist() == [False, True, True, False, True, True]
    assert catalogue.has_video().tolist() == [False, True, False, True, False, False]

    (tmp_path / "items.csv").write_text(
        "item_id,title,tags,clip_keys,year\n"
        'i1,"Red, round ball",red;ball,k1a; k1b,1999\n'
        "i2,,,k2a,2001\n"
        "i3,Only text,,,\n"
    )
    csv_catalogue = read_catalogue(tmp_path / "items.csv")
    assert csv_catalogue.text_fields == ("title", "tags")
    assert csv_catalogue.clip_keys == [("k1a", "k1b"), ("k2a",), ()]
    assert csv_catalogue.text(1) == "Red, round ball. red;ball"
    assert read_catalogue(tmp_path / "items.csv", text_fields=["tags"]).text(1) == "red;ball"

    table = pa.table({"item_id": [7, 8], "description": ["seven", None], "clip_keys": [["a"], []]})
    pq.write_table(table, tmp_path / "items.parquet")
    pq_catalogue = read_catalogue(tmp_path / "items.parquet")
    assert pq_catalogue.item_ids == ["7", "8"]  # integer ids become text, like the log's
    assert pq_catalogue.texts == [{"description": "seven"}, {}]
    assert pq_catalogue.clip_keys == [("a",), ()]

    keyed = catalogue.with_clip_keys({"i2": ["x1"], "nope": ["x2"]})
    assert keyed.clip_keys[1] == ("x1",) and keyed.clip_keys[0] == ()


def test_bad_rows_are_dropped_and_counted(tmp_path):
    lines = [
        "user_id,item_id,timestamp,label,weight",
        "u1,i1,100,1,1.0",  # 0 ok
        "u1,i2,200,1,1.0",  # 1 ok
        ",i3,300,1,1.0",  # 2 missing user id
        "u1,i3,yesterday,1,1.0",  # 3 bad timestamp
        "u1,i3,,1,1.0",  # 4 bad (empty) timestamp
        "u1,i3,300,2,1.0",  # 5 bad label
        "u1,i3,300,1,-1",  # 6 bad weight
        "u1,zzz,300,1,1.0",  # 7 unknown item
        "u1,i1,100,1,0.5",  # 8 duplicate of row 0
        "u1,i3,300,1,1.0,surplus",  # malformed line: never a record
        "u1,i4,50,1,nan",  # 9 bad weight (NaN)
        "u1,i4,50,1,1.0",  # 10 ok, earlier than row 1 in the file: non-monotonic
        "u1,i5,400,1,1.0",  # 11 ok
        "u2,i1,100,1,1.0",  # 12 u2 has two engaged rows only: too few
        "u2,i2,200,1,1.0",  # 13
    ]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    items = [*CATALOGUE, {"item_id": "i1", "title": "again"}, {"title": "no id"}]
    catalogue = read_catalogue(write_jsonl(tmp_path / "items.jsonl", items))
    data = load_interactions(path, catalogue)
    report = data.report
    assert report.rows_read == 14
    assert report.malformed_lines == 1
    assert report.dropped == {
        "missing_ids": 1,
        "bad_timestamps": 2,
        "bad_labels": 1,
        "bad_weights": 2,
        "unknown_items": 1,
        "duplicates": 1,
        "cold_in_train": 0,
        "too_few_interactions": 2,
    }
    assert report.users_dropped == 1
    assert report.rows_used == 4 == report.rows_read - report.rows_dropped
    assert report.non_monotonic_rows == 1 and report.non_monotonic_users == 1
    assert report.catalogue_issues == {"missing_ids": 1, "duplicate_ids": 1, "malformed": 0}
    assert report.examples["bad_timestamps"][0]["timestamp"] == "yesterday"
    assert report.examples["duplicates"] == [
        {
            "row": 8,
            "user_id": "u1",
            "item_id": "i1",
            "timestamp": "100",
            "label": "1",
            "weight": "0.5",
        }
    ]
    # Printable and JSON-able.
    assert "bad_labels: 1" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["rows_dropped"] == 10
    # What is left is u1 sorted by time: i4 (50), i1 (100) train, i2 valid, i5 test.
    assert data.item.tolist() == [4, 1, 2, 5]
    assert data.split.tolist() == [TRAIN, TRAIN, VALID, TEST]


def test_unusable_files_raise_with_the_file_name(tmp_path, catalogue):
    no_time = write_csv(tmp_path / "no_time.csv", [("u1", "i1")], columns=("user_id", "item_id"))
    with pytest.raises(InteractionFileError, match=r"no_time\.csv.*timestamp"):
        load_interactions(no_time, catalogue)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(InteractionFileError, match=r"broken\.parquet"):
        load_interactions(broken, catalogue)
    with pytest.raises(InteractionFileError, match="not found"):
        load_interactions(tmp_path / "absent.csv", catalogue)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InteractionFileError, match=r"empty\.csv"):
        load_interactions(empty, catalogue)
    # Every row unusable (unknown items): an error that carries the report, not a crash.
    unknown = write_csv(tmp_path / "unknown.csv", [("u1", "zz", 1, 1, 1.0)] * 3)
    with pytest.raises(InteractionFileError, match="unknown_items: 3"):
        load_interactions(unknown, catalogue)
    with pytest.raises(ValueError, match="min_interactions"):
        load_interactions(write_csv(tmp_path / "x.csv", ROWS), catalogue, min_interactions=2)


def test_min_interactions(tmp_path, catalogue):
    path = write_csv(tmp_path / "x.csv", ROWS)
    # u1 has four engaged rows, u2 and u3 three: only u1 reaches four.
    data = load_interactions(path, catalogue, min_interactions=4)
    assert data.user_ids == ["u1"]
    assert data.report.users_dropped == 2 and data.report.dropped["too_few_interactions"] == 7


def test_equal_timestamps_keep_file_order(tmp_path, catalogue):
    rows = [("u1", "i3", 5, 1, 1.0), ("u1", "i1", 5, 1, 1.0), ("u1", "i2", 5, 1, 1.0)]
    data = load_interactions(write_csv(tmp_path / "x.csv", rows), catalogue)
    assert data.item.tolist() == [3, 1, 2]
    assert data.split.tolist() == [TRAIN, VALID, TEST]


def test_cold_items_never_reach_training(tmp_path):
    items = [{"item_id": f"i{n}", "title": f"item {n}"} for n in range(1, 7)]
    catalogue = read_catalogue(write_jsonl(tmp_path / "items.jsonl", items))
    rows = [
        # u1: cold i3 in the training zone (removed), cold i6 as the test target.
        ("u1", "i1", 1, 1, 1.0),
        ("u1", "i3", 2, 1, 1.0),
        ("u1", "i2", 3, 1, 1.0),
        ("u1", "i4", 4, 1, 1.0),
        ("u1", "i6", 5, 1, 1.0),
        # u2: cold i3 as the validation target: kept, but not in the test history.
        ("u2", "i1", 1, 1, 1.0),
        ("u2", "i2", 2, 1, 1.0),
        ("u2", "i5", 3, 1, 1.0),
        ("u2", "i3", 4, 1, 1.0),
        ("u2", "i4", 5, 1, 1.0),
        # u3: a skipped cold item in the training zone (removed from the pointwise data too).
        ("u3", "i6", 1, 0, 0.1),
        ("u3", "i1", 2, 1, 1.0),
        ("u3", "i2", 3, 1, 1.0),
        ("u3", "i4", 4, 1, 1.0),
        ("u3", "i5", 5, 1, 1.0),
    ]
    data = load_interactions(
        write_csv(tmp_path / "x.csv", rows), catalogue, cold_items={"i3", "i6"}
    )
    assert data.report.dropped["cold_in_train"] == 2
    assert data.report.cold_items == 2
    assert data.report.cold_targets == {"valid": 1, "test": 1}
    assert [s.tolist() for s in data.train_sequences().as_lists()] == [[1, 2], [1, 2, 5], [1, 2]]
    assert data.pointwise("train")["item"].tolist() == [1, 2, 1, 2, 5, 1, 2]
    valid, test = data.eval_set("valid"), data.eval_set("test")
    assert valid.is_cold.tolist() == [False, True, False]
    assert test.is_cold.tolist() == [True, False, False]
    assert [h.tolist() for h in test.histories.as_lists()] == [[1, 2, 4], [1, 2, 5], [1, 2, 4]]
    assert data.popularity()[[3, 6]].tolist() == [0, 0]
    check_no_leakage(data)


def test_leakage_check_catches_tampering(tmp_path, catalogue):
    path = write_csv(tmp_path / "x.csv", ROWS)
    data = load_interactions(path, catalogue)
    check_no_leakage(data)
    # The validation target of u1 (sorted row 3) marked as training: it reaches the inputs.
    data.split[3] = TRAIN
    with pytest.raises(LeakageError, match="training sequence"):
        check_no_leakage(data)
    data = load_interactions(path, catalogue)
    data.cold_items[1] = True  # item i1, in training: as if the cold set were ignored
    with pytest.raises(LeakageError, match="cold-start"):
        check_no_leakage(data)
    data = load_interactions(path, catalogue)
    data.split[10:12] = TRAIN  # u3's test target and the skip after it
    with pytest.raises(LeakageError):
        check_no_leakage(data)


def test_random_logs_split_without_leakage(tmp_path):
    rng = np.random.default_rng(0)
    num_items = 50
    items = [{"item_id": f"i{n}", "title": f"t{n}"} for n in range(num_items)]
    catalogue = read_catalogue(write_jsonl(tmp_path / "items.jsonl", items))
    rows = [
        (f"u{rng.integers(40)}", f"i{rng.integers(num_items)}", int(rng.integers(1000)),
         int(rng.random() < 0.8), round(float(rng.random()), 3))
        for _ in range(2000)
    ]  # fmt: skip
    cold = {f"i{n}" for n in range(0, num_items, 7)}
    data = load_interactions(write_csv(tmp_path / "x.csv", rows), catalogue, cold_items=cold)
    check_no_leakage(data)
    train_items = {int(i) for i in data.train_sequences().items}
    assert not train_items & {catalogue.index[i] for i in cold}
    valid_rows = set(data.eval_set("valid").target_rows.tolist())
    test_rows = set(data.eval_set("test").target_rows.tolist())
    assert not set(data.train_sequences().rows.tolist()) & (valid_rows | test_rows)
    assert len(valid_rows) == len(test_rows) == data.num_users
    assert PADDING_INDEX not in data.item


def test_synthetic_data(synthetic_shards):
    synth = synthetic_shards["train"].parent / "synth"
    catalogue = read_catalogue(synth / "items.jsonl")
    assert catalogue.text_fields == ("title", "caption", "tags", "motion")
    assert len(catalogue) == 128
    # The synthetic catalogue has no clip keys: they come from the shard sets, one per item.
    for name, first, last in (("train", 0, 96), ("eval", 96, 128)):
        keys = clip_keys_from_shards(synthetic_shards[name])
        assert sorted(keys) == catalogue.item_ids[first:last]
        assert keys[catalogue.item_ids[first]] == ["000000000_000"]  # row 0 of that manifest
    keyed = catalogue.with_clip_keys(clip_keys_from_shards(synthetic_shards["train"]))
    assert keyed.has_video().sum() == 96

    cold = read_cold_items(synth / "synth.json")
    assert cold == read_cold_items(synth / "manifest_cold.jsonl")
    description = json.loads((synth / "synth.json").read_text())
    data = load_interactions(synth / "interactions.csv", catalogue, cold_items=cold)
    report = data.report
    assert report.rows_read == description["counts"]["interactions"]
    assert report.dropped["missing_ids"] == report.dropped["duplicates"] == 0
    assert report.non_monotonic_rows == 0  # written sorted by user, then time
    # Cold-start rows are each user's final engaged row, after the cutoff: test targets only.
    assert report.dropped["cold_in_train"] == 0
    assert report.cold_targets["valid"] == 0
    assert report.cold_targets["test"] == description["counts"]["cold_start_interactions"]
    check_no_leakage(data)
    test = data.eval_set("test")
    assert test.is_cold.sum() == description["counts"]["cold_start_interactions"]
    assert (
        data.timestamp[(data.label == 1) & data.cold_items[data.item]]
        > description["cutoff_timestamp"]
    ).all()
