"""The ``vidrec`` command: one entry point, one subcommand per stage."""

from __future__ import annotations

import argparse
import logging
import os
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
    configure_logging(args.verbose)
    return int(args.run(args) or 0)


def configure_logging(verbose: bool) -> None:
    """INFO from global rank 0 only; every other rank logs warnings and errors, tagged with
    its rank (``-v``: everything, from every rank). The rank is read from the launcher's
    environment (as ``pretrain.distributed.init_distributed`` reads it), so that lines logged
    before the process group exists are sorted out too."""
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
    if verbose:
        level = logging.DEBUG
    else:
        level = logging.INFO if rank == 0 else logging.WARNING
    tag = f" [rank {rank}]" if rank else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
