"""Shard builder end to end: every input is written here with PyAV, built, and read back.

Frames are flat grey (or carry a marker) so that what a clip shows can be checked after two
H.264 round trips: a frame's grey level encodes which source frame it came from.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from data_shards.build import BuildConfig, build_shards, merge_index
from data_shards.video import decode_clip, write_video
from vidrec_cli import main as vidrec_main

HEIGHT, WIDTH = 48, 64
# Output of a 48×64 source at short_side=32: (height, width).
OUT_WIDE, OUT_TALL = (32, 42), (42, 32)
LEVEL_BASE, LEVEL_STEP = 8, 10
"""Frame ``i`` of a coded source is flat grey ``LEVEL_BASE + LEVEL_STEP * i``."""


def level(index: int) -> int:
    return LEVEL_BASE + LEVEL_STEP * index


def frame_index(clip_frame: np.ndarray) -> int:
    """Which coded source frame a decoded (H, W, 3) frame shows."""
    return int(round((float(clip_frame.mean()) - LEVEL_BASE) / LEVEL_STEP))


def coded_frames(count: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    assert level(count - 1) <= 255, "too many frames to code in 8 bits"
    frames = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i] = level(i)
    return frames


def make_video(path: Path, count: int = 16, fps: float = 8.0, **kwargs) -> Path:
    """A coded source of ``count`` frames (2 s at the defaults)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(str(path), coded_frames(count), fps, **kwargs)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(name for row in rows for name in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )
    return path


def small_config(**overrides) -> BuildConfig:
    settings = dict(clip_seconds=2.0, fps=4.0, short_side=32, workers=1)
    settings.update(overrides)
    return BuildConfig(**settings)


def read_tar(path: Path) -> list[dict]:
    """Samples of one shard in tar order: ``{"__key__", "mp4", "txt", "json"}``."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            sample = samples.setdefault(key, {"__key__": key})
            if extension == "json":
                sample["json"] = json.loads(data.decode("utf-8"))
            elif extension == "txt":
                sample["txt"] = data.decode("utf-8")
            else:
                sample[extension] = data
    for sample in samples.values():
        assert set(sample) == {"__key__", "mp4", "txt", "json"}, sample.keys()
    return list(samples.values())


def check_index(out_dir: Path, index_name: str = "index.json") -> tuple[dict, list[dict]]:
    """Check an index against the tars it lists; return it and every sample, in index order."""
    index = json.loads((out_dir / index_name).read_text())
    samples = []
    for shard in index["shards"]:
        path = out_dir / shard["name"]
        assert path.stat().st_size == shard["bytes"], shard
        shard_samples = read_tar(path)
        assert len(shard_samples) == shard["samples"] > 0, shard
        seconds = sum(s["json"]["clip_end"] - s["json"]["clip_start"] for s in shard_samples)
        assert seconds == pytest.approx(shard["clip_seconds"], abs=1e-3)
        samples.extend(shard_samples)
    assert index["total_shards"] == len(index["shards"])
    assert index["total_samples"] == len(samples)
    seconds = sum(s["json"]["clip_end"] - s["json"]["clip_start"] for s in samples)
    assert index["total_clip_seconds"] == pytest.approx(seconds, abs=1e-3)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys), "duplicate sample keys"
    on_disk = {p.name for p in out_dir.glob("*.tar")}
    listed = {shard["name"] for shard in index["shards"]}
    if index_name == "index.json":
        assert on_disk == listed
    else:
        assert listed <= on_disk
    assert not list(out_dir.rglob("*.partial"))
    # (.build/ may keep the temp file of a record write that a kill -9 interrupted: harmless.)
    assert not list(out_dir.glob("*.tmp"))
    return index, samples


def failures(out_dir: Path, name: str = "failures.jsonl") -> list[dict]:
    text = (out_dir / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.tar"))}


def index_without_timing(path: Path) -> dict:
    index = json.loads(path.read_text())
    index.pop("build_seconds")
    return index


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Coded sources shared by the tests of this module (written once, never modified)."""
    root = tmp_path_factory.mktemp("sources")
    make_video(root / "h264.mp4")
    make_video(root / "vp9.webm", codec="libvpx-vp9")
    make_video(root / "av1.mp4", codec="libsvtav1")
    make_video(root / "long.mp4", count=24, fps=4.0)  # 6 s
    # Noise, unlike flat frames, exercises the encoder's rate control (determinism tests).
    noise = np.random.default_rng(0).integers(0, 256, (16, 96, 128, 3), dtype=np.uint8)
    write_video(str(root / "noise.mp4"), noise, 8.0)
    return root


