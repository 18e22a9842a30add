"""``vidrec export`` (checkpoint → self-contained model directory) and ``vidrec embed`` (clip and
query embeddings from such a directory into Parquet)."""

from __future__ import annotations

import argparse
import sys


def add_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="export a pretraining checkpoint as a self-contained model directory"
    )
    export.add_argument(
        "--checkpoint", required=True,
        help="training output dir, its checkpoints/ dir, or one step_XXXXXXXX tag dir "
        "(pretrain or finetune: a finetune run exports as a recommender)",
    )  # fmt: skip
    export.add_argument("--out", required=True, help="new (or empty) directory to write")
    export.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    export.add_argument("--tag", help="checkpoint tag to export (default: the one 'latest' names)")
    export.add_argument(
        "--max-shard-size", default="2GB", help="split model.safetensors above this size"
    )
    export.add_argument(
        "--register", metavar="NAME",
        help="also log the export to MLflow and register it as model NAME",
    )  # fmt: skip
    export.add_argument("--tracking-uri", help="MLflow tracking URI for --register")
    export.set_defaults(run=_run_export)

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


def _run_export(args: argparse.Namespace) -> int:
    from finetune.export import export_finetune, is_finetune_checkpoint
    from pretrain.export import ExportError, export_checkpoint

    # A finetune run's checkpoint says so in its config.json: it exports as a recommender.
    finetune = is_finetune_checkpoint(args.checkpoint, args.tag)
    write = export_finetune if finetune else export_checkpoint
    try:
        out = write(
            args.checkpoint,
            args.out,
            dtype=args.dtype,
            tag=args.tag,
            max_shard_size=args.max_shard_size,
        )
    except (ExportError, FileNotFoundError) as err:
        print(f"vidrec export: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    if args.register:
        from pretrain.pyfunc import log_export

        uri = log_export(out, registered_model_name=args.register, tracking_uri=args.tracking_uri)
        print(f"registered as {uri}")
    return 0


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
