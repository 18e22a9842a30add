"""Resume cost: how long the training reader takes to pass over samples consumed before a
checkpoint, against decoding them.

    python launch/bench_resume_skip.py [--skip 10000] [--rounds 3]

One process, no DataLoader workers (the skip runs in each worker alike). Shards of 16-frame
224×224 H.264 clips (about what ``data_shards.build`` writes for the T16@224 preset). Each of
``--rounds`` rounds times the first batch of a fresh pass, then the decode cost per sample over
that pass's next batches, then the first batch of a pass resumed ``--skip`` samples in. Printed,
each as the median [min–max] of the rounds (``bench_stats``): the two first batches, the skip
cost (resumed − fresh of the same round), in all and per skipped sample, the decode cost, and
the ratio of the two per sample, taken within each round. No target.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from data_shards.reader import ReaderConfig, build_loader
from data_shards.video import encode_clip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import ratio_spread, round_ratios, spread  # noqa: E402

BATCH = 8
DECODE_BATCHES = 5


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


def first_batch_seconds(batches) -> float:
    start = time.perf_counter()
    next(batches)
    return time.perf_counter() - start


def decode_seconds_per_sample(batches) -> float:
    """Per sample, over steady-state batches (after the first, which also fills the buffer)."""
    start = time.perf_counter()
    for _ in range(DECODE_BATCHES):
        next(batches)
    return (time.perf_counter() - start) / (DECODE_BATCHES * BATCH)


def measure_round(config: ReaderConfig, tokenizer, state: dict) -> dict[str, float]:
    """One round: seconds to the fresh first batch, decode per sample, resumed first batch."""
    fresh = iter(build_loader(config, tokenizer=tokenizer))
    figures = {"fresh": first_batch_seconds(fresh), "decode": decode_seconds_per_sample(fresh)}
    loader = build_loader(config, tokenizer=tokenizer)
    loader.load_state_dict(state)
    figures["resumed"] = first_batch_seconds(iter(loader))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sample_bytes = make_shards(Path(tmp))
        config = ReaderConfig(shards=tmp, num_frames=16, size=224, batch_size=BATCH,
                              num_workers=0, shuffle_buffer=1000, max_text_length=32)  # fmt: skip
        fresh_loader = build_loader(config)
        tokenizer = fresh_loader.tokenizer
        state = fresh_loader.state_dict()
        state["positions"] = [args.skip]
        rounds = [measure_round(config, tokenizer, state) for _ in range(args.rounds)]

    def values(name: str) -> list[float]:
        return [figures[name] for figures in rounds]

    # each round's resumed pass against its own fresh one
    skip_seconds = [figures["resumed"] - figures["fresh"] for figures in rounds]
    per_sample = [seconds / args.skip for seconds in skip_seconds]
    print(f"sample size: {sample_bytes / 1e3:.0f} kB (16 frames, 224x224 H.264)")
    print(f"figures: median [min–max] of {args.rounds} interleaved rounds")
    print(f"first batch, fresh pass: {spread(values('fresh'), 2)} s")
    print(f"first batch, resumed {args.skip:,} samples in: {spread(values('resumed'), 2)} s")
    skip_us = spread([1e6 * seconds for seconds in per_sample], 0, signed=True)
    print(f"skip cost: {spread(skip_seconds, 2, signed=True)} s = {skip_us} us per skipped sample")
    print(f"decode cost: {spread([1e3 * s for s in values('decode')], 1)} ms per sample")
    ratios = round_ratios(per_sample, values("decode"))
    print(f"skipping one sample costs {ratio_spread(ratios, 4)} x decoding it")


if __name__ == "__main__":
    main()