# --- codecs, geometry, timing ------------------------------------------------------------------


def test_h264_vp9_av1_sources_build_to_configured_clips(tmp_path, sources):
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"video": str(sources / "h264.mp4"), "caption": "h264"},
            {"video": str(sources / "vp9.webm"), "caption": "vp9"},
            {"video": str(sources / "av1.mp4"), "caption": "av1"},
        ],
    )
    result = build_shards(manifest, tmp_path / "out", small_config(), progress=False)
    assert (result.samples, result.failed) == (3, 0)
    _, samples = check_index(tmp_path / "out")
    codecs = {}
    for sample in samples:
        meta = sample["json"]
        clip = decode_clip(sample["mp4"])
        # 2 s at 4 fps, short side 32.
        assert clip.shape == (8, *OUT_WIDE, 3)
        assert (meta["num_frames"], meta["height"], meta["width"]) == (8, *OUT_WIDE)
        assert meta["fps"] == 4.0
        assert (meta["clip_start"], meta["clip_end"]) == (0.0, 2.0)
        with av.open(io.BytesIO(sample["mp4"])) as container:
            assert container.streams.video[0].codec_context.name == "h264"
        # 8 source frames per second sampled at 4: every second source frame.
        assert [frame_index(f) for f in clip] == list(range(0, 16, 2))
        codecs[sample["txt"]] = meta["source_codec"]
    assert codecs["h264"] == "h264"
    assert codecs["vp9"].startswith(("vp9", "libvpx-vp9"))
    assert "av1" in codecs["av1"] or "dav1d" in codecs["av1"]


def _marker_frames(count: int = 8) -> np.ndarray:
    frames = np.zeros((count, HEIGHT, WIDTH, 3), np.uint8)
    frames[:, :16, :16] = 255  # top-left corner of the stored (unrotated) picture
    return frames


