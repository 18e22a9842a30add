"""``vidrec shards ...``: synthesize, build, merge and inspect shard sets."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from data_shards.build import BuildConfig, build_shards, merge_index, parse_part
from data_shards.inspect_shards import format_report, inspect_shards
from data_shards.reader import ReaderConfig, build_loader
from data_shards.shard_set import read_index
from data_shards.synth import synthesize


def add_parser(commands) -> None:
    # The options' defaults are the configs' own, so the two cannot disagree.
    build_defaults = BuildConfig()
    stream_defaults = ReaderConfig(shards=[])
    shards = commands.add_parser("shards", help="build and inspect WebDataset video shards")
    actions = shards.add_subparsers(dest="shards_command", required=True)

    build = actions.add_parser("build", help="manifest or video directory → tar shards")
    build.add_argument("--manifest", required=True, help="CSV/JSONL/Parquet, or a video folder")
    build.add_argument("--out", required=True, help="output directory for shards and index")
    build.add_argument("--clip-seconds", type=float, default=build_defaults.clip_seconds)
    build.add_argument("--clips-per-video", type=int, default=build_defaults.clips_per_video)
    build.add_argument("--fps", type=float, default=build_defaults.fps)
    build.add_argument(
        "--short-side", type=int, default=build_defaults.short_side, help="0 keeps the source size"
    )
    build.add_argument("--crf", type=int, default=build_defaults.crf)
    build.add_argument("--samples-per-shard", type=int, default=build_defaults.samples_per_shard)
    build.add_argument(
        "--max-shard-bytes",
        type=int,
        default=build_defaults.max_shard_bytes,
        help="0: no byte limit",
    )
    build.add_argument("--keep-audio", action="store_true")  # BuildConfig: off by default
    build.add_argument(
        "--workers", type=int, default=build_defaults.workers, help="0: one per CPU core"
    )
    build.add_argument(
        "--part",
        default=f"{build_defaults.part}/{build_defaults.num_parts}",
        help="build partition i of n, e.g. 3/16",
    )
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(run=_run_build)

    merge = actions.add_parser("merge-index", help="join the indexes of a partitioned build")
    merge.add_argument("out", help="shard directory holding index.part-*.json")
    merge.set_defaults(run=_run_merge)

    inspect = actions.add_parser("inspect", help="counts, stats, decode check, contact sheet")
    inspect.add_argument("directory")
    inspect.add_argument("--decode", type=int, default=32, help="samples to decode-check")
    inspect.add_argument("--clips", type=int, default=8, help="clips on the contact sheet")
    inspect.add_argument("--sheet", default=None, help="PNG path (default DIR/contact_sheet.png)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=_run_inspect)

    stream = actions.add_parser("stream", help="stream batches through the reader, report speed")
    stream.add_argument("shards", help="directory, glob, brace pattern, URL or pipe: spec")
    stream.add_argument("--batches", type=int, default=10)
    # A smaller batch and fewer workers than a training reader: a quick look at the data.
    stream.add_argument("--batch-size", type=int, default=8)
    stream.add_argument("--frames", type=int, default=stream_defaults.num_frames)
    stream.add_argument("--size", type=int, default=stream_defaults.size)
    stream.add_argument("--workers", type=int, default=2)
    stream.add_argument("--mode", choices=("train", "eval"), default=stream_defaults.mode)
    stream.add_argument("--seed", type=int, default=stream_defaults.seed)
    stream.set_defaults(run=_run_stream)

    synth = actions.add_parser("synth", help="write the synthetic videos, manifest, interactions")
    synth.add_argument("--out", required=True)
    synth.add_argument("--items", type=int, default=240)
    synth.add_argument("--users", type=int, default=400)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(run=_run_synth)


def _run_build(args: argparse.Namespace) -> int:
    part, num_parts = parse_part(args.part)
    config = BuildConfig(
        clip_seconds=args.clip_seconds,
        clips_per_video=args.clips_per_video,
        fps=args.fps,
        short_side=args.short_side,
        crf=args.crf,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        keep_audio=args.keep_audio,
        workers=args.workers,
        part=part,
        num_parts=num_parts,
    )
    result = build_shards(args.manifest, args.out, config, progress=not args.no_progress)
    print(
        f"{result.samples} samples in {result.shards} shards from {result.inputs} inputs "
        f"({result.failed} failed, {result.skipped_chunks} shards reused) → {result.index_path}"
    )
    if result.failed:
        print(f"failed inputs are listed in {result.index_path.parent}/failures*.jsonl")
    return 0 if result.inputs > result.failed else 1


def _run_merge(args: argparse.Namespace) -> int:
    path = merge_index(args.out)
    index = read_index(path.parent)
    print(f"{index['total_samples']} samples in {index['total_shards']} shards → {path}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    report = inspect_shards(
        args.directory, decode_samples=args.decode, sheet_clips=args.clips, sheet_path=args.sheet
    )
    print(json.dumps(dataclasses.asdict(report), indent=2) if args.json else format_report(report))
    return 1 if report.decode_failed or report.bad_metadata else 0


def _run_stream(args: argparse.Namespace) -> int:
    config = ReaderConfig(
        shards=args.shards,
        mode=args.mode,
        num_frames=args.frames,
        size=args.size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=args.seed,
    )
    loader = build_loader(config)
    clips, started, first_batch_at = 0, time.perf_counter(), None
    try:
        for index, batch in enumerate(loader):
            if first_batch_at is None:
                first_batch_at = time.perf_counter()
                video = batch["video"]
                crops = f", crops {tuple(batch['crops'].shape)}" if "crops" in batch else ""
                print(
                    f"batch: video {tuple(video.shape)} {video.dtype}{crops}, input_ids "
                    f"{tuple(batch['input_ids'].shape)}, first caption: {batch['text'][0]!r}"
                )
            else:
                clips += len(batch["key"])
            if index + 1 >= args.batches:
                break
    except RuntimeError as err:  # the reader gives up on shards it cannot read at all
        print(f"vidrec shards stream: {args.shards}: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - (first_batch_at or started)
    rate = clips / elapsed if clips and elapsed > 0 else 0.0
    print(
        f"{index + 1} batches; {rate:.1f} clips/s after the first batch "
        f"(first after {(first_batch_at or started) - started:.1f} s); "
        f"skipped samples: {loader.skipped_samples}, shard errors: {loader.shard_errors}"
    )
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    summary = synthesize(
        args.out,
        num_items=args.items,
        num_users=args.users,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0
