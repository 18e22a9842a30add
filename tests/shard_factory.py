"""Writes small WebDataset shards whose pixels say which sample and frame they are.

Every clip is ``num_frames`` flat grey frames of 40×56. The top half of frame ``k`` has grey
level ``frame_level(k)``, the bottom half ``sample_level(i)`` for the sample's global index
``i``, so a test can read back which frames of which sample a batch holds, through H.264.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from data_shards.video import encode_clip

HEIGHT, WIDTH = 40, 56
FRAME_STEP, SAMPLE_STEP, SAMPLE_CODES = 18, 9, 22


def frame_level(frame_index: int) -> int:
    return 16 + FRAME_STEP * frame_index


def sample_level(sample_index: int) -> int:
    return 16 + SAMPLE_STEP * (sample_index % SAMPLE_CODES)


def read_frame_index(level: float) -> int:
    """Inverse of ``frame_level``; H.264 moves flat greys by a few levels at most."""
    return int(round((level - 16) / FRAME_STEP))


def read_sample_code(level: float) -> int:
    return int(round((level - 16) / SAMPLE_STEP))


def sample_key(sample_index: int) -> str:
    return f"s{sample_index:06d}"


def key_index(key: str) -> int:
    return int(key[1:])


def synthetic_clip(sample_index: int, num_frames: int = 12) -> np.ndarray:
    """(T, 40, 56, 3) uint8 frames coding frame index (top) and sample index (bottom)."""
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for k in range(num_frames):
        frames[k, : HEIGHT // 2] = frame_level(k)
        frames[k, HEIGHT // 2 :] = sample_level(sample_index)
    return frames


@dataclass
class WrittenShards:
    directory: Path
    paths: list[Path]
    keys: list[str]
    """Keys of the readable samples, in write order."""
    corrupt_keys: list[str] = field(default_factory=list)
    """Keys written with something the reader must skip (bad mp4, bad json, no mp4)."""


def write_shards(
    directory: str | Path,
    num_shards: int,
    samples_per_shard: int,
    *,
    num_frames: int = 12,
    fps: float = 8.0,
    corrupt_every: int = 0,
    start_index: int = 0,
) -> WrittenShards:
    """Write ``num_shards`` tars ``00000.tar``… and an ``index.json`` into ``directory``.

    With ``corrupt_every=k`` every k-th sample (index % k == k-1) is broken, cycling through
    random bytes as mp4, unparsable json and a missing mp4. Captions include unicode and empty
    strings.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    captions = ["a cat on a mat", "", "un café à Zürich ☕", "日本語のキャプション"]
    paths, keys, corrupt_keys = [], [], []
    index = start_index
    broken_kinds = 0
    for shard in range(num_shards):
        path = directory / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(samples_per_shard):
                key = sample_key(index)
                caption = f"{captions[index % len(captions)]} #{index}"
                if index % 4 == 1:
                    caption = ""
                meta = {
                    "key": key,
                    "item_id": f"item{index}",
                    "source": "synthetic",
                    "caption": caption,
                    "clip_start": 0.0,
                    "clip_end": num_frames / fps,
                    "fps": fps,
                    "width": WIDTH,
                    "height": HEIGHT,
                    "num_frames": num_frames,
                    "sample_index": index,
                }
                sample = {
                    "__key__": key,
                    "mp4": encode_clip(synthetic_clip(index, num_frames), fps),
                    "txt": caption,
                    "json": json.dumps(meta, ensure_ascii=False),
                }
                if corrupt_every and index % corrupt_every == corrupt_every - 1:
                    kind = broken_kinds % 3
                    broken_kinds += 1
                    if kind == 0:
                        sample["mp4"] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
                    elif kind == 1:
                        sample["json"] = b"{not json"
                    else:
                        del sample["mp4"]
                    corrupt_keys.append(key)
                else:
                    keys.append(key)
                sink.write(sample)
                index += 1
        paths.append(path)
    # The layout data_shards.build writes (only the fields the reader looks at).
    index_file = {
        "format": "vidrec-shards/1",
        "shards": [{"name": p.name, "samples": samples_per_shard} for p in paths],
        "total_samples": num_shards * samples_per_shard,
    }
    (directory / "index.json").write_text(json.dumps(index_file))
    return WrittenShards(directory, paths, keys, corrupt_keys)
