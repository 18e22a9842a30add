"""``vidrec finetune``: load and check the config, then finetune (or only print with --check)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pretrain.cli import add_config_arguments, config_error_line


def add_parser(commands) -> None:
    finetune = commands.add_parser(
        "finetune",
        help="finetune a recommender on pretrained encoders (deepspeed, torchrun, srun or alone)",
    )
    add_config_arguments(finetune, "launch/configs/finetune_small.yaml", "encoder.mode=top_k")
    finetune.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from finetune.config import ConfigError, deepspeed_config, load_finetune_config
    from pretrain.config import launcher_overrides, to_dict

    try:
        overrides = launcher_overrides(os.environ, args.overrides)
        config = load_finetune_config(args.config, overrides)
        ds_config = deepspeed_config(config, args.world_size)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"vidrec finetune: {config_error_line(args.config, err)}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps({"config": to_dict(config), "deepspeed": ds_config}, indent=2))
        return 0
    from finetune import report
    from finetune.train import run

    results = run(config)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"test split, step {results['step']} ({results['encoder_mode']} encoders):")
        print(report.table(results["metrics"]["test"]))
    return 0
