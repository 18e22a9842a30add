"""``vidrec index``: the item index of a recommender export: show it, add items, remove items."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.export import load_recommender
from finetune.index_update import add_items, read_new_items, remove_items
from pretrain.export import read_info


def add_parser(commands) -> None:
    index = commands.add_parser("index", help="the item index of a recommender export")
    actions = index.add_subparsers(dest="index_command", required=True)

    show = actions.add_parser("info", help="the index's kind, size and settings")
    show.add_argument("--model", required=True, help="a recommender export dir")
    show.set_defaults(run=_run_info)

    add = actions.add_parser(
        "add", help="embed new items with the export's item tower and add them (atomic)"
    )
    add.add_argument("--model", required=True, help="a recommender export dir (changed in place)")
    add.add_argument(
        "--items", required=True, help="catalogue-style file (CSV/JSONL/Parquet): item_id, "
        "text columns, optional video paths (relative to the file)",
    )  # fmt: skip
    add.add_argument("--shards", help="shard directory holding the new items' clips")
    add.add_argument(
        "--text-fields", help="comma-separated text columns, in order (default: the export's "
        "data.text_fields, else every text column)",
    )  # fmt: skip
    add.add_argument("--batch-size", type=int, default=32, help="items per encoder forward")
    add.set_defaults(run=_run_add)

    remove = actions.add_parser("remove", help="stop recommending items (atomic)")
    remove.add_argument("--model", required=True, help="a recommender export dir")
    remove.add_argument("--items", required=True, help="comma-separated item ids, or @FILE")
    remove.set_defaults(run=_run_remove)


def _run_info(args: argparse.Namespace) -> int:
    recommender = load_recommender(args.model)
    entry = read_info(args.model).get("item_index")
    if entry is None:
        print(f"{args.model}: no item index (an export older than it); every item is scored")
        return 0
    removed = int(recommender.removed[1:].sum())
    print(
        f"item index {entry['file']}: {entry['factory']} ({entry['metric']}), "
        f"{entry['size']} vectors of dim {entry['dim'] + 1}, generation {entry['generation']}; "
        f"catalogue {recommender.num_items} items ({int(recommender.cold[1:].sum())} served "
        f"from content, {removed} removed)"
    )
    settings = ", ".join(f"{key}={value}" for key, value in entry["settings"].items())
    print(f"settings: {settings}")
    return 0


def _run_add(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        print("vidrec index add: --batch-size must be >= 1", file=sys.stderr)
        return 2
    fields = [f.strip() for f in args.text_fields.split(",")] if args.text_fields else None
    strict = fields is not None
    if fields is None:  # the fields the export's catalogue was embedded from, those given
        data = load_recommender(args.model).finetune.get("config", {}).get("data", {})
        fields = data.get("text_fields")
    items = read_new_items(args.items, fields, args.shards, strict=strict)
    report = add_items(args.model, items, batch_size=args.batch_size)
    if report.skipped:
        print(f"{len(report.skipped)} items already in the catalogue, skipped "
              f"(e.g. {', '.join(report.skipped[:5])})")  # fmt: skip
    if report.reused_chunks:
        print(f"reused {report.reused_chunks} embedding chunks of an interrupted run")
    if report.added:
        timing = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in report.seconds.items())
        print(f"added {len(report.added)} items to {args.model} (generation "
              f"{report.generation}; {timing})")  # fmt: skip
    else:
        print("nothing to add")
    return 0


def _run_remove(args: argparse.Namespace) -> int:
    spec = args.items
    if spec.startswith("@"):
        ids = [line.strip() for line in Path(spec[1:]).read_text().splitlines() if line.strip()]
    else:
        ids = [part.strip() for part in spec.split(",") if part.strip()]
    try:
        report = remove_items(args.model, ids)
    except KeyError as err:
        print(f"vidrec index remove: {err.args[0]}", file=sys.stderr)
        return 2
    if report.skipped:
        print(f"{len(report.skipped)} items were already removed")
    print(f"removed {len(report.removed)} items (generation {report.generation})")
    return 0
