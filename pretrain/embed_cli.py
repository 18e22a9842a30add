"""``vidrec embed``: clip and query embeddings from an export directory (``vidrec export``)
into Parquet."""

from __future__ import annotations

import argparse
import sys


def add_parser(commands) -> None:
    embed = commands.add_parser(
        "embed", help="clip embeddings of shards, or text embeddings of queries, to Parquet"
    )
    embed.add_argument("--model", required=True, help="an export directory (vidrec export)")
    embed.add_argument("--out", required=True, help="clips: output dir; texts: a .parquet file")
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="shard spec, as for training (dir, glob, braces, URLs)")
    source.add_argument("--text", action="append", help="a query (repeatable)")
    source.add_argument("--text-file", help="a file of queries, one a line")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--workers", type=int, default=2, help="reader workers per process")
    embed.add_argument(
        "--chunk-batches", type=int, default=16,
        help="batches per part file (the unit a rerun resumes from)",
    )  # fmt: skip
    embed.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda:LOCAL_RANK if present)")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(run=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from pretrain.embed import embed_clips, embed_texts, read_texts
    from pretrain.export import ExportError

    try:
        if args.shards:
            result = embed_clips(
                args.model,
                args.shards,
                args.out,
                batch_size=args.batch_size,
                num_workers=args.workers,
                chunk_batches=args.chunk_batches,
                device=args.device,
                progress=not args.no_progress,
            )
            print(
                f"embed rank {result.rank}/{result.world_size}: {result.clips} clips in "
                f"{result.seconds:.1f} s = {result.clips_per_second:.1f} clips/s per process "
                f"({result.parts_written} part files written, resumed after chunk "
                f"{result.resumed_from_chunk}, {result.total_clips} clips in this rank's parts)"
            )
            return 0
        texts = read_texts(args.text or (), args.text_file)
        rows = embed_texts(args.model, texts, args.out, device=args.device)
        print(f"embedded {rows} texts into {args.out}")
        return 0
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"vidrec embed: {err}", file=sys.stderr)
        return 2
