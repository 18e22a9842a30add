"""Shard builder: manifest rows → clips → WebDataset tar shards.

Sample schema (the layout video2dataset writes, so shards from either tool interchange):

    __key__   "{row:09d}_{clip:03d}"   numeric, unique across partitions, never from user input
    mp4       H.264 yuv420p clip, short GOP, resized (short side), resampled to ``fps``
    txt       caption, UTF-8
    json      {key, item_id, source, source_key, row, caption, title, tags, description,
               clip_index, clip_start, clip_end, fps, width, height, num_frames,
               source_duration, source_fps, source_codec, source_rotation, **extra columns}

Work is cut into chunks of ``inputs_per_shard`` consecutive rows of one partition. A chunk is
written to ``*.tar.partial`` files that are renamed when complete, then recorded in
``.build/chunk-PPPP-CCCCCC.json`` (atomically). A rerun skips recorded chunks and redoes the
rest, so a build killed at any point finishes with the same shards as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from data_shards import video as video_io
from data_shards.atomic import atomic_write_text, make_output_dir
from data_shards.manifest import ManifestRow, partition, read_manifest
from data_shards.shard_set import INDEX_FILE

log = logging.getLogger(__name__)

INDEX_FORMAT = "vidrec-shards/1"
# Fixed tar member mtime so that rebuilding the same input gives byte-identical shards.
TAR_MTIME = 0.0


@dataclass(frozen=True)
class BuildConfig:
    clip_seconds: float = 4.0
    """Longest clip cut from a source, in seconds."""
    clips_per_video: int = 1
    """Clips per source, spread evenly over it (fewer when the source is short)."""
    fps: float = 8.0
    """Frame rate of the written clips."""
    short_side: int = 224
    """Short side of the written clips in pixels (0 keeps the source size)."""
    crf: int = 23
    """x264 constant rate factor of the written clips."""
    samples_per_shard: int = 1000
    """Target samples per shard; a shard holds ``samples_per_shard // clips_per_video`` inputs."""
    max_shard_bytes: int = 0
    """Start a new shard file when this many bytes are written (0: no byte limit)."""
    keep_audio: bool = False
    """Mux the source's audio into the clips."""
    workers: int = 0
    """Decode/encode processes (0: one per CPU core)."""
    part: int = 0
    """Which partition of the manifest this build covers (see ``num_parts``)."""
    num_parts: int = 1
    """Partitions the manifest is split into (a job array builds one part per task)."""

    def __post_init__(self):
        # 25 and 25.0 pass the resume check as equal but would be written differently into
        # the sample JSON ("fps": 25 vs 25.0), so a resumed build could mix the two.
        for name in ("clip_seconds", "fps"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.clip_seconds <= 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if self.clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {self.clips_per_video}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if not 0 <= self.part < self.num_parts:
            raise ValueError(f"part {self.part} is outside 0..{self.num_parts - 1}")

    @property
    def inputs_per_shard(self) -> int:
        return max(1, self.samples_per_shard // self.clips_per_video)

    def settings(self) -> dict[str, Any]:
        """What decides the shards' content; a resumed build must match it."""
        fields = dataclasses.asdict(self)
        for runtime_only in ("workers", "part"):
            fields.pop(runtime_only)
        return fields


@dataclass
class BuildResult:
    index_path: Path
    samples: int
    shards: int
    inputs: int
    failed: int
    skipped_chunks: int


def parse_part(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``."""
    try:
        part, num_parts = (int(value) for value in text.split("/"))
    except ValueError as err:
        raise ValueError(f"--part expects i/n such as 0/8, got {text!r}") from err
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"--part {text}: need 0 <= i < n")
    return part, num_parts


def _index_name(config: BuildConfig) -> str:
    if config.num_parts == 1:
        return INDEX_FILE
    return f"index.part-{config.part:04d}-of-{config.num_parts:04d}.json"


def _failures_name(config: BuildConfig) -> str:
    if config.num_parts == 1:
        return "failures.jsonl"
    return f"failures.part-{config.part:04d}-of-{config.num_parts:04d}.jsonl"


def _process_row(job: tuple[ManifestRow, BuildConfig]) -> dict[str, Any]:
    """Worker: one manifest row → encoded clips, or a failure record."""
    row, config = job
    try:
        if not row.is_url:
            source = Path(row.video)
            if not source.is_file():
                raise video_io.VideoError("file not found")
            if source.stat().st_size == 0:
                raise video_io.VideoError("zero-length file")
        info, clips = video_io.read_clips(
            row.video,
            clip_seconds=config.clip_seconds,
            clips_per_video=config.clips_per_video,
            fps=config.fps,
            short_side=config.short_side or None,
            keep_audio=config.keep_audio,
        )
        samples = []
        for clip_index, clip in enumerate(clips):
            data = video_io.encode_clip(clip.frames, clip.fps, crf=config.crf, audio=clip.audio)
            num_frames, height, width = clip.frames.shape[:3]
            metadata = {
                "key": row.key,
                "item_id": row.item_id,
                "source": row.video,
                "source_key": row.key,
                "row": row.row,
                "caption": row.caption,
                "title": row.title,
                "tags": row.tags,
                "description": row.description,
                "clip_index": clip_index,
                "clip_start": round(clip.start, 4),
                "clip_end": round(clip.end, 4),
                "fps": clip.fps,
                "width": width,
                "height": height,
                "num_frames": num_frames,
                "source_duration": round(info.duration, 4),
                "source_fps": round(info.fps, 4),
                "source_codec": info.codec,
                "source_rotation": info.rotation,
                **row.extra,
            }
            samples.append(
                {
                    "__key__": f"{row.row:09d}_{clip_index:03d}",
                    "mp4": data,
                    "txt": row.caption,
                    "json": json.dumps(metadata, ensure_ascii=False, sort_keys=True),
                    "seconds": clip.end - clip.start,
                }
            )
        return {"row": row.row, "samples": samples}
    except Exception as err:  # noqa: BLE001 - every input failure is recorded, never fatal
        reason = f"{type(err).__name__}: {err}"
        return {
            "row": row.row,
            "failure": {"row": row.row, "key": row.key, "video": row.video, "reason": reason},
        }


class _ChunkWriter:
    """Writes one chunk's samples to ``.partial`` tar files, renamed when the chunk is done."""

    def __init__(self, out_dir: Path, config: BuildConfig, chunk: int):
        self.out_dir, self.config, self.chunk = out_dir, config, chunk
        self.shards: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None

    def _shard_name(self, sub: int) -> str:
        return f"shard-{self.config.part:04d}-{self.chunk:06d}-{sub:02d}.tar"

    def _open(self):
        name = self._shard_name(len(self.shards))
        self._writer = wds.TarWriter(
            str(self.out_dir / (name + ".partial")), mtime=TAR_MTIME, compress=False
        )
        self.shards.append({"name": name, "samples": 0, "bytes": 0, "clip_seconds": 0.0})

    def write(self, sample: dict[str, Any]):
        limit = self.config.max_shard_bytes
        if self._writer is None or (limit and self.shards[-1]["bytes"] >= limit):
            self._close_current()
            self._open()
        seconds = sample.pop("seconds")
        size = self._writer.write(sample)
        shard = self.shards[-1]
        shard["samples"] += 1
        shard["bytes"] += size
        shard["clip_seconds"] = round(shard["clip_seconds"] + seconds, 4)

    def _close_current(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> dict[str, Any]:
        self._close_current()
        for shard in self.shards:
            partial = self.out_dir / (shard["name"] + ".partial")
            shard["bytes"] = partial.stat().st_size
            os.replace(partial, self.out_dir / shard["name"])
        return {"chunk": self.chunk, "shards": self.shards, "failures": self.failures}


def _chunk_record_path(out_dir: Path, config: BuildConfig, chunk: int) -> Path:
    return out_dir / ".build" / f"chunk-{config.part:04d}-{chunk:06d}.json"


def _manifest_digest(manifest: Path) -> str:
    digest = hashlib.sha256()
    if manifest.is_dir():
        for row in read_manifest(manifest):
            digest.update(f"{row.key}\t{row.caption}\n".encode())
    else:
        with open(manifest, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _check_settings(out_dir: Path, config: BuildConfig, manifest: Path):
    settings_path = out_dir / ".build" / "settings.json"
    # The manifest is named by its content, not its path: parts built on machines that mount
    # it elsewhere share one output directory, and an edited manifest is refused.
    settings = {"manifest_sha256": _manifest_digest(manifest), **config.settings()}
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        changed = sorted(
            k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k)
        )
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} → {settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"{out_dir} holds a build with other settings ({details}); "
                "use a new output directory or delete this one"
            )
    else:
        atomic_write_text(settings_path, json.dumps(settings, indent=2, sort_keys=True))


def build_shards(
    manifest: str | Path,
    out_dir: str | Path,
    config: BuildConfig = BuildConfig(),
    *,
    progress: bool = True,
) -> BuildResult:
    """Build (or resume building) the shards of one partition of ``manifest`` into ``out_dir``."""
    manifest, out_dir = Path(manifest), Path(out_dir)
    rows = read_manifest(manifest)  # validates everything before any work
    part_rows = partition(rows, config.part, config.num_parts)
    (make_output_dir(out_dir) / ".build").mkdir(exist_ok=True)
    _check_settings(out_dir, config, manifest)
    for stale in out_dir.glob(f"shard-{config.part:04d}-*.tar.partial"):
        stale.unlink()

    size = config.inputs_per_shard
    chunks = [part_rows[start : start + size] for start in range(0, len(part_rows), size)]
    records: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    for chunk, _ in enumerate(chunks):
        record_path = _chunk_record_path(out_dir, config, chunk)
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if record and all((out_dir / shard["name"]).is_file() for shard in record["shards"]):
            records[chunk] = record
        else:
            pending.append(chunk)  # never built, or a shard of it was deleted since
    skipped = len(chunks) - len(pending)
    if skipped:
        log.info("resuming: %d of %d shards already complete", skipped, len(chunks))

    jobs = [(row, config) for chunk in pending for row in chunks[chunk]]
    workers = config.workers or os.cpu_count() or 1
    started = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="shards build", unit="video", disable=not progress)
    for chunk, results in _chunk_results(pending, chunks, jobs, workers):
        writer = _ChunkWriter(out_dir, config, chunk)
        for result in results:
            bar.update(1)
            if "failure" in result:
                writer.failures.append(result["failure"])
                log.warning("row %d failed: %s", result["row"], result["failure"]["reason"])
            for sample in result.get("samples", []):
                writer.write(sample)
        records[chunk] = writer.finish()
        atomic_write_text(
            _chunk_record_path(out_dir, config, chunk), json.dumps(records[chunk], sort_keys=True)
        )
    bar.close()
    return _write_index(out_dir, config, manifest, records, len(part_rows), skipped, started)


def _chunk_results(
    pending: list[int], chunks: list[list[ManifestRow]], jobs: list, workers: int
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Results grouped by chunk, in manifest order, from a pool of ``workers`` processes."""

    def grouped(results: Iterator[dict[str, Any]]):
        for chunk in pending:
            yield chunk, [next(results) for _ in chunks[chunk]]

    if workers <= 1 or len(jobs) <= 1:
        yield from grouped(map(_process_row, jobs))
        return
    # spawn, not fork: the caller may hold threads (a progress bar, MLflow) that fork would copy.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs))) as pool:
        yield from grouped(pool.imap(_process_row, jobs, chunksize=1))


def _write_index(out_dir, config, manifest, records, inputs, skipped, started) -> BuildResult:
    shards = [shard for chunk in sorted(records) for shard in records[chunk]["shards"]]
    failures = [failure for chunk in sorted(records) for failure in records[chunk]["failures"]]
    samples = sum(shard["samples"] for shard in shards)
    index = {
        "format": INDEX_FORMAT,
        "manifest": str(Path(manifest).resolve()),
        "settings": config.settings(),
        "parts": [config.part] if config.num_parts > 1 else [0],
        "shards": shards,
        "total_shards": len(shards),
        "total_samples": samples,
        "total_clip_seconds": round(sum(shard["clip_seconds"] for shard in shards), 3),
        "inputs": inputs,
        "failed_inputs": len(failures),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    index_path = out_dir / _index_name(config)
    atomic_write_text(index_path, json.dumps(index, indent=2))
    atomic_write_text(
        out_dir / _failures_name(config),
        "".join(json.dumps(failure, ensure_ascii=False) + "\n" for failure in failures),
    )
    return BuildResult(
        index_path=index_path,
        samples=samples,
        shards=len(shards),
        inputs=inputs,
        failed=len(failures),
        skipped_chunks=skipped,
    )


def merge_index(out_dir: str | Path) -> Path:
    """Join the ``index.part-*.json`` of a partitioned build into ``index.json``."""
    out_dir = Path(out_dir)
    part_files = sorted(out_dir.glob("index.part-*-of-*.json"))
    if not part_files:
        raise FileNotFoundError(f"{out_dir}: no index.part-*-of-*.json files to merge")
    parts = [json.loads(path.read_text()) for path in part_files]
    num_parts = parts[0]["settings"]["num_parts"]
    for path, part in zip(part_files, parts, strict=True):
        if part["settings"] != parts[0]["settings"]:
            raise ValueError(f"{path.name} was built with other settings than {part_files[0].name}")
    present = sorted(p for part in parts for p in part["parts"])
    missing = sorted(set(range(num_parts)) - set(present))
    if missing:
        raise ValueError(f"{out_dir}: parts {missing} of {num_parts} have no index yet")
    shards = sorted((s for part in parts for s in part["shards"]), key=lambda s: s["name"])
    index = {
        "format": INDEX_FORMAT,
        "manifest": parts[0]["manifest"],
        "settings": parts[0]["settings"],
        "parts": present,
        "shards": shards,
        "total_shards": len(shards),
        "total_samples": sum(s["samples"] for s in shards),
        "total_clip_seconds": round(sum(s["clip_seconds"] for s in shards), 3),
        "inputs": sum(part["inputs"] for part in parts),
        "failed_inputs": sum(part["failed_inputs"] for part in parts),
        "build_seconds": round(sum(part["build_seconds"] for part in parts), 3),
    }
    failure_lines = []
    for failure_file in sorted(out_dir.glob("failures.part-*-of-*.jsonl")):
        failure_lines.extend(failure_file.read_text(encoding="utf-8").splitlines(keepends=True))
    atomic_write_text(out_dir / "failures.jsonl", "".join(failure_lines))
    index_path = out_dir / INDEX_FILE
    atomic_write_text(index_path, json.dumps(index, indent=2))
    return index_path
