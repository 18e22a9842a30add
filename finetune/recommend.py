"""``vidrec recommend``: top-K items for users, and the likeliest users for a (new) item.

Two questions a finetuned recommender answers at serving time:

- *items for users*: each user's state after their history (read from an interaction file, or
  given inline) takes candidates from the export's item index, re-ranked with the full head
  (``finetune.serving``); items already in the history are excluded, as in the evaluation's
  full ranking. ``--explain N`` adds each item's N strongest reasons (``finetune.explain``).
- *users for an item*: one item (a new one, embedded from its text and/or clip by the item
  tower, as a cold-start item is; or a catalogue item, from its table row) is scored against
  every user's current state; users who already engaged with it are left out.

A user's "current" history is every engaged row of the interaction file (label 1, or no label
column), sorted by (timestamp, file order) like training; no leave-one-out split and no minimum
count, since serving sees the whole log. Rows naming items outside the catalogue are skipped
and counted (a log may be newer than the export), as are unknown ids of an inline
``--history``; user ids and catalogue ids asked for by ``--users`` / ``--item`` must exist.

The model is an export dir (``vidrec export --checkpoint <finetune output dir>``) or a finetune
output dir itself (built in memory from its latest checkpoint, the same object).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from finetune.export import ExportedRecommender, build_recommender, load_recommender
from finetune.serving import (
    Recommendation,
    UserHistory,
    recommend_items,
    resolve_histories,
    user_states,
)
from pretrain.export import INFO_FILE, ExportError

log = logging.getLogger(__name__)


def open_recommender(path: str | Path, device: str | torch.device = "cpu") -> ExportedRecommender:
    """An export dir, or a finetune output dir (built in memory from its latest checkpoint)."""
    path = Path(path)
    if (path / INFO_FILE).is_file():
        return load_recommender(path, device)
    if (path / "checkpoints").is_dir():
        log.info("%s is a finetune output dir: building the recommender from its checkpoint", path)
        return build_recommender(path).to(device)
    raise ExportError(
        f"{path}: neither a recommender export (no {INFO_FILE}) nor a finetune output dir "
        "(no checkpoints/)"
    )


# ============================================================================= histories


def read_histories(path: str | Path, recommender: ExportedRecommender) -> dict[str, UserHistory]:
    """Every user's engaged history in an interaction file (any format ``finetune.tables``
    reads), in order of first appearance."""
    # The module's value parsers, so ids and times read exactly as in training.
    from finetune.tables import (
        InteractionFileError,
        normalize_id,
        parse_floats,
        parse_timestamps,
        read_table,
    )

    table = read_table(path)
    missing = [name for name in ("user_id", "item_id", "timestamp") if name not in table.columns]
    if missing:
        raise InteractionFileError(f"{path}: missing required column(s) {', '.join(missing)}")
    users = [normalize_id(value) for value in table.columns["user_id"]]
    items = [normalize_id(value) for value in table.columns["item_id"]]
    times = parse_timestamps(table.columns["timestamp"])
    engaged = np.ones(len(users), dtype=bool)
    if "label" in table.columns:
        engaged = parse_floats(table.columns["label"]) == 1  # skips (0) never enter histories
    order = np.lexsort((np.arange(len(users)), times))  # by time, then file order (stable)
    histories: dict[str, UserHistory] = {}
    for user in users:  # first-appearance order
        if user is not None and user not in histories:
            histories[user] = UserHistory(user, [], [])
    unknown: dict[str, int] = {}
    for row in order:
        user, item = users[row], items[row]
        if user is None or item is None or not engaged[row] or not np.isfinite(times[row]):
            continue
        index = recommender.item_index.get(item)
        if index is None:
            unknown[item] = unknown.get(item, 0) + 1
            continue
        histories[user].items.append(index)
        histories[user].timestamps.append(float(times[row]))
    if unknown:
        log.warning(
            "%s: %d rows name %d items outside the catalogue (e.g. %s); skipped",
            path, sum(unknown.values()), len(unknown), ", ".join(list(unknown)[:5]),
        )  # fmt: skip
    return histories


def select_users(histories: dict[str, UserHistory], user_ids: Sequence[str] | None, source: str):
    """The histories of ``user_ids`` (all when None); a ``KeyError`` naming unknown users."""
    if user_ids is None:
        return list(histories.values())
    unknown = [user for user in user_ids if user not in histories]
    if unknown:
        raise KeyError(f"unknown user id(s), not in {source}: {', '.join(unknown[:20])}")
    return [histories[user] for user in user_ids]


# ============================================================================= the two questions


@torch.no_grad()
def recommend_users(
    recommender: ExportedRecommender,
    histories: Sequence[UserHistory],
    item_id: str,
    k: int = 10,
    *,
    text: str | None = None,
    clips: Sequence[torch.Tensor] = (),
    user_chunk: int = 256,
) -> list[Recommendation]:
    """The ``k`` users most likely to engage with ``item_id``, best first.

    A new item (not in the catalogue) is embedded from ``text`` and/or ``clips`` by the item
    tower; a catalogue item is taken from the table (giving content too is refused, since the
    two embeddings would disagree), and users who already engaged with it are left out.
    """
    row = recommender.item_index.get(item_id)
    if row is None:
        if not text and not clips:
            raise KeyError(
                f"unknown item id {item_id!r}, not in the catalogue: give its text and/or clip "
                "to embed it as a new item"
            )
        embedding = recommender.embed_new_item(text, clips)
    else:
        if text or clips:
            raise ValueError(
                f"item {item_id!r} is in the catalogue: drop the text/clip to rank users for "
                "its stored embedding, or give the new item another id"
            )
        embedding = recommender.item_embeddings[row]
    candidates = [h for h in histories if row is None or row not in h.items]
    states = user_states(recommender, candidates, user_chunk)
    scores = recommender.score_users(states, embedding, row)
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    cold = row is None or bool(recommender.cold[row])
    return [
        Recommendation(candidates[i].user_id, item_id, rank, float(scores[i]), cold)
        for rank, i in enumerate(order.tolist(), start=1)
    ]


# ============================================================================= output


def _reasons_text(row: Recommendation) -> str:
    if row.reasons is None:
        return ""
    return ", ".join(f"{r.item_id} {r.contribution:+.3f}" for r in row.reasons) + (
        f" (base {row.base:+.3f}, other {row.other:+.3f})"
    )


def format_table(rows: Sequence[Recommendation], by_item: bool = False) -> str:
    """Aligned plain-text table (what the CLI prints); a ``reasons`` column when explained."""
    columns = ["item_id", "rank", "user_id"] if by_item else ["user_id", "rank", "item_id"]
    columns += ["score", "cold_start"]
    explained = any(row.reasons is not None for row in rows)
    cells = [columns + (["reasons"] if explained else [])]
    for row in rows:
        line = [f"{row.score:.4f}" if name == "score" else str(getattr(row, name))
                for name in columns]  # fmt: skip
        cells.append(line + ([_reasons_text(row)] if explained else []))
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
             for line in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def write_rows(rows: Sequence[Recommendation], path: str | Path) -> None:
    """JSONL (``.jsonl``/``.json``) or CSV (``.csv``, reasons as a JSON list), by suffix."""
    path = Path(path)
    records = [asdict(row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        for record in records:
            record["reasons"] = "" if record["reasons"] is None else json.dumps(record["reasons"])
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Recommendation)])
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        raise ValueError(f"--out {path}: use a .jsonl or .csv file")


# ============================================================================= CLI


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def add_parser(commands) -> None:
    recommend = commands.add_parser(
        "recommend",
        help="top-K items for users, or the likeliest users for a new item (finetuned model)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    recommend.add_argument(
        "--model", required=True, help="a finetune export dir, or a finetune output dir"
    )
    who = recommend.add_mutually_exclusive_group()
    who.add_argument("--users", help="comma-separated user ids (default: every user of the file)")
    who.add_argument("--users-file", help="a file of user ids, one a line")
    recommend.add_argument(
        "--interactions", help="interaction log the histories come from (default: the "
        "finetune run's data.interactions, if that file still exists)",
    )  # fmt: skip
    recommend.add_argument(
        "--history", help="inline history: comma-separated item ids, oldest first (one user)"
    )
    recommend.add_argument("--top-k", type=int, default=10)
    recommend.add_argument(
        "--include-seen", action="store_true", help="do not exclude items already in a history"
    )
    recommend.add_argument("--item", help="rank users for this item (new, or of the catalogue)")
    recommend.add_argument("--item-text", help="the new item's text (title, tags, ...)")
    recommend.add_argument(
        "--item-clip", action="append", default=[], help="a video file of the new item "
        "(repeatable: its embedding averages the clips)",
    )  # fmt: skip
    recommend.add_argument(
        "--users-from", help="interaction log whose users are ranked for --item (default: "
        "--interactions)",
    )  # fmt: skip
    recommend.add_argument(
        "--explain", type=int, nargs="?", const=3, default=0, metavar="N",
        help="with each item, the N history items that added most to its score (default 3)",
    )  # fmt: skip
    recommend.add_argument("--out", help="also write the rows to FILE.jsonl or FILE.csv")
    recommend.add_argument("--device", default="cpu", help="e.g. cpu, cuda:0")
    recommend.set_defaults(run=_run)


def _interactions_path(args: argparse.Namespace, recommender: ExportedRecommender) -> str:
    path = (args.users_from if args.item else None) or args.interactions
    if path:
        return path
    trained = recommender.finetune.get("config", {}).get("data", {}).get("interactions")
    if trained and Path(trained).is_file():
        print(f"histories from the training log {trained} (pass --interactions to change)",
              file=sys.stderr)  # fmt: skip
        return trained
    raise ValueError("no histories: pass --interactions FILE (or --history for one user)")


def _run(args: argparse.Namespace) -> int:
    from finetune.tables import InteractionFileError

    if args.top_k < 1 or args.explain < 0:
        print("vidrec recommend: --top-k must be >= 1 and --explain >= 0", file=sys.stderr)
        return 2
    if args.item and args.history:
        print("vidrec recommend: --history is one user's history for item recommendations; "
              "--item ranks the users of --users-from", file=sys.stderr)  # fmt: skip
        return 2
    try:
        recommender = open_recommender(args.model, args.device)
        user_ids = _split(args.users) or None
        if args.users_file:
            user_ids = [line.strip() for line in Path(args.users_file).read_text().splitlines()
                        if line.strip()]  # fmt: skip
        if args.history and not args.item:
            name = user_ids[0] if user_ids and len(user_ids) == 1 else "history"
            resolved = resolve_histories(recommender, [(name, _split(args.history), None)])
            if resolved.unknown:
                print(f"vidrec recommend: --history: {resolved.report()}", file=sys.stderr)
            histories = resolved.histories
        else:
            source = _interactions_path(args, recommender)
            histories = select_users(read_histories(source, recommender), user_ids, source)
        if args.item:
            from pretrain.pyfunc import load_clip

            prep = recommender.preprocessing
            clips = [load_clip(path, prep.num_frames, prep.image_size) for path in args.item_clip]
            rows = recommend_users(
                recommender, histories, args.item, args.top_k, text=args.item_text, clips=clips
            )
        else:
            rows = recommend_items(
                recommender, histories, args.top_k, exclude_seen=not args.include_seen,
                explain=args.explain,
            )  # fmt: skip
        if args.out:
            write_rows(rows, args.out)
    except KeyError as err:  # unknown user / item ids: the message names them
        print(f"vidrec recommend: {err.args[0]}", file=sys.stderr)
        return 2
    except (ExportError, InteractionFileError, FileNotFoundError, ValueError) as err:
        print(f"vidrec recommend: {err}", file=sys.stderr)
        return 2
    print(format_table(rows, by_item=bool(args.item)))
    if args.out:
        print(f"{len(rows)} rows written to {args.out}")
    return 0
