"""The ``vidrec`` command: one entry point, one subcommand per stage."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from data_shards import cli as shards_cli
    from finetune import cli as finetune_cli
    from finetune import export_cli, recommend
    from pretrain import cli as pretrain_cli
    from pretrain import embed_cli

    parser = argparse.ArgumentParser(
        prog="vidrec", description="Video-text pretraining and video recommendation."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the
    # environment says the same, and that is what the training stages read.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    shards_cli.add_parser(commands)
    pretrain_cli.add_parser(commands)
    export_cli.add_parser(commands)
    embed_cli.add_parser(commands)
    finetune_cli.add_parser(commands)
    recommend.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
