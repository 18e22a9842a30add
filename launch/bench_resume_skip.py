"""Resume cost: how long the training reader takes to pass over samples consumed before a
checkpoint, against decoding them.

    python launch/bench_resume_skip.py [--skip 10000] [--repeats 3]

One process, no DataLoader workers (the skip runs in each worker alike). Shards of 16-frame
224×224 H.264 clips (about what ``data_shards.build`` writes for the T16@224 preset). Printed:
time to the first batch of a fresh pass and of a pass resumed ``--skip`` samples in (best of
``--repeats``), the difference per skipped sample, and that against the time to decode one
sample in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from data_shards.reader import ReaderConfig, build_loader
from data_shards.video import encode_clip

BATCH = 8


def make_shards(directory: Path, shards: int = 4, per_shard: int = 100) -> int:
    """Shards of smooth moving textures (16 frames, 224×224); returns the mean sample bytes."""
    rng = np.random.default_rng(0)
    clips = []
    for _ in range(8):
        coarse = rng.integers(0, 255, (80, 160, 3), dtype=np.uint8)
        texture = np.kron(coarse, np.ones((4, 4, 1), dtype=np.uint8))  # (320, 640, 3)
        frames = np.stack([texture[:224, 8 * t : 8 * t + 224] for t in range(16)])
        clips.append(encode_clip(frames, 8.0))
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                caption = f"a texture moving right, {key}"
                meta = json.dumps({"key": key, "caption": caption})
                sink.write({"__key__": key, "mp4": clips[i % len(clips)], "txt": caption,
                            "json": meta})  # fmt: skip
    return int(np.mean([len(clip) for clip in clips]))


def first_batch_seconds(loader) -> float:
    start = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sample_bytes = make_shards(Path(tmp))
        config = ReaderConfig(shards=tmp, num_frames=16, size=224, batch_size=BATCH,
                              num_workers=0, shuffle_buffer=1000, max_text_length=32)  # fmt: skip
        fresh_loader = build_loader(config)
        tokenizer = fresh_loader.tokenizer
        state = fresh_loader.state_dict()
        state["positions"] = [args.skip]
        fresh, resumed = [], []
        for _ in range(args.repeats):
            fresh.append(first_batch_seconds(build_loader(config, tokenizer=tokenizer)))
            loader = build_loader(config, tokenizer=tokenizer)
            loader.load_state_dict(state)
            resumed.append(first_batch_seconds(loader))
        # decoding: a steady-state batch of the fresh pass (the first also fills the buffer)
        batches = iter(build_loader(config, tokenizer=tokenizer))
        next(batches)
        start = time.perf_counter()
        for _ in range(5):
            next(batches)
        decode_per_sample = (time.perf_counter() - start) / (5 * BATCH)
    skip_cost = min(resumed) - min(fresh)
    per_sample = skip_cost / args.skip
    print(f"sample size: {sample_bytes / 1e3:.0f} kB (16 frames, 224x224 H.264)")
    print(f"first batch, fresh pass: {min(fresh):.2f} s")
    print(f"first batch, resumed {args.skip:,} samples in: {min(resumed):.2f} s")
    print(f"skip cost: {skip_cost:.2f} s = {per_sample * 1e6:.0f} us per skipped sample")
    print(f"decode cost: {decode_per_sample * 1e3:.1f} ms per sample")
    print(f"skipping one sample costs {per_sample / decode_per_sample:.4f} x decoding it")


if __name__ == "__main__":
    main()
