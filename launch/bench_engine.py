"""Engine benchmark: the vidrec pretraining step against a bare PyTorch loop, and the pay-off of
tube masking.

    python launch/bench_engine.py [--presets tiny small] [--zero 0 2] [--steps 4] [--rounds 5]

All figures come from one process (a world of one rank, one torch thread) on the same in-memory
batch repeated (no data loading); steppers are interleaved over ``--rounds`` rounds of
``--steps`` timed steps (after one untimed). A round's figure is its mean step, in wall and in
process CPU time (see ``interleaved``); each is printed as the median [min–max] of the rounds,
and each ratio is taken within a round and printed the same way, with a verdict against its
target (``bench_stats``: met only when the lowest round reaches it):
- engine: ``Pretrainer.train_step`` (DeepSpeed engine built from the preset's config, fp32, the
  ZeRO stage given) fed ``itertools.repeat(batch)``;
- bare loop: the same model class built from the same config and seed, the same objectives
  (``PretrainObjectives`` called on the bare model), ``loss.backward()``, the same gradient-norm
  clip, ``torch.optim.AdamW`` with the same parameter groups, LR schedule, ``zero_grad``;
- ZeRO 0 + all-reduce: the ZeRO-0 engine with DeepSpeed's gradient all-reduce, which
  ``Pretrainer`` switches off in a world of one, switched back on (a diagnostic of what that
  saves);
- masking pay-off (small preset, engine, ZeRO 0): contrastive + masked video modelling at mask
  ratio 0.9 against contrastive on the unmasked clip without MVM, MLM off in both (the pair
  that isolates what masking removes: the encoder's work on the hidden 90% of tubes); then the
  full recipe (+ MLM, whose fusion layers also attend to the visible video tokens only) both
  ways. Each line also gives the FLOPs of ``pretrain.flops`` for the case.
Targets: engine ≥ 0.95 × the bare loop's speed, by CPU time and by wall time, for every ZeRO
stage measured (the all-reduce line is a diagnostic, without one); masked step ≥ 3 × faster
than unmasked, by CPU time and by wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch

from data_shards.build import BuildConfig, build_shards
from data_shards.synth import synthesize
from pretrain.config import PretrainConfig, load_pretrain_config
from pretrain.distributed import init_distributed
from pretrain.flops import pretrain_forward_flops, training_flops
from pretrain.train import Pretrainer, build_model, build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import ratio_spread, round_ratios, spread  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"

MASKING_CASES = {
    "contrastive + MVM 0.9": ["objectives.masked_language=0"],
    "contrastive, unmasked clip": ["objectives.masked_language=0", "objectives.masked_video=0"],
    "contrastive + MVM 0.9 + MLM": [],
    "contrastive + MLM, unmasked clip": ["objectives.masked_video=0"],
}
"""name → overrides of the preset's objectives (which weigh contrastive, MVM and MLM by 1)."""


def make_shards(workdir: Path) -> Path:
    """A 4-clip shard set: ``Pretrainer`` resolves ``data.train_shards`` when it is built, but
    the benchmarks feed their own batches, so the reader is never iterated."""
    shards = workdir / "shards"
    if not any(shards.glob("*.tar")):
        synthesize(
            workdir / "synth", num_items=4, num_users=2, seconds=1.0, fps=8, size=32, progress=False
        )
        manifest = workdir / "manifest.jsonl"
        rows = [json.loads(line) for line in (workdir / "synth" / "manifest.jsonl").open()]
        for row in rows:
            row["video"] = str((workdir / "synth" / row["video"]).resolve())
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
        build_shards(
            manifest,
            shards,
            BuildConfig(clip_seconds=1.0, short_side=32, workers=1),
            progress=False,
        )
    return shards


def preset_config(preset: str, workdir: Path, overrides: list[str] = ()) -> PretrainConfig:
    """The shipped preset, fp32 (the CPU precision), reading nothing, writing under workdir."""
    return load_pretrain_config(
        CONFIGS / f"{preset}.yaml",
        [
            f"data.train_shards={make_shards(workdir)}",
            "data.workers=0",
            "parallel.precision=fp32",
            f"train.output_dir={workdir / 'out'}",
            *overrides,
        ],
    )


