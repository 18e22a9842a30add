"""``vidrec export``: a training checkpoint → a self-contained model directory.

It lives above both stages because it picks the exporter by the checkpoint: a finetune run's
exports as a recommender (``finetune.export``), a pretraining run's as the video-text model
(``pretrain.export``)."""

from __future__ import annotations

import argparse
import sys

from finetune.export import export_finetune, is_finetune_checkpoint
from finetune.item_index import IndexSettings
from pretrain.export import ExportError, export_checkpoint


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
    defaults = IndexSettings()
    index = export.add_argument_group("item index (a finetune export)")
    index.add_argument(
        "--index-exact-below", type=int, default=defaults.exact_below, metavar="N",
        help="catalogues under N items get the exact index (default %(default)s)",
    )  # fmt: skip
    index.add_argument(
        "--index-factory", default=defaults.factory,
        help="faiss factory string above it, e.g. IVF1024,Flat or HNSW32 (default %(default)s: "
        "IVF with about sqrt(N) lists)",
    )  # fmt: skip
    index.add_argument("--index-nprobe", type=int, default=defaults.nprobe,
                       help="IVF lists searched per user (default %(default)s)")  # fmt: skip
    index.add_argument("--index-ef-search", type=int, default=defaults.ef_search,
                       help="HNSW search breadth (default %(default)s)")  # fmt: skip
    index.add_argument(
        "--index-candidates", type=int, default=defaults.candidates,
        help="items the index proposes per user for the exact re-rank (default %(default)s)",
    )  # fmt: skip
    export.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    # A finetune run's checkpoint says so in its config.json: it exports as a recommender.
    finetune = is_finetune_checkpoint(args.checkpoint, args.tag)
    try:
        options = {"dtype": args.dtype, "tag": args.tag, "max_shard_size": args.max_shard_size}
        if finetune:
            index = IndexSettings(
                exact_below=args.index_exact_below, factory=args.index_factory,
                nprobe=args.index_nprobe, ef_search=args.index_ef_search,
                candidates=args.index_candidates,
            )  # fmt: skip
            out = export_finetune(args.checkpoint, args.out, index=index, **options)
        else:
            out = export_checkpoint(args.checkpoint, args.out, **options)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"vidrec export: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    if args.register:
        # a recommender registers as the model that recommends, the video-text model as the
        # one that embeds
        if finetune:
            from finetune.serving_pyfunc import log_recommender as log_model
        else:
            from pretrain.pyfunc import log_export as log_model

        uri = log_model(out, registered_model_name=args.register, tracking_uri=args.tracking_uri)
        print(f"registered as {uri}")
    return 0
