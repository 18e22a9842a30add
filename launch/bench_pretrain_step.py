"""What one pretraining step of the small preset costs with its settings ("new": the clip
masked for the contrastive loss alone, no decoder) against the settings before ("old": masked
video modelling through the VideoMAE decoder), in one process on one thread: the ratio that
sizes the demo's step count (launch/demo.sh runs 70 new steps for the 60 old ones).

    python launch/bench_pretrain_step.py [--rounds 7] [--batch 16]

Each round times one optimizer step (objectives, backward, AdamW) of each config on the same
fixed batch of random uint8 clips and captions, interleaved; the per-round ratio old ÷ new is
summarised as median [min–max] (``launch/bench_stats.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from data_shards.text import load_tokenizer
from pretrain.config import load_pretrain_config
from pretrain.objectives import ClipLoss, PretrainObjectives
from pretrain.train import build_model, build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import ratio_spread, round_ratios, spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "new": [],
    "old": ["objectives.masked_video=1.0", "objectives.contrastive_masking=false"],
}


def build(overrides: list[str], tokenizer):
    """The small preset's model, optimizer and objectives with ``overrides``."""
    config = load_pretrain_config(ROOT / "launch" / "configs" / "small.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer, _ = build_optimizer(model, config)
    settings = config.objectives
    objectives = PretrainObjectives(
        ClipLoss(),
        settings,
        model.config.video_grid,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=model.config.text_config.vocab_size,
        special_token_ids=tokenizer.all_special_ids,
        video_mask_ratio=settings.mask_ratio,
        mlm_probability=settings.mlm_probability,
        contrastive_masking=settings.contrastive_masking,
    )
    return model, optimizer, objectives, config


def step_seconds(model, optimizer, objectives, batch) -> float:
    started = time.perf_counter()
    loss = objectives(model, batch, torch.Generator().manual_seed(1))["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16, help="clips per step (the demo's 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    runs = {name: build(overrides, tokenizer) for name, overrides in CONFIGS.items()}
    video = runs["new"][3].model.video
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, video["num_frames"], 3, video["image_size"], video["image_size"])
    batch = {
        "video": torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator),
        "input_ids": torch.randint(1000, 2000, (args.batch, 24), generator=generator),
        "attention_mask": torch.ones(args.batch, 24, dtype=torch.long),
    }
    for model, optimizer, objectives, _ in runs.values():  # warm-up, not timed
        step_seconds(model, optimizer, objectives, batch)
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer, objectives, _) in runs.items():
            seconds[name].append(step_seconds(model, optimizer, objectives, batch))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.2f}; small preset, {args.batch} clips per step, 1 thread, "
        f"{args.rounds} rounds"
    )
    for name in runs:
        print(f"{name}: {spread(seconds[name], 3)} s per step")
    ratios = round_ratios(seconds["old"], seconds["new"])
    print(f"old ÷ new per step: {ratio_spread(ratios, 3)}")


if __name__ == "__main__":
    main()