def synthetic_batch(config: PretrainConfig, tokenizer, batch_size: int, seed: int = 0):
    """A reader-style train batch: random uint8 clips of the preset's size, each with one
    crop row covering the whole clip (so the training sample is the clip as it is), captions
    padded to ``data.max_text_length`` as the reader pads them."""
    model_config = config.model.build_config().video_config
    generator = torch.Generator().manual_seed(seed)
    size, frames = model_config.image_size, model_config.num_frames
    video = torch.randint(0, 256, (batch_size, frames, 3, size, size), generator=generator)
    captions = [
        f"a red square moves left to right over a blue field, clip {i}" for i in range(batch_size)
    ]
    tokens = tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=config.data.max_text_length,
        return_tensors="pt",
    )
    return {
        "video": video.to(torch.uint8),  # (B, T, C, H, W)
        "crops": torch.tensor([[[0, 0, size, size, 0]]] * batch_size),  # (B, 1, 5)
        "input_ids": tokens["input_ids"],  # (B, L)
        "attention_mask": tokens["attention_mask"],  # (B, L)
        "key": [f"clip{i}" for i in range(batch_size)],
    }


class BareLoop:
    """The step a PyTorch user would write by hand for the same model and objectives."""

    def __init__(self, config: PretrainConfig, trainer: Pretrainer):
        torch.manual_seed(config.train.seed)  # the weights the Pretrainer started from
        self.model = build_model(config).train()
        self.optimizer, self.scheduler = build_optimizer(self.model, config)
        self.objectives = trainer.objectives  # same weights, mask ratio, ClipLoss (world of 1)
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.grad_clip = config.optimizer.grad_clip

    def train_step(self, batches) -> None:
        batch = next(batches)
        losses = self.objectives(self.model, batch, self.generator)
        losses["loss"].backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_times(step, batch: dict[str, Any], steps: int, warmup: int = 1) -> list[tuple]:
    """(wall, CPU) seconds of each of ``steps`` steps after ``warmup`` untimed ones."""
    batches = itertools.repeat(batch)
    for _ in range(warmup):  # first-touch allocations, DeepSpeed's lazy buffers, Adam state
        step(batches)
    times = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step(batches)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def interleaved(steppers: dict[str, Any], batch, steps: int, rounds: int) -> list[dict]:
    """Per round, per stepper: its mean step over the round, in wall and in CPU milliseconds.

    The process CPU time (one torch thread) is the steadier figure: it does not count the time
    other jobs hold the core, only the work of the step itself. The two vCPUs are shared, so
    rounds differ; the report shows by how much instead of picking the luckiest.
    """
    results = []
    for _ in range(rounds):
        figures = {}
        for name, step in steppers.items():
            times = step_times(step, batch, steps)
            figures[name] = {
                "wall": 1000 * statistics.mean(wall for wall, _ in times),
                "cpu": 1000 * statistics.mean(cpu for _, cpu in times),
            }
        results.append(figures)
    return results


def clock_values(rounds: list[dict], name: str, clock: str) -> list[float]:
    """``clock`` ("wall" or "cpu") milliseconds of stepper ``name``, one per round."""
    return [figures[name][clock] for figures in rounds]


def step_line(rounds: list[dict], name: str) -> str:
    return (
        f"wall {spread(clock_values(rounds, name, 'wall'), 1)} ms/step, "
        f"CPU {spread(clock_values(rounds, name, 'cpu'), 1)} ms/step"
    )


def speed_ratios(rounds: list[dict], baseline: str, name: str, clock: str) -> list[float]:
    """Speed of ``name`` ÷ speed of ``baseline`` (the baseline's step time ÷ its), per round."""
    return round_ratios(clock_values(rounds, baseline, clock), clock_values(rounds, name, clock))


def trainer_step(trainer: Pretrainer):
    """``trainer.train_step`` over the benchmark's batches instead of its reader's."""

    def step(batches):
        trainer.batches = batches
        return trainer.train_step()

    return step


def with_allreduce(trainer: Pretrainer):
    """``train_step`` with DeepSpeed's gradient all-reduce switched back on (ZeRO 0 only): in
    a world of one it averages every gradient over one rank, at the cost of flattening all of
    them into one buffer and copying them back, so ``Pretrainer`` turns it off there. Diagnostic:
    what that saves."""

    def step(batches):
        previous = trainer.engine.enable_backward_allreduce
        trainer.engine.enable_backward_allreduce = True
        try:
            return trainer_step(trainer)(batches)
        finally:
            trainer.engine.enable_backward_allreduce = previous

    return step


