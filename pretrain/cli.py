"""``vidrec pretrain``: load and check the config, then train (or only print with --check)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(commands) -> None:
    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain the video-text model (run under deepspeed, torchrun, srun or alone)",
    )
    add_config_arguments(pretrain, "launch/configs/small.yaml", "train.steps=500")
    pretrain.add_argument(
        "--gpus-per-node", type=int, default=None,
        help="GPUs (ranks) per node assumed by --check's capacity report "
        "(default: the world size, at most 8)",
    )  # fmt: skip
    pretrain.set_defaults(run=_run)


def add_config_arguments(parser, config_example: str, override_example: str) -> None:
    """A stage's config options: ``--config``, ``--set`` overrides, ``--check``."""
    parser.add_argument("--config", required=True, help=f"YAML, e.g. {config_example}")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {override_example} (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--check", action="store_true",
        help="validate, print the resolved config and DeepSpeed JSON, start nothing",
    )  # fmt: skip
    parser.add_argument("--world-size", type=int, default=1, help="world size assumed by --check")


def config_error_line(path: str, err: Exception) -> str:
    """A config error as one line that names the config file."""
    message = " ".join(str(err).split())
    return message if path in message else f"{path}: {message}"


def _run(args: argparse.Namespace) -> int:
    from pretrain.config import (
        ConfigError,
        deepspeed_config,
        launcher_overrides,
        load_pretrain_config,
        model_width,
        to_dict,
    )

    try:
        overrides = launcher_overrides(os.environ, args.overrides)
        config = load_pretrain_config(args.config, overrides)
        ds_config = deepspeed_config(config, args.world_size, model_width(config))
        model_config = config.model.build_config()
        if not args.check and not config.data.train_shards:
            # said here, naming the file, rather than by every rank once the job has started
            raise ConfigError("data.train_shards is empty: nothing to train on")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"vidrec pretrain: {config_error_line(args.config, err)}", file=sys.stderr)
        return 2
    if args.check:
        import torch

        from pretrain.model import VideoTextModel

        with torch.device("meta"):
            parameters = VideoTextModel(model_config).num_parameters()
        print(json.dumps({"config": to_dict(config), "deepspeed": ds_config}, indent=2))
        print(f"parameters: {parameters:,}")
        print_capacity(config, model_config, args.gpus_per_node or min(args.world_size, 8))
        return 0
    from data_shards.sources import resolve_sources

    try:
        if config.data.train_shards:  # (an empty spec is refused by the trainer)
            resolve_sources(config.data.train_sources())
    except (FileNotFoundError, ValueError) as err:
        print(f"vidrec pretrain: data.train_shards: {err}", file=sys.stderr)
        return 2
    from pretrain.train import run

    summary = run(config)
    evaluation = summary.get("evaluation") or {}
    if evaluation and summary["rank"] == 0:
        print(
            f"text→video R@1 {evaluation.get('t2v_r1', float('nan')):.1f}  "
            f"R@5 {evaluation.get('t2v_r5', float('nan')):.1f}  "
            f"video→text R@1 {evaluation.get('v2t_r1', float('nan')):.1f}"
        )
    return 0


def print_capacity(config, model_config, gpus_per_node: int) -> None:
    """The capacity report of ``config`` on a node of ``gpus_per_node`` GPUs and the cores
    of the machine that runs the check."""
    from pretrain.capacity import capacity_report, format_capacity
    from pretrain.distributed import cores_on_node

    report = capacity_report(
        config,
        gpus_per_node=gpus_per_node,
        cores=cores_on_node(os.environ),
        model_config=model_config,
    )
    for line in format_capacity(report):
        print(line)
    for warning in report.warnings:
        print(f"warning: {warning}")
