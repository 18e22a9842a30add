"""Loader benchmark: the streaming reader against the decode limit and a naive loader.

    python launch/bench_loader.py [--sources 8] [--seconds 8] [--batches 30] [--rounds 5]
        [--loop-seconds 10] [--sizes T16@224 T8@112] [--workdir DIR]

Every figure is measured once in each of ``--rounds`` rounds, interleaved (round 1 of every
figure at every size, then round 2, …), and printed as the median and the range [min–max] of
the rounds. A ratio is taken within each round (that round's reader ÷ that round's baseline)
and printed the same way, with a verdict against its target: met when the lowest round reaches
it, missed when the highest does not, otherwise inside the noise.

Lines, per size (T frames of S × S, from shards of short side S; sources of 640×480 at 24 fps,
shards of 4 s clips at 8 fps, 2 per source; one decode thread per process throughout):
- shard build: source seconds per wall second per worker process (2 workers), a fresh build
  into a scratch directory each round;
- decode limit, 1 process: a tight loop over the clip bytes of the shards doing the least a
  loader must do (decode every frame, convert the T uniformly picked ones to RGB at the shard's
  size), cycled for ``--loop-seconds`` after one warm-up clip;
- decode limit, 2 processes: the same loop in two processes that wait for each other after
  their warm-up and start together; all clips ÷ the longer of the two loops;
- naive loader, 1 process: for each clip of the shards, its source opened with PyAV, seeked to
  the keyframe at or before the clip's start, decoded forward (frames before the start dropped)
  no further than the clip's end, T frames picked uniformly in it and only those converted to
  RGB, the reader's random resized crop + flip (torch, uint8) to S × S; cycled for
  ``--loop-seconds`` after one warm-up clip;
- reader, 1 and 2 workers: ``data_shards.reader`` in train mode (resampled shards, shuffle
  buffer, segment sampling, crop boxes and flips, tokenization, batches of 8 clips), timed
  over ``--batches`` batches after each worker's first (start-up, first shuffle-buffer fill).
  The reader leaves the crop + resize to ``expand_crops`` (below): its lines do not include
  the resize that the naive loader's line does;
- CPU ms per clip (T16@224 only): the limit loop's in this process, and the reader's marginal
  CPU per clip (a pass of 20 batches minus one of 4) without workers and with one worker (the
  worker and the main process apart). A loaded machine stretches wall time, much less CPU
  time; the worker's excess over the no-worker reader is the hand-off to the main process;
- repeated sampling (T16@224 only): training
  samples/s of one reader worker with k = 1, 2, 4 training samples per decoded clip (batches of
  8·k samples, so 8 clips at every k; k = 1 is the reader 1 worker line). That reader hands
  over clips at the shard's size with k crop boxes each, and the crop + resize
  (``expand_crops``) runs where the batch goes, on the accelerator; its cost on this CPU per
  training sample is a line of its own, timed on the last batch of each k in the same run.
Targets: at T16@224, reader 1 worker ÷ decode limit 1 process ≥ 0.9 (by wall time, and by CPU
time as limit ÷ reader) and k = 2 ÷ k = 1 ≥ 1.8;
at both sizes, reader 1 worker ÷ naive loader ≥ 5.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from resource import RUSAGE_CHILDREN, RUSAGE_SELF
from typing import Any

import av
import numpy as np
import torch

from data_shards.augment import expand_crops, random_resized_crop
from data_shards.build import BuildConfig, build_shards
from data_shards.frames import uniform_frame_indices
from data_shards.reader import ReaderConfig, build_loader
from data_shards.shard_set import iter_samples, list_shards
from data_shards.text import load_tokenizer
from data_shards.video import decode_clip, write_video

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import ratio_spread, round_ratios, spread  # noqa: E402

SAMPLES_PER_CLIP = (1, 2, 4)
CLIPS_PER_BATCH = 8
START_TIMEOUT = 300
"""Seconds a decode-limit process may take to start and warm up before the run is given up."""
BUILD = {"clip_seconds": 4.0, "clips_per_video": 2, "fps": 8, "workers": 2}
"""The shard build every size uses; only the short side differs."""


@dataclass(frozen=True)
class Size:
    frames: int
    """T, frames per clip."""
    side: int
    """S: the reader's crop side and the shards' short side."""
    name: str
    targeted: bool
    """The targets on the decode limit and on repeated sampling are set at this size."""


SIZES = {
    "T16@224": Size(16, 224, "T16@224", targeted=True),
    "T8@112": Size(8, 112, "demo T8@112", targeted=False),
}


@dataclass(frozen=True)
class Clip:
    """One sample of the shards: its encoded bytes and the window of its source it was cut from."""

    mp4: bytes
    source: str
    start: float
    end: float


def make_sources(directory: Path, count: int, seconds: float, fps: int = 24) -> Path:
    """Camera pans over smooth random textures, 640×480: real motion for the encoder."""
    rng = np.random.default_rng(0)
    rows = []
    frame_count = int(seconds * fps)
    for index in range(count):
        coarse = rng.integers(0, 255, (60, 120, 3), dtype=np.uint8)
        texture = np.kron(coarse, np.ones((12, 12, 1), dtype=np.uint8))  # (720, 1440, 3)
        speed = 2 + index % 4
        columns = np.arange(640)
        frames = np.stack(
            [
                texture[40 : 40 + 480].take((columns + t * speed) % texture.shape[1], axis=1)
                for t in range(frame_count)
            ]
        )
        path = directory / f"source_{index:03d}.mp4"
        write_video(str(path), frames, fps)
        rows.append({"video": path.name, "caption": f"a camera pan over texture {index}"})
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def read_clips(shards: Path) -> list[Clip]:
    clips = []
    for sample in iter_samples(list_shards(shards), extensions={"mp4", "json"}):
        meta = json.loads(sample["json"])
        clips.append(Clip(sample["mp4"], meta["source"], meta["clip_start"], meta["clip_end"]))
    return clips


# ---------------------------------------------------------------------------------------------
# Figures: each call is one round of one line.


def build_rate(manifest: Path, workdir: Path, side: int, source_seconds: float) -> float:
    """Source seconds per wall second per worker of one fresh build into a scratch directory."""
    scratch = workdir / f"build_check_{side}"
    shutil.rmtree(scratch, ignore_errors=True)
    config = BuildConfig(short_side=side, **BUILD)
    started = time.perf_counter()
    build_shards(manifest, scratch, config, progress=False)
    return source_seconds / (time.perf_counter() - started) / config.workers


def timed_loop(work: Callable[[Any], object], items: Sequence, seconds: float, offset: int = 0):
    """(items done, seconds): ``work`` over ``items`` cycled from ``offset`` until ``seconds``
    have passed, after one untimed call (codec tables, first allocations, file cache)."""
    work(items[offset % len(items)])
    done, started = 0, time.perf_counter()
    while True:
        work(items[(offset + done) % len(items)])
        done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done, elapsed


def decode_least(data: bytes, frames: int) -> None:
    """What any loader must do with a clip: decode every frame, T of them to RGB."""
    decode_clip(data, select=lambda available: uniform_frame_indices(available, frames))


def decode_limit_process(clips, frames, seconds, offset, barrier, results) -> None:
    """One of the decode-limit processes: warm up, wait for the others, run the timed loop."""
    work = functools.partial(decode_least, frames=frames)
    work(clips[offset])
    barrier.wait()
    results.put(timed_loop(work, clips, seconds, offset))


def decode_limit(clips: list[Clip], frames: int, processes: int, seconds: float) -> float:
    """Clips/s of ``processes`` decode loops started together, each run for ``seconds``."""
    data = [clip.mp4 for clip in clips]
    if processes == 1:
        done, elapsed = timed_loop(functools.partial(decode_least, frames=frames), data, seconds)
        return done / elapsed
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=decode_limit_process,
            args=(data, frames, seconds, i * len(data) // processes, barrier, results),
            daemon=True,  # a failed one leaves the others at the barrier: gone with this process
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    counts = [results.get(timeout=seconds + START_TIMEOUT) for _ in workers]
    for worker in workers:
        worker.join()
    # The barrier starts the loops together, so the longer one spans the common wall time.
    return sum(done for done, _ in counts) / max(elapsed for _, elapsed in counts)


def naive_clip(clip: Clip, frames: int, side: int, rng: random.Random) -> torch.Tensor:
    """(T, C, S, S) uint8 from the source video itself: seek, decode the window, crop, resize."""
    with av.open(clip.source) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1  # one core, as in every other line
        window_frames = round((clip.end - clip.start) * stream.average_rate)
        picks = uniform_frame_indices(window_frames, frames).tolist()
        wanted, last = set(picks), max(picks)
        rgb_by_index = {}
        # Lands on the keyframe at or before the start: decoding has to begin there.
        container.seek(int(clip.start / stream.time_base), stream=stream)
        index = 0
        for frame in container.decode(stream):
            if frame.time < clip.start:
                continue  # decoded to reach the start, not kept
            if frame.time >= clip.end or index > last:
                break
            if index in wanted:
                rgb_by_index[index] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            index += 1
    video = torch.from_numpy(np.stack([rgb_by_index[i] for i in picks])).permute(0, 3, 1, 2)
    # The reader's crop: a box drawn as torchvision's RandomResizedCrop, F.interpolate on uint8.
    video = random_resized_crop(
        video, side, ReaderConfig.crop_scale, ReaderConfig.crop_ratio, rng
    )  # (T, C, S, S)
    return video.flip(-1) if rng.random() < ReaderConfig.flip_prob else video


def naive_loader(clips: list[Clip], frames: int, side: int, seconds: float) -> float:
    rng = random.Random(0)
    done, elapsed = timed_loop(lambda clip: naive_clip(clip, frames, side, rng), clips, seconds)
    return done / elapsed


def training_samples(batch: dict[str, Any]) -> int:
    return batch["crops"].shape[0] * batch["crops"].shape[1]  # (clips, k, 5)


def reader_rate(
    shards: Path, size: Size, workers: int, batches: int, tokenizer, samples_per_clip: int = 1
) -> tuple[float, dict[str, Any]]:
    """(training samples/s, the last batch) of the train reader, 8 clips a batch."""
    config = ReaderConfig(
        shards=str(shards),
        num_frames=size.frames,
        size=size.side,
        batch_size=CLIPS_PER_BATCH * samples_per_clip,
        num_workers=workers,
        samples_per_clip=samples_per_clip,
    )
    samples, started = 0, None
    for index, batch in enumerate(build_loader(config, tokenizer=tokenizer)):
        if index < workers:
            # Worker start-up and the shuffle buffer's first fill excluded.
            started = time.perf_counter()
            continue
        samples += training_samples(batch)
        if index - workers + 1 >= batches:
            return samples / (time.perf_counter() - started), batch
    raise RuntimeError(f"{shards}: the reader ended before {batches} batches")


def cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children): user + system CPU seconds so far."""
    own, children = (resource.getrusage(who) for who in (RUSAGE_SELF, RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def reader_cpu(shards: Path, size: Size, workers: int, tokenizer) -> tuple[float, float]:
    """Marginal CPU ms per clip of a train reader pass, (main process, workers): the
    difference between a pass of 20 batches and one of 4, so that start-up (worker spawn,
    shuffle-buffer fill) cancels out. Load on the machine stretches wall time, much less CPU
    time: these figures are the ones to read on a shared machine."""

    def one_pass(batches: int) -> tuple[float, float, int]:
        config = ReaderConfig(
            shards=str(shards), num_frames=size.frames, size=size.side,
            batch_size=CLIPS_PER_BATCH, num_workers=workers, epoch_size=CLIPS_PER_BATCH * batches,
        )  # fmt: skip
        (own, children), clips = cpu_seconds(), 0
        for batch in build_loader(config, tokenizer=tokenizer):  # workers joined at the end
            clips += training_samples(batch)
        own_after, children_after = cpu_seconds()
        return own_after - own, children_after - children, clips

    short, long = one_pass(4), one_pass(20)
    clips = long[2] - short[2]
    return 1e3 * (long[0] - short[0]) / clips, 1e3 * (long[1] - short[1]) / clips


def limit_cpu(clips: list[Clip], frames: int, count: int = 48) -> float:
    """CPU ms per clip of the decode-limit loop, in this process."""
    decode_least(clips[0].mp4, frames)
    started = time.process_time()
    for index in range(count):
        decode_least(clips[index % len(clips)].mp4, frames)
    return 1e3 * (time.process_time() - started) / count


def expand_seconds(batch: dict[str, Any], side: int, calls: int = 3) -> tuple[float, int]:
    """(seconds, training samples) of ``calls`` calls of ``expand_crops`` on ``batch``."""
    started = time.perf_counter()
    for _ in range(calls):
        expand_crops(batch, side)
    return time.perf_counter() - started, calls * training_samples(batch)


def measure_round(
    size: Size,
    shards: Path,
    clips: list[Clip],
    *,
    build: Callable[[int], float],
    tokenizer,
    batches: int,
    loop_seconds: float,
) -> dict[str, float]:
    """One round of every line at ``size``: figure name → value. ``build(side)`` is one
    round of the shard build figure."""
    frames, side = size.frames, size.side
    figures = {
        "build": build(side),
        "limit 1p": decode_limit(clips, frames, 1, loop_seconds),
        "limit 2p": decode_limit(clips, frames, 2, loop_seconds),
        "naive": naive_loader(clips, frames, side, loop_seconds),
    }
    figures["reader 1w"], batch = reader_rate(shards, size, 1, batches, tokenizer)
    figures["reader 2w"], _ = reader_rate(shards, size, 2, batches, tokenizer)
    if size.targeted:
        figures["cpu limit"] = limit_cpu(clips, frames)
        figures["cpu in-process"] = sum(reader_cpu(shards, size, 0, tokenizer))
        figures["cpu main"], figures["cpu worker"] = reader_cpu(shards, size, 1, tokenizer)
        figures["k=1"] = figures["reader 1w"]  # samples_per_clip defaults to 1
        expand_time, expanded = expand_seconds(batch, side)
        for k in SAMPLES_PER_CLIP[1:]:
            figures[f"k={k}"], batch = reader_rate(shards, size, 1, batches, tokenizer, k)
            seconds, samples = expand_seconds(batch, side)
            expand_time, expanded = expand_time + seconds, expanded + samples
        figures["expand ms"] = 1e3 * expand_time / expanded
    return figures


# ---------------------------------------------------------------------------------------------
# Report


def report(size: Size, rounds: list[dict[str, float]]) -> None:
    def values(name: str) -> list[float]:
        return [figures[name] for figures in rounds]

    def ratio(label: str, top: str, bottom: str, target: float | None, digits: int = 2):
        ratios = round_ratios(values(top), values(bottom))
        print(f"{label:<30}{ratio_spread(ratios, digits, target)}")

    print(f"\n== {size.name}: clips of 4 s at 8 fps, short side {size.side} ==")
    print(
        f"{'shard build:':<30}{spread(values('build'), 1)} "
        f"source s per wall s per worker ({BUILD['workers']} workers)"
    )
    print(f"{'decode limit, 1 process:':<30}{spread(values('limit 1p'), 1)} clips/s")
    print(f"{'decode limit, 2 processes:':<30}{spread(values('limit 2p'), 1)} clips/s")
    print(f"{'naive loader, 1 process:':<30}{spread(values('naive'), 2)} clips/s")
    print(f"{'reader, 1 worker:':<30}{spread(values('reader 1w'), 1)} clips/s")
    print(f"{'reader, 2 workers:':<30}{spread(values('reader 2w'), 1)} clips/s")
    ratio("reader 1w / decode limit 1p:", "reader 1w", "limit 1p", 0.9 if size.targeted else None)
    ratio("reader 2w / decode limit 2p:", "reader 2w", "limit 2p", None)
    ratio("reader 1w / naive loader:", "reader 1w", "naive", 5, digits=1)
    if not size.targeted:
        return
    print(f"{'CPU ms per clip, limit loop:':<30}{spread(values('cpu limit'), 1)}")
    print(f"{'  reader without workers:':<30}{spread(values('cpu in-process'), 1)}")
    print(f"{'  reader, its 1 worker:':<30}{spread(values('cpu worker'), 1)}")
    print(f"{'  reader, main process:':<30}{spread(values('cpu main'), 1)}")
    ratio("CPU, limit / no-worker reader:", "cpu limit", "cpu in-process", 0.9)
    ratio("CPU, limit / reader worker:", "cpu limit", "cpu worker", 0.9)
    for k in SAMPLES_PER_CLIP:
        print(f"{f'reader 1 worker, k = {k}:':<30}{spread(values(f'k={k}'), 1)} training samples/s")
    for k in SAMPLES_PER_CLIP[1:]:
        ratio(f"k = {k} / k = 1:", f"k={k}", "k=1", 1.8 if k == 2 else None)
    print(
        f"{'expand_crops on this CPU:':<30}{spread(values('expand ms'), 2)} "
        f"ms per training sample (torch threads: {torch.get_num_threads()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=8, help="source videos")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each source")
    parser.add_argument("--batches", type=int, default=30, help="timed batches of each reader")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per figure")
    parser.add_argument(
        "--loop-seconds",
        type=float,
        default=10.0,
        help="wall time of each decode-limit and naive-loader loop (shorter for a quick check)",
    )
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary one")
    args = parser.parse_args()
    if args.batches < 3 or args.rounds < 1 or args.loop_seconds <= 0:
        parser.error("need --batches ≥ 3, --rounds ≥ 1 and --loop-seconds > 0")
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vidrec-bench-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [SIZES[name] for name in args.sizes]

    versions = f"torch {torch.__version__}, av {av.__version__}"
    print(f"machine: {multiprocessing.cpu_count()} cores, {versions}")
    print(f"sources: {args.sources} × {args.seconds:g} s 640×480 24 fps H.264 in {args.workdir}")
    print(f"figures: median [min–max] of {args.rounds} interleaved rounds")
    started = time.perf_counter()
    manifest = make_sources(args.workdir, args.sources, args.seconds)
    tokenizer = load_tokenizer()
    clips = {}
    for size in sizes:
        shards = args.workdir / f"shards_{size.side}"
        build_shards(manifest, shards, BuildConfig(short_side=size.side, **BUILD), progress=False)
        clips[size.name] = (shards, read_clips(shards))
    build = functools.partial(
        build_rate, manifest, args.workdir, source_seconds=args.sources * args.seconds
    )
    rounds: dict[str, list[dict[str, float]]] = {size.name: [] for size in sizes}
    for round_index in range(args.rounds):
        for size in sizes:
            shards, size_clips = clips[size.name]
            figures = measure_round(
                size,
                shards,
                size_clips,
                build=build,
                tokenizer=tokenizer,
                batches=args.batches,
                loop_seconds=args.loop_seconds,
            )
            rounds[size.name].append(figures)
        elapsed = time.perf_counter() - started
        print(f"round {round_index + 1}/{args.rounds} done, {elapsed:.0f} s", flush=True)
    for size in sizes:
        report(size, rounds[size.name])


if __name__ == "__main__":
    main()
