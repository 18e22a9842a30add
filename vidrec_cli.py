"""The ``vidrec`` command: one entry point, one subcommand per stage."""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEBUG_VARIABLE = "VIDREC_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    from data_shards import cli as shards_cli
    from finetune import cli as finetune_cli
    from finetune import export_cli, index_cli, recommend
    from pretrain import cli as pretrain_cli
    from pretrain import embed_cli

    parser = argparse.ArgumentParser(
        prog="vidrec", description="Video-text pretraining and video recommendation."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true",
        help=f"show the Python traceback of an input error and the libraries' INFO lines "
        f"(or set {DEBUG_VARIABLE}=1)",
    )  # fmt: skip
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
    index_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.debug or bool(os.environ.get(DEBUG_VARIABLE)))
    try:
        return int(args.run(args) or 0)
    except Exception as err:
        if args.debug or os.environ.get(DEBUG_VARIABLE) or not is_input_error(err):
            raise
        print(f"{_command_name(args)}: {error_line(err)}", file=sys.stderr)
        return 2


def is_input_error(err: BaseException) -> bool:
    """An error about what the user gave (a file, a row, a field, a config value), which one
    line can say, as opposed to a bug, which needs its traceback: missing or unreadable files
    (``OSError``), values that do not parse or fit (``ValueError``: ``ConfigError``,
    ``ManifestError``, ``InteractionFileError``, JSON errors ...), exports and videos that
    cannot be read."""
    if isinstance(err, (OSError, ValueError)):
        return True
    from data_shards.video import VideoError
    from pretrain.checkpoint import ExportError

    return isinstance(err, (ExportError, VideoError))


def error_line(err: BaseException) -> str:
    """The error as one line: its message, or for an ``OSError`` the reason and the file."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def _command_name(args: argparse.Namespace) -> str:
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
    action = getattr(args, "shards_command", None) or getattr(args, "index_command", None)
    name = " ".join(part for part in ("vidrec", args.command, action) if part)
    return f"[rank {rank}] {name}" if rank else name


def configure_logging(verbose: bool, debug: bool = False) -> None:
    """One line per event: vidrec's INFO from global rank 0 only; every other rank logs
    warnings and errors, tagged with its rank. Libraries (MLflow, matplotlib, transformers'
    progress bars ...) say only warnings and errors; ``--debug`` lets their INFO through,
    ``-v`` everything, from every rank. The rank is read from the launcher's environment (as
    ``pretrain.distributed.init_distributed`` reads it), so that lines logged before the
    process group exists are sorted out too."""
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
    tag = f" [rank {rank}]" if rank else ""
    if verbose:
        level = logging.DEBUG
    else:
        level = logging.INFO if debug and rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s")
    if verbose:
        return
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not debug:
        quiet_libraries()


OWN_LOGGERS = ("vidrec_cli", "data_shards", "pretrain", "finetune", "__main__")


def quiet_libraries() -> None:
    """Library logging below WARNING and progress bars off, in this process and those it
    starts (a variable the user set is kept). MLflow logs through its own handler (its INFO:
    "Creating initial MLflow database tables..."), transformers draws a "Loading weights" bar
    per model; both read their setting when imported, so one already imported is told now."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "mlflow" in sys.modules:
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