def _brightest_quadrant(frame: np.ndarray) -> str:
    height, width = frame.shape[:2]
    quadrants = {
        "top-left": frame[: height // 2, : width // 2],
        "top-right": frame[: height // 2, width // 2 :],
        "bottom-left": frame[height // 2 :, : width // 2],
        "bottom-right": frame[height // 2 :, width // 2 :],
    }
    means = {name: float(part.mean()) for name, part in quadrants.items()}
    brightest = max(means, key=means.get)
    assert means[brightest] > 40 and sorted(means.values())[-2] < 10, means
    return brightest


def test_display_rotation_is_applied(tmp_path):
    # Counter-clockwise display rotation carries the stored top-left corner to:
    expected = {90: "bottom-left", 180: "bottom-right", 270: "top-right"}
    rows = []
    for rotation in expected:
        path = tmp_path / f"rot{rotation}.mp4"
        write_video(str(path), _marker_frames(), 8.0, rotation=rotation)
        rows.append({"video": str(path), "caption": str(rotation)})
    result = build_shards(write_csv(tmp_path / "m.csv", rows), tmp_path / "out", small_config())
    assert result.failed == 0
    _, samples = check_index(tmp_path / "out")
    assert len(samples) == 3
    for sample in samples:
        rotation = int(sample["txt"])
        meta = sample["json"]
        assert meta["source_rotation"] == rotation
        clip = decode_clip(sample["mp4"])
        shape = OUT_TALL if rotation in (90, 270) else OUT_WIDE
        assert clip.shape[1:3] == shape
        assert (meta["height"], meta["width"]) == shape
        assert _brightest_quadrant(clip[0]) == expected[rotation], rotation


def test_variable_frame_rate_is_resampled_by_presentation_time(tmp_path):
    # Irregular gaps, none on the 0.1 s output grid, so each pick is unambiguous.
    times = [0.0, 0.04, 0.33, 0.37, 0.42, 0.88, 1.03, 1.47, 1.52, 1.93, 2.21, 2.26]
    source = make_video(tmp_path / "vfr.mp4", count=len(times), frame_times=times)
    manifest = write_csv(tmp_path / "m.csv", [{"video": str(source), "caption": "vfr"}])
    fps = 10.0
    build_shards(manifest, tmp_path / "out", small_config(clip_seconds=4.0, fps=fps))
    _, [sample] = check_index(tmp_path / "out")
    meta = sample["json"]
    clip = decode_clip(sample["mp4"])
    span = meta["clip_end"] - meta["clip_start"]
    assert meta["clip_start"] == 0.0 and span > 1.0
    assert len(clip) == meta["num_frames"] == int(span * fps + 1e-6)
    # Output frame k shows the latest source frame presented at or before k / fps.
    expected = [max(i for i, t in enumerate(times) if t <= k / fps) for k in range(len(clip))]
    assert [frame_index(frame) for frame in clip] == expected
    assert len(set(expected)) < len(expected) and max(np.diff(expected)) > 1  # repeats and skips
    assert meta["clip_end"] >= times[-1], "the window should cover the whole source"


def test_audio_is_dropped_by_default_and_kept_on_request(tmp_path):
    source = make_video(tmp_path / "tone.mp4", audio_tone_hz=440.0)
    with av.open(str(source)) as container:
        assert container.streams.audio, "fixture has no audio track"
    manifest = write_csv(tmp_path / "m.csv", [{"video": str(source), "caption": "tone"}])
    for keep_audio, audio_streams in ((False, 0), (True, 1)):
        out = tmp_path / f"out-{keep_audio}"
        result = build_shards(manifest, out, small_config(keep_audio=keep_audio))
        assert result.failed == 0, failures(out)
        _, [sample] = check_index(out)
        with av.open(io.BytesIO(sample["mp4"])) as container:
            assert len(container.streams.audio) == audio_streams
            assert len(container.streams.video) == 1
            if audio_streams:
                assert sum(frame.samples for frame in container.decode(audio=0)) > 0
        assert decode_clip(sample["mp4"]).shape == (8, *OUT_WIDE, 3)


def test_one_frame_source_gives_one_clip(tmp_path):
    source = make_video(tmp_path / "one.mp4", count=1)
    manifest = write_csv(tmp_path / "m.csv", [{"video": str(source), "caption": "one"}])
    result = build_shards(manifest, tmp_path / "out", small_config())
    assert (result.samples, result.failed) == (1, 0)
    _, [sample] = check_index(tmp_path / "out")
    clip = decode_clip(sample["mp4"])
    assert len(clip) == sample["json"]["num_frames"] >= 1
    assert frame_index(clip[0]) == 0


def test_clips_per_video_gives_spread_non_overlapping_windows(tmp_path, sources):
    manifest = write_csv(
        tmp_path / "m.csv", [{"video": str(sources / "long.mp4"), "caption": "six seconds"}]
    )
    config = small_config(clip_seconds=1.0, clips_per_video=3, samples_per_shard=3)
    result = build_shards(manifest, tmp_path / "out", config)
    assert result.samples == 3
    _, samples = check_index(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["000000000_000", "000000000_001", "000000000_002"]
    metas = [s["json"] for s in samples]
    assert [m["clip_index"] for m in metas] == [0, 1, 2]
    windows = [(m["clip_start"], m["clip_end"]) for m in metas]
    for (_, end), (next_start, _) in zip(windows[:-1], windows[1:], strict=True):
        assert end <= next_start
    assert all(end - start == pytest.approx(1.0) for start, end in windows)
    assert windows[0][0] >= 0.0 and windows[-1][1] <= 6.0
    assert windows[-1][0] - windows[0][0] >= 3.0, "windows should spread over the source"
    for sample, (start, _) in zip(samples, windows, strict=True):
        clip = decode_clip(sample["mp4"])
        # The long source runs at 4 fps like the clips: its frame at `start` is start * 4.
        first = int(round(start * 4))
        assert [frame_index(frame) for frame in clip] == [first, first + 1, first + 2, first + 3]
        assert sample["txt"] == "six seconds"


# --- broken inputs -----------------------------------------------------------------------------


def _broken_inputs(root: Path, sources: Path) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.mp4").write_bytes(b"")
    whole = (sources / "long.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (root / "noise.mp4").write_bytes(noise)
    return [
        {"video": str(root / "empty.mp4"), "caption": "empty"},
        {"video": str(root / "truncated.mp4"), "caption": "truncated"},
        {"video": str(root / "noise.mp4"), "caption": "noise"},
        {"video": str(root / "missing.mp4"), "caption": "missing"},
    ]


def test_broken_inputs_are_recorded_and_the_rest_is_built(tmp_path, sources, capsys):
    rows = [{"video": str(sources / "h264.mp4"), "caption": "good"}]
    rows += _broken_inputs(tmp_path / "bad", sources)
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    code = vidrec_main(
        ["shards", "build", "--manifest", str(manifest), "--out", str(out), "--no-progress"]
        + ["--clip-seconds", "2", "--fps", "4", "--short-side", "32", "--workers", "1"]
    )
    assert code == 0
    _, samples = check_index(out)
    records = {record["row"]: record for record in failures(out)}
    for record in records.values():
        assert set(record) >= {"row", "key", "video", "reason"} and record["reason"]
        assert record["video"] == rows[record["row"]]["video"]
        assert record["key"] == f"{record['row']:09d}"
    assert "zero-length" in records[1]["reason"]
    assert {3, 4} <= set(records) and "not found" in records[4]["reason"]
    built_rows = {s["json"]["row"] for s in samples}
    assert 0 in built_rows
    # The truncated file is either built from the frames before the cut, or recorded.
    assert (2 in built_rows) != (2 in records)
    for sample in samples:
        assert len(decode_clip(sample["mp4"])) == sample["json"]["num_frames"] >= 1
    assert built_rows | set(records) == set(range(len(rows)))
    index = json.loads((out / "index.json").read_text())
    assert index["failed_inputs"] == len(records) and index["inputs"] == len(rows)
    printed = capsys.readouterr().out
    assert f"({len(records)} failed" in printed and "failures" in printed


def test_build_fails_when_every_input_fails(tmp_path, sources, capsys):
    manifest = write_csv(tmp_path / "m.csv", _broken_inputs(tmp_path / "bad", sources)[2:])
    out = tmp_path / "out"
    code = vidrec_main(
        ["shards", "build", "--manifest", str(manifest), "--out", str(out), "--no-progress"]
        + ["--short-side", "32", "--workers", "1"]
    )
    assert code != 0
    assert len(failures(out)) == 2
    assert json.loads((out / "index.json").read_text())["total_samples"] == 0
    assert "(2 failed" in capsys.readouterr().out


# --- text and metadata -------------------------------------------------------------------------


def test_captions_and_metadata_round_trip(tmp_path, sources):
    unicode_caption = 'Ünïcödé «字幕» 🎬, commas, "quotes"\nand a second line'
    video = tmp_path / "videos" / "h264.mp4"
    video.parent.mkdir()
    video.write_bytes((sources / "h264.mp4").read_bytes())
    rows = [
        {
            "video": str(video),
            "caption": unicode_caption,
            "key": "clip-a",
            "item_id": "item 7",
            "title": "Título",
            "tags": ["cats", "猫"],
            "lang": "mixed",
            "score": 0.5,
        },
        # A relative path: it resolves against the manifest's folder.
        {"video": "videos/h264.mp4", "caption": "", "tags": "a, b", "lang": "none", "score": 1},
    ]
    build_shards(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out", small_config())
    _, samples = check_index(tmp_path / "out")
    first, second = (s for s in sorted(samples, key=lambda s: s["__key__"]))
    assert first["__key__"] == "000000000_000" and second["__key__"] == "000000001_000"
    assert first["txt"] == unicode_caption and first["json"]["caption"] == unicode_caption
    assert second["txt"] == "" and second["json"]["caption"] == ""
    assert first["json"]["key"] == first["json"]["source_key"] == "clip-a"
    assert first["json"]["item_id"] == "item 7"
    assert first["json"]["title"] == "Título"
    assert first["json"]["tags"] == ["cats", "猫"] and second["json"]["tags"] == ["a", "b"]
    assert second["json"]["key"] == second["json"]["item_id"] == "000000001"
    for sample, row in zip((first, second), rows, strict=True):
        meta = sample["json"]
        assert meta["source"] == str(video.resolve())
        assert (meta["lang"], meta["score"]) == (row["lang"], row["score"])
        assert (meta["clip_start"], meta["clip_end"]) == (0.0, 2.0)
        assert (meta["fps"], meta["height"], meta["width"], meta["num_frames"]) == (
            4.0,
            *OUT_WIDE,
            8,
        )
        assert meta["source_duration"] == pytest.approx(2.0)
        assert meta["source_fps"] == pytest.approx(8.0)
    # The same shards through webdataset's own reader.
    dataset = wds.WebDataset(
        [str(p) for p in sorted((tmp_path / "out").glob("*.tar"))], shardshuffle=False
    )
    read_back = {s["__key__"]: s for s in dataset}
    assert read_back["000000000_000"]["txt"].decode("utf-8") == unicode_caption
    assert read_back["000000001_000"]["txt"] == b""


# --- shard layout ------------------------------------------------------------------------------


def test_shards_are_cut_by_sample_count_and_by_bytes(tmp_path, sources):
    rows = [{"video": str(sources / "h264.mp4"), "caption": f"copy {i}"} for i in range(6)]
    manifest = write_csv(tmp_path / "m.csv", rows)

    result = build_shards(manifest, tmp_path / "count", small_config(samples_per_shard=2))
    index, _ = check_index(tmp_path / "count")
    assert result.shards == 3 and [s["samples"] for s in index["shards"]] == [2, 2, 2]

    unlimited = build_shards(manifest, tmp_path / "one", small_config(samples_per_shard=6))
    assert unlimited.shards == 1

    build_shards(manifest, tmp_path / "tiny", small_config(samples_per_shard=6, max_shard_bytes=1))
    index, _ = check_index(tmp_path / "tiny")
    assert [s["samples"] for s in index["shards"]] == [1] * 6

    sample_size = len(read_tar(tmp_path / "one" / "shard-0000-000000-00.tar")[0]["mp4"])
    limit = int(sample_size * 2.5)
    config = small_config(samples_per_shard=6, max_shard_bytes=limit)
    bytes_result = build_shards(manifest, tmp_path / "bytes", config)
    index, samples = check_index(tmp_path / "bytes")
    assert 1 < bytes_result.shards < 6 and index["total_samples"] == 6
    for shard in index["shards"]:
        sizes: dict[str, int] = {}
        with tarfile.open(tmp_path / "bytes" / shard["name"]) as tar:
            for member in tar.getmembers():
                key = member.name.split(".", 1)[0]
                sizes[key] = sizes.get(key, 0) + member.size
        # A shard is closed as soon as its samples reach the limit, not before.
        assert sum(list(sizes.values())[:-1]) < limit
    # Same samples, whatever the layout.
    keys = [s["__key__"] for s in check_index(tmp_path / "one")[1]]
    assert [s["__key__"] for s in samples] == keys


def test_two_workers_write_the_same_bytes_as_one(tmp_path, sources):
    rows = [
        {"video": str(sources / "h264.mp4"), "caption": "a"},
        {"video": str(sources / "vp9.webm"), "caption": "b"},
        {"video": str(tmp_path / "missing.mp4"), "caption": "c"},
        {"video": str(sources / "long.mp4"), "caption": "d"},
        {"video": str(sources / "av1.mp4"), "caption": "e"},
        {"video": str(sources / "noise.mp4"), "caption": "f"},
    ]
    manifest = write_csv(tmp_path / "m.csv", rows)
    for workers in (1, 2):
        build_shards(
            manifest,
            tmp_path / f"w{workers}",
            small_config(short_side=64, samples_per_shard=2, workers=workers),
        )
    serial, parallel = shard_bytes(tmp_path / "w1"), shard_bytes(tmp_path / "w2")
    assert len(serial) == 3 and serial == parallel
    assert index_without_timing(tmp_path / "w1" / "index.json") == index_without_timing(
        tmp_path / "w2" / "index.json"
    )
    assert failures(tmp_path / "w1") == failures(tmp_path / "w2") != []


# --- partitions --------------------------------------------------------------------------------


def test_partitions_merge_into_the_unpartitioned_build(tmp_path, sources, capsys):
    rows = [{"video": str(sources / "h264.mp4"), "caption": f"row {i}"} for i in range(5)]
    rows[3]["video"] = str(tmp_path / "missing.mp4")
    manifest = write_csv(tmp_path / "m.csv", rows)

    build_shards(manifest, tmp_path / "whole", small_config(samples_per_shard=2))
    _, whole = check_index(tmp_path / "whole")

    parts = tmp_path / "parts"
    listed = []
    for part in (0, 1):
        build_shards(manifest, parts, small_config(samples_per_shard=2, part=part, num_parts=2))
        index, _ = check_index(parts, f"index.part-{part:04d}-of-0002.json")
        listed.append({shard["name"] for shard in index["shards"]})
    assert listed[0] and listed[1] and not listed[0] & listed[1]
    assert not (parts / "index.json").exists()

    assert vidrec_main(["shards", "merge-index", str(parts)]) == 0
    assert "4 samples" in capsys.readouterr().out
    index, merged = check_index(parts)
    assert index["parts"] == [0, 1] and index["inputs"] == 5 and index["failed_inputs"] == 1
    assert [record["row"] for record in failures(parts)] == [3]
    # Same samples, same bytes: a sample's content does not depend on the partitioning.
    by_key = {s["__key__"]: s for s in merged}
    assert sorted(by_key) == sorted(s["__key__"] for s in whole)
    for sample in whole:
        assert by_key[sample["__key__"]]["mp4"] == sample["mp4"]
        assert by_key[sample["__key__"]]["json"] == sample["json"]


def test_merge_refuses_a_missing_part(tmp_path, sources, capsys):
    rows = [{"video": str(sources / "h264.mp4"), "caption": f"row {i}"} for i in range(3)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    build_shards(manifest, out, small_config(part=1, num_parts=3))
    with pytest.raises(ValueError, match=r"parts \[0, 2\] of 3"):
        merge_index(out)
    assert vidrec_main(["shards", "merge-index", str(out)]) == 2
    assert "parts [0, 2] of 3" in capsys.readouterr().err
    assert not (out / "index.json").exists()
    assert vidrec_main(["shards", "merge-index", str(tmp_path)]) == 2


# --- resuming ----------------------------------------------------------------------------------


def test_rerun_reuses_every_shard_and_refuses_other_settings(tmp_path, sources, capsys):
    rows = [{"video": str(sources / "h264.mp4"), "caption": f"row {i}"} for i in range(4)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    first = build_shards(manifest, out, small_config(samples_per_shard=2))
    before = shard_bytes(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    again = build_shards(manifest, out, small_config(samples_per_shard=2))
    assert again.skipped_chunks == again.shards == first.shards == 2
    assert again.samples == first.samples == 4
    assert shard_bytes(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps
    check_index(out)

    with pytest.raises(ValueError, match="fps"):
        build_shards(manifest, out, small_config(samples_per_shard=2, fps=6.0))
    code = vidrec_main(
        ["shards", "build", "--manifest", str(manifest), "--out", str(out), "--no-progress"]
        + ["--clip-seconds", "2", "--fps", "4", "--short-side", "48", "--samples-per-shard", "2"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "short_side" in error and "fps" not in error
    assert shard_bytes(out) == before


def test_rerun_rebuilds_a_deleted_shard(tmp_path, sources):
    rows = [{"video": str(sources / "h264.mp4"), "caption": f"row {i}"} for i in range(4)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    build_shards(manifest, out, small_config(samples_per_shard=2))
    before = shard_bytes(out)
    deleted = sorted(out.glob("*.tar"))[1]
    deleted.unlink()
    again = build_shards(manifest, out, small_config(samples_per_shard=2))
    assert again.skipped_chunks == 1
    assert shard_bytes(out) == before


def test_manifest_is_known_by_content_not_path(tmp_path, sources):
    rows = [{"video": str(sources / "h264.mp4"), "caption": f"row {i}"} for i in range(4)]
    out = tmp_path / "out"
    for name in "abc":
        (tmp_path / name).mkdir()
    # Parts built from copies of one manifest at different paths share an output directory.
    build_shards(write_csv(tmp_path / "a" / "m.csv", rows), out, small_config(part=0, num_parts=2))
    build_shards(write_csv(tmp_path / "b" / "m.csv", rows), out, small_config(part=1, num_parts=2))
    rows[2]["caption"] = "edited"
    with pytest.raises(ValueError, match="manifest_sha256"):
        build_shards(write_csv(tmp_path / "c" / "m.csv", rows), out, small_config(num_parts=2))


def _build_command(manifest: Path, out: Path) -> list[str]:
    script = Path(sys.executable).with_name("vidrec")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vidrec_cli"]
    return command + [
        "shards",
        "build",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--clip-seconds",
        "2",
        "--fps",
        "25",
        "--short-side",
        "64",
        "--samples-per-shard",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]


def test_kill_9_then_rerun_gives_the_uninterrupted_shards(tmp_path):
    # Noise takes a while to encode, so the build runs for a few seconds.
    noise = np.random.default_rng(1).integers(0, 256, (50, 96, 128, 3), dtype=np.uint8)
    rows = []
    for i in range(4):
        path = tmp_path / f"noise{i}.mp4"
        write_video(str(path), np.roll(noise, i, axis=0), 25.0)
        rows += [{"video": str(path), "caption": f"{i}-{j}"} for j in range(6)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    chunks = len(rows) // 2
    # Integer seconds and fps on purpose: the CLI passes floats, and the resumed build must
    # still write "fps": 25.0 into the JSON exactly as the killed one did.
    config = BuildConfig(clip_seconds=2, fps=25, short_side=64, samples_per_shard=2, workers=1)

    out = tmp_path / "killed"
    process = subprocess.Popen(
        _build_command(manifest, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if list((out / ".build").glob("chunk-*.json")):
                break
            time.sleep(0.005)
        assert process.poll() is None, "the build ended before it could be killed: " + (
            process.stderr.read().decode(errors="replace")
        )
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    recorded = len(list((out / ".build").glob("chunk-*.json")))
    assert 1 <= recorded < chunks
    assert not (out / "index.json").exists()

    resumed = build_shards(manifest, out, config, progress=False)
    assert resumed.skipped_chunks == recorded and resumed.samples == len(rows)
    build_shards(manifest, tmp_path / "reference", config, progress=False)

    reference = shard_bytes(tmp_path / "reference")
    assert len(reference) == chunks
    assert shard_bytes(out) == reference
    assert index_without_timing(out / "index.json") == index_without_timing(
        tmp_path / "reference" / "index.json"
    )
    check_index(out)


# --- other kinds of input ----------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A folder served on 127.0.0.1: ``(folder, base URL)``."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_source_builds(tmp_path, http_root):
    root, base_url = http_root
    make_video(root / "x.mp4")
    url = f"{base_url}/x.mp4"
    manifest = write_csv(
        tmp_path / "m.csv",
        [{"video": url, "caption": "served"}, {"video": f"{base_url}/absent.mp4", "caption": ""}],
    )
    result = build_shards(manifest, tmp_path / "out", small_config())
    assert (result.samples, result.failed) == (1, 1)
    _, [sample] = check_index(tmp_path / "out")
    assert sample["json"]["source"] == url
    clip = decode_clip(sample["mp4"])
    assert clip.shape == (8, *OUT_WIDE, 3)
    assert [frame_index(f) for f in clip] == list(range(0, 16, 2))
    [record] = failures(tmp_path / "out")
    assert record["row"] == 1 and record["video"] == f"{base_url}/absent.mp4" and record["reason"]


def test_video_folder_with_sidecar_captions(tmp_path, sources):
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.mp4").write_bytes((sources / "h264.mp4").read_bytes())
    (folder / "a.txt").write_text("  caption of a, ünïcode\n", encoding="utf-8")
    (folder / "sub" / "b c.webm").write_bytes((sources / "vp9.webm").read_bytes())
    (folder / "notes.md").write_text("not a video")
    code = vidrec_main(
        ["shards", "build", "--manifest", str(folder), "--out", str(tmp_path / "out")]
        + ["--clip-seconds", "2", "--fps", "4", "--short-side", "32", "--workers", "1"]
        + ["--no-progress"]
    )
    assert code == 0
    _, samples = check_index(tmp_path / "out")
    by_key = {s["json"]["key"]: s for s in samples}
    assert sorted(by_key) == ["a", "sub_b_c"]
    assert by_key["a"]["txt"] == "caption of a, ünïcode"
    assert by_key["sub_b_c"]["txt"] == ""
    assert by_key["a"]["json"]["source"] == str((folder / "a.mp4").resolve())
    assert by_key["sub_b_c"]["json"]["item_id"] == "sub_b_c"
    assert by_key["sub_b_c"]["json"]["source_codec"].startswith(("vp9", "libvpx"))
