"""Manifest reading and validation: every error names the file, row or line, and column."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_shards.manifest import ManifestError, ManifestRow, partition, read_manifest
from vidrec_cli import main as vidrec_main

# One manifest's content, as every format can hold it (strings only: CSV has no other type).
RECORDS = [
    {
        "video": "clips/a.mp4",
        "caption": "Ünïcödé «字幕» 🎬, with a comma",
        "key": "alpha",
        "item_id": "item-1",
        "title": "A",
        "tags": "cats, dogs",
        "description": "first",
        "lang": "mixed",
    },
    {
        "video": "/data/b.webm",
        "caption": "",
        "key": "",
        "item_id": "",
        "title": "",
        "tags": "",
        "description": "",
        "lang": "en",
    },
    {
        "video": "http://127.0.0.1:8000/c.mp4",
        "caption": "third",
        "key": "gamma",
        "item_id": "",
        "title": "",
        "tags": "solo",
        "description": "",
        "lang": "fr",
    },
]


def write_csv(path: Path, records: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(dict.fromkeys(name for record in records for name in record))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def expected_rows(manifest_dir: Path) -> list[ManifestRow]:
    return [
        ManifestRow(
            row=0,
            key="alpha",
            video=str((manifest_dir / "clips" / "a.mp4").resolve()),
            caption=RECORDS[0]["caption"],
            item_id="item-1",
            title="A",
            tags=["cats", "dogs"],
            description="first",
            extra={"lang": "mixed"},
        ),
        ManifestRow(
            row=1,
            key="000000001",
            video="/data/b.webm",
            caption="",
            item_id="000000001",
            extra={"lang": "en"},
        ),
        ManifestRow(
            row=2,
            key="gamma",
            video="http://127.0.0.1:8000/c.mp4",
            caption="third",
            item_id="gamma",
            tags=["solo"],
            extra={"lang": "fr"},
        ),
    ]


def test_csv_jsonl_and_parquet_read_the_same_rows(tmp_path, monkeypatch):
    manifest_dir = tmp_path / "manifests"
    manifest_dir.mkdir()
    # Relative paths resolve against the manifest's folder, not the working directory.
    monkeypatch.chdir(tmp_path)
    csv_path = write_csv(manifest_dir / "m.csv", RECORDS)
    # JSONL: missing optional fields are absent or null rather than empty; tags may be a list.
    jsonl_records = [dict(record) for record in RECORDS]
    jsonl_records[0]["tags"] = ["cats", "dogs"]
    jsonl_records[1] = {"video": "/data/b.webm", "caption": "", "item_id": None, "lang": "en"}
    jsonl_path = write_jsonl(manifest_dir / "m.jsonl", jsonl_records)
    parquet_records = [dict(record) for record in RECORDS]
    for record in parquet_records:
        record["tags"] = [tag.strip() for tag in record["tags"].split(",") if tag.strip()]
    parquet_records[1]["key"] = None
    parquet_records[1]["caption"] = None
    parquet_path = manifest_dir / "m.parquet"
    pq.write_table(pa.Table.from_pylist(parquet_records), parquet_path)

    expected = expected_rows(manifest_dir)
    assert read_manifest(csv_path) == expected
    assert read_manifest(jsonl_path) == expected
    assert read_manifest(parquet_path) == expected
    assert [row.is_url for row in expected] == [False, False, True]


def test_byte_order_mark_is_ignored(tmp_path):
    # Spreadsheet exports start with a UTF-8 byte-order mark.
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffvideo,caption\nx.mp4,café\n".encode())
    [row] = read_manifest(path)
    assert (row.video, row.caption) == (str(tmp_path / "x.mp4"), "café")
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes('\ufeff{"video": "x.mp4", "caption": "c"}\n'.encode())
    assert read_manifest(jsonl)[0].caption == "c"


@pytest.mark.parametrize("missing", ["caption", "video"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_missing_required_column_is_named(tmp_path, missing, suffix):
    records = [{k: v for k, v in record.items() if k != missing} for record in RECORDS]
    path = tmp_path / f"m{suffix}"
    if suffix == ".csv":
        write_csv(path, records)
    else:
        write_jsonl(path, records)
    with pytest.raises(ManifestError, match=rf"missing required column\(s\) {missing}\b"):
        read_manifest(path)


def test_jsonl_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"video": "a.mp4", "caption": "a"}\n\n{"video": "b.mp4", caption: b}\n', encoding="utf-8"
    )
    with pytest.raises(ManifestError, match=r"m\.jsonl: line 3 is not JSON"):
        read_manifest(path)
    path.write_text('{"video": "a.mp4", "caption": "a"}\n["b.mp4", "b"]\n', encoding="utf-8")
    with pytest.raises(ManifestError, match="line 2 is not a JSON object"):
        read_manifest(path)


def test_csv_row_with_too_many_fields_is_named(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("video,caption\na.mp4,fine\nb.mp4,unquoted, comma\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"row 1 \(line 3\) has more fields"):
        read_manifest(path)


def test_empty_video_value_is_named(tmp_path):
    path = write_csv(
        tmp_path / "m.csv",
        [
            {"video": "a.mp4", "caption": "a"},
            {"video": "b.mp4", "caption": "b"},
            {"video": "  ", "caption": "c"},
        ],
    )
    with pytest.raises(ManifestError, match=r"row 2 has an empty 'video' value"):
        read_manifest(path)


def test_duplicate_key_names_both_rows(tmp_path):
    records = [
        {"video": "a.mp4", "caption": "a", "key": "k1"},
        {"video": "b.mp4", "caption": "b", "key": "dup"},
        {"video": "c.mp4", "caption": "c", "key": "k3"},
        {"video": "d.mp4", "caption": "d", "key": "dup"},
    ]
    with pytest.raises(ManifestError, match=r"row 3 repeats key 'dup' of row 1"):
        read_manifest(write_csv(tmp_path / "m.csv", records))
    # A given key that equals another row's default key is a duplicate too.
    records = [{"video": "a.mp4", "caption": "a"}, {"video": "b.mp4", "caption": "b"}]
    records[1]["key"] = "000000000"
    with pytest.raises(ManifestError, match=r"row 1 repeats key '000000000' of row 0"):
        read_manifest(write_jsonl(tmp_path / "m.jsonl", records))


@pytest.mark.parametrize("column", ["fps", "source", "clip_start", "width"])
def test_reserved_column_is_refused(tmp_path, column):
    path = write_csv(tmp_path / "m.csv", [{"video": "a.mp4", "caption": "a", column: "1"}])
    with pytest.raises(ManifestError, match=rf"column\(s\) {column} clash"):
        read_manifest(path)


def test_other_malformed_manifests(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "absent.csv")
    (tmp_path / "m.txt").write_text("video,caption\n")
    with pytest.raises(ManifestError, match="unknown manifest type '.txt'"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "header.csv").write_text("video,caption\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(tmp_path / "header.csv")
    write_jsonl(tmp_path / "number.jsonl", [{"video": "a.mp4", "caption": 3}])
    with pytest.raises(ManifestError, match=r"row 0 column 'caption' is not text"):
        read_manifest(tmp_path / "number.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ManifestError, match="cannot read Parquet"):
        read_manifest(tmp_path / "broken.parquet")
    (tmp_path / "no-videos").mkdir()
    with pytest.raises(ManifestError, match="no video files"):
        read_manifest(tmp_path / "no-videos")


def test_tags_as_string_or_list(tmp_path):
    records = [
        {"video": "a.mp4", "caption": "a", "tags": "x, y ,, z"},
        {"video": "b.mp4", "caption": "b", "tags": ["x", "y", 3]},
        {"video": "c.mp4", "caption": "c", "tags": None},
        {"video": "d.mp4", "caption": "d"},
    ]
    rows = read_manifest(write_jsonl(tmp_path / "m.jsonl", records))
    assert [row.tags for row in rows] == [["x", "y", "z"], ["x", "y", "3"], [], []]


def test_video_folder_reads_sidecar_captions(tmp_path):
    folder = tmp_path / "videos"
    (folder / "sub dir").mkdir(parents=True)
    for name in ("b.mp4", "a.MOV", "sub dir/c.webm"):
        (folder / name).write_bytes(b"")
    (folder / "b.txt").write_text("  caption of b\n", encoding="utf-8")
    (folder / "readme.md").write_text("not a video")
    rows = read_manifest(folder)
    assert [(row.row, row.key, row.caption) for row in rows] == [
        (0, "a", ""),
        (1, "b", "caption of b"),
        (2, "sub_dir_c", ""),
    ]
    assert all(row.item_id == row.key for row in rows)
    assert rows[2].video == str((folder / "sub dir" / "c.webm").resolve())


@pytest.mark.parametrize("names", [("a.mp4", "a.webm"), ("a b.mp4", "a_b.mp4")])
def test_video_folder_refuses_two_videos_with_one_key(tmp_path, names):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ManifestError, match=r"both give the key 'a(_b)?'") as error:
        read_manifest(tmp_path)
    assert all(name in str(error.value) for name in names)


def test_partition_is_a_disjoint_cover(tmp_path):
    records = [{"video": f"{i}.mp4", "caption": str(i)} for i in range(11)]
    rows = read_manifest(write_csv(tmp_path / "m.csv", records))
    for num_parts in (1, 2, 3, 4, 11, 12):
        parts = [partition(rows, part, num_parts) for part in range(num_parts)]
        flat = [row.row for part in parts for row in part]
        assert sorted(flat) == list(range(11)) and len(flat) == len(set(flat))
        for part in parts:
            assert [row.row for row in part] == sorted(row.row for row in part)
        # The same rows land in the same part on every call (a job array relies on it).
        assert parts == [partition(rows, part, num_parts) for part in range(num_parts)]
    for part, num_parts in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="outside"):
            partition(rows, part, num_parts)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("video,text\na.mp4,hello\n", "missing required column(s) caption"),
        ("video,caption\na.mp4,a\n,b\n", "row 1 has an empty 'video' value"),
        ("video,caption,fps\na.mp4,a,8\n", "fps clash"),
    ],
)
def test_cli_reports_a_malformed_manifest_and_builds_nothing(tmp_path, capsys, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content, encoding="utf-8")
    (tmp_path / "a.mp4").write_bytes(b"")
    out = tmp_path / "out"
    code = vidrec_main(
        ["shards", "build", "--manifest", str(manifest), "--out", str(out), "--no-progress"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("vidrec shards build: ") and message in error and str(manifest) in error
    assert not out.exists()