def engine_overhead(preset: str, stages: list[int], args, workdir: Path) -> None:
    trainers = {}
    for stage in stages:
        config = preset_config(preset, workdir, [f"parallel.zero_stage={stage}"])
        trainers[stage] = Pretrainer(config)
        trainers[stage].engine.train()
    bare = BareLoop(config, trainers[stages[0]])
    batch_size = config.parallel.micro_batch_size
    batch = synthetic_batch(config, trainers[stages[0]].tokenizer, batch_size)
    params = sum(p.numel() for p in bare.model.parameters())
    print(
        f"\n== engine overhead: {preset} preset, {params / 1e6:.1f}M parameters, "
        f"micro-batch {batch_size}, fp32, world of 1 =="
    )
    steppers = {"bare PyTorch loop": bare.train_step}
    steppers |= {f"engine, ZeRO {stage}": trainer_step(t) for stage, t in trainers.items()}
    if 0 in trainers:
        steppers["ZeRO 0 + all-reduce"] = with_allreduce(trainers[0])
    rounds = interleaved(steppers, batch, args.steps, args.rounds)
    bare = "bare PyTorch loop"
    for name in steppers:
        print(f"{name:20s} {step_line(rounds, name)}")
    for name in list(steppers)[1:]:
        target = 0.95 if name.startswith("engine") else None
        extra = [figures[name]["cpu"] - figures[bare]["cpu"] for figures in rounds]
        print(f"{f'{name} − bare, CPU ms/step:':<41}{spread(extra, 1, signed=True)}")
        for clock, label in (("cpu", "CPU"), ("wall", "wall")):
            ratios = speed_ratios(rounds, bare, name, clock)
            print(f"{f'{name} ÷ bare, {label}:':<41}{ratio_spread(ratios, 3, target)}")
    for trainer in trainers.values():
        trainer.engine.destroy()


def masking_payoff(args, workdir: Path) -> None:
    trainers, flops, batch = {}, {}, None
    cases = list(MASKING_CASES.items())[: 2 if args.masking_skip_mlm else 4]
    for name, overrides in cases:
        config = preset_config(
            args.masking_preset,
            workdir,
            [f"parallel.zero_stage={args.masking_zero}", *overrides, *args.masking_set],
        )
        trainers[name] = trainer = Pretrainer(config)
        trainer.engine.train()
        if batch is None:
            batch_size = config.parallel.micro_batch_size
            batch = synthetic_batch(config, trainer.tokenizer, batch_size)
            caption_tokens = batch["attention_mask"].sum(dim=1).float().mean().item()
        forward = pretrain_forward_flops(config, trainer.model_config, caption_tokens)
        flops[name] = training_flops(forward)
    print(
        f"\n== masking pay-off: {args.masking_preset} preset, micro-batch {batch_size}, fp32, "
        f"engine with ZeRO {args.masking_zero}, one optimizer step =="
    )
    steppers = {name: trainer_step(t) for name, t in trainers.items()}
    rounds = interleaved(steppers, batch, args.steps, args.rounds)
    for name in steppers:
        gflop = flops[name] / 1e9
        print(f"{name:34s} {step_line(rounds, name)}; {gflop:6.2f} GFLOP/sample fwd+bwd")
    names = list(trainers)
    for masked, unmasked in zip(names[0::2], names[1::2], strict=True):
        print(f"speed-up of {masked} (FLOP ratio {flops[unmasked] / flops[masked]:.2f}×):")
        for clock, label in (("cpu", "CPU"), ("wall", "wall")):
            ratios = speed_ratios(rounds, unmasked, masked, clock)
            print(f"  {label + ':':<6}{ratio_spread(ratios, 2, 3)}")
    for trainer in trainers.values():
        trainer.engine.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["tiny", "small"], help="none: skip")
    parser.add_argument("--zero", nargs="+", type=int, default=[0, 2], help="ZeRO stages")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per figure")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 because OpenMP threads that spin-wait for a core held by "
        "another job turned 2-thread steps up to 5x slower on this shared machine",
    )
    parser.add_argument("--skip-masking", action="store_true")
    parser.add_argument("--masking-preset", default="small")
    parser.add_argument(
        "--masking-skip-mlm", action="store_true", help="only the two cases without MLM"
    )
    parser.add_argument("--masking-zero", type=int, default=0, help="ZeRO stage (world of 1)")
    parser.add_argument(
        "--masking-set",
        nargs="*",
        default=[],
        help="config overrides, e.g. parallel.micro_batch_size=2",
    )
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vidrec-bench-engine-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {multiprocessing.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, deepspeed {deepspeed.__version__}"
    )
    init_distributed()  # a world of one rank, as a plain `vidrec pretrain` runs
    for preset in args.presets:
        engine_overhead(preset, args.zero, args, workdir)
    if not args.skip_masking:
        masking_payoff(args, workdir)


if __name__ == "__main__":
    main()
