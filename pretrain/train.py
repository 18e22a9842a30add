"""Pretraining: setup → fit (train_step, evaluate, save) → final evaluation and summary.

Runs unchanged under ``deepspeed`` (one node or ``--hostfile``), ``torchrun``, SLURM ``srun``
and as a plain single process; see ``pretrain/distributed.py``. Side effects (files, MLflow,
progress logs) happen on global rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml

from data_shards.atomic import atomic_write_text
from data_shards.reader import ReaderConfig, build_loader
from data_shards.text import load_tokenizer, resolve_text_model_dir
from pretrain import checkpoint
from pretrain.config import (
    OptimizerSettings,
    PretrainConfig,
    deepspeed_config,
    model_width,
    resolve_precision,
    to_dict,
)
from pretrain.distributed import (
    World,
    all_gather_objects,
    any_rank,
    broadcast_object,
    init_distributed,
    mean_over_ranks,
)
from pretrain.evaluate import evaluate_retrieval, format_retrieval
from pretrain.flops import forward_flops, training_flops
from pretrain.model import VideoTextModel
from pretrain.objectives import ClipLoss, ObjectiveWeights, PretrainObjectives
from pretrain.tracking import Tracker, environment_params, flatten_params

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per device, for MFU; devices not listed report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    nonfinite_skipped: int = 0
    nonfinite_streak: int = 0
    samples_seen: int = 0
    """Samples this rank consumed (skipped micro-batches included)."""
    tracking_run_id: str | None = None
    reader: dict[str, Any] = field(default_factory=dict)


def build_model(config: PretrainConfig) -> VideoTextModel:
    model_config = config.model.build_config()
    if model_config.text_model_dir or model_config.video_model_dir:
        return VideoTextModel.from_towers(model_config)
    return VideoTextModel(model_config)


def parameter_groups(model: VideoTextModel, config: PretrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, embeddings and the temperature; towers loaded
    from a directory train at ``lr × pretrained_lr_scale``."""
    optim = config.optimizer
    pretrained = set()
    if config.model.text_model_dir:
        pretrained.add("text_model.")
    if config.model.video_model_dir:
        pretrained.add("video_model.")
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim < 2 or "embeddings" in name or name == "logit_scale"
        from_pretrained = any(name.startswith(prefix) for prefix in pretrained)
        groups.setdefault((no_decay, from_pretrained), []).append(parameter)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else optim.weight_decay,
            "lr": optim.lr * (optim.pretrained_lr_scale if from_pretrained else 1.0),
        }
        for (no_decay, from_pretrained), params in sorted(groups.items())
    ]


def lr_lambda(optimizer: OptimizerSettings, steps: int):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at step ``steps``."""
    warmup, total = optimizer.warmup_steps, steps
    floor = optimizer.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model, config: PretrainConfig):
    optim = config.optimizer
    groups = parameter_groups(model, config)
    if config.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    else:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.optimizer, config.train.steps)
    )
    return optimizer, scheduler


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        key: batch[key].to(device, non_blocking=True)
        for key in ("video", "input_ids", "attention_mask")
    }


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak_device_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class Pretrainer:
    """One pretraining job. ``fit()`` runs it to ``train.steps`` and returns the summary."""

    def __init__(self, config: PretrainConfig, world: World | None = None):
        self.config = config
        self.world = world or init_distributed()
        self.output_dir = Path(config.train.output_dir)
        self.resolved = to_dict(config)
        world = self.world
        seed = config.train.seed
        # The same initial weights on every rank (ZeRO-3 partitions each rank's own copy),
        # then a different stream per rank for dropout and masks.
        torch.manual_seed(seed)
        model = build_model(config)
        torch.manual_seed(seed * 1000 + world.rank)
        self.generator = torch.Generator().manual_seed(seed * 1000 + world.rank)

        self.model_config = model.config
        optimizer, scheduler = build_optimizer(model, config)
        self.ds_config = deepspeed_config(config, world.world_size, model_width(config))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            resolve_precision(config.parallel.precision), torch.float32
        )
        single = world.world_size == 1 and config.parallel.zero_stage == 0
        if single and self.dtype is torch.float32:
            # A world of one has nothing to average, yet DeepSpeed's ZeRO-0 all-reduce still
            # flattens and copies every gradient: ~8% of a small-preset CPU step
            # (launch/bench_engine.py). Accumulation scaling happens in backward, unaffected.
            self.engine.enable_backward_allreduce = False
        text_dir = self.model_config.text_model_dir or None
        self.tokenizer = load_tokenizer(resolve_text_model_dir(text_dir))
        objectives = config.objectives
        self.objectives = PretrainObjectives(
            ClipLoss(world.rank, world.world_size, gather_with_grad=objectives.gather_with_grad),
            ObjectiveWeights(
                contrastive=objectives.contrastive,
                masked_video=objectives.masked_video,
                masked_language=objectives.masked_language,
                matching=objectives.matching,
            ),
            self.model_config.video_grid,
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=self.model_config.text_config.vocab_size,
            special_token_ids=self.tokenizer.all_special_ids,
            video_mask_ratio=objectives.mask_ratio,
            mlm_probability=objectives.mlm_probability,
            full_clip_for_contrastive=objectives.contrastive_on_unmasked,
        )
        video = self.model_config.video_config
        if not config.data.train_shards:
            raise ValueError("data.train_shards is empty: nothing to train on")
        self.reader = build_loader(
            ReaderConfig(
                shards=config.data.train_shards,
                mode="train",
                num_frames=video.num_frames,
                size=video.image_size,
                batch_size=config.parallel.micro_batch_size,
                num_workers=config.data.workers,
                shuffle_buffer=config.data.shuffle_buffer,
                seed=seed,
                max_text_length=config.data.max_text_length,
            ),
            rank=world.rank,
            world_size=world.world_size,
            tokenizer=self.tokenizer,
        )
        self.state = TrainState()
        flops = forward_flops(
            self.model_config,
            config.data.max_text_length,
            mask_ratio=objectives.mask_ratio if objectives.masked_video > 0 else 0.0,
            mlm_targets=objectives.masked_language > 0,
            matching=objectives.matching > 0,
            full_clip_for_contrastive=objectives.contrastive_on_unmasked,
        )
        self.flops_per_sample = training_flops(flops, config.model.activation_checkpointing)
        self.tracker = Tracker(config.tracking, enabled=world.is_main)
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------------------- setup

    def resume_or_start(self) -> None:
        state = checkpoint.load(self.engine, self.output_dir, self.world, self.resolved)
        if state is not None:
            self.state = TrainState(**state["train_state"])
            self.reader.load_state_dict(self.state.reader)
            checkpoint.restore_rng(state["rng"], self.generator)
        if self.world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.yaml", yaml.safe_dump(self.resolved))
            atomic_write_text(
                self.output_dir / "deepspeed.json", json.dumps(self.ds_config, indent=2)
            )
        params = flatten_params(self.resolved) | environment_params()
        params |= {
            "world_size": self.world.world_size,
            "parameters": self.model_config_parameters(),
            "precision.resolved": resolve_precision(self.config.parallel.precision),
        }
        self.tracker.start(
            params=params,
            tags={"vidrec.stage": "pretrain"},
            resume_run_id=self.state.tracking_run_id,
        )
        self.state.tracking_run_id = broadcast_object(self.tracker.run_id)
        if self.world.is_main:
            self.tracker.log_artifact(self.output_dir / "config.yaml", "config")
            self.tracker.log_artifact(self.output_dir / "deepspeed.json", "config")

    def model_config_parameters(self) -> int:
        module = self.engine.module
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    # ----------------------------------------------------------------------------- steps

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches with finite losses.
        Returns the step's mean losses and timings.

        A micro-batch whose loss is not finite on some rank is skipped by every rank before
        backward, counted, and replaced by the next one: the step still averages
        ``grad_accum_steps`` micro-batches, and DeepSpeed's accumulation boundary (it counts
        micro-batches) stays on this step's last one. ``train.max_nonfinite_streak`` skips in
        a row stop the run."""
        engine, world = self.engine, self.world
        started = time.perf_counter()
        data_wait = 0.0
        totals: dict[str, float] = {}
        accumulated = 0
        while accumulated < self.config.parallel.grad_accum_steps:
            fetch_start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - fetch_start
            self.state.samples_seen += len(batch["key"])
            losses = self.objectives(engine, _to_device(batch, world.device), self.generator)
            if any_rank(not torch.isfinite(losses["loss"]).item(), world.device):
                # Every rank skips this micro-batch together (the collective above), before
                # backward: nothing non-finite reaches the gradients or the optimizer.
                self.state.nonfinite_skipped += 1
                self.state.nonfinite_streak += 1
                log.warning("non-finite loss skipped (%d in a row)", self.state.nonfinite_streak)
                if self.state.nonfinite_streak >= self.config.train.max_nonfinite_streak:
                    raise FloatingPointError(
                        f"{self.state.nonfinite_streak} non-finite losses in a row at step "
                        f"{self.state.step} (train.max_nonfinite_streak)"
                    )
                continue
            self.state.nonfinite_streak = 0
            engine.backward(losses["loss"])
            engine.step()
            accumulated += 1
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item()
        self.state.step += 1
        elapsed = time.perf_counter() - started
        accum = self.config.parallel.grad_accum_steps
        metrics = {f"loss_{k}" if k != "loss" else k: v / accum for k, v in totals.items()}
        local_samples = self.config.parallel.micro_batch_size * accum
        metrics |= {
            "step_seconds": elapsed,
            "data_wait_fraction": data_wait / elapsed,
            "clips_per_second_per_rank": local_samples / elapsed,
        }
        return metrics

    def log_step(self, metrics: dict[str, float]) -> None:
        world = self.world
        averaged = mean_over_ranks(metrics, world.device)
        averaged["samples_per_second"] = averaged["clips_per_second_per_rank"] * world.world_size
        averaged["lr"] = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            averaged["grad_norm"] = float(grad_norm)
        averaged["peak_memory_mb"] = _peak_memory_mb(world.device)
        averaged["nonfinite_skipped"] = self.state.nonfinite_skipped
        averaged["skipped_samples"] = self.reader.skipped_samples
        peak = _peak_device_flops(world.device)
        if peak:
            achieved = self.flops_per_sample * averaged["clips_per_second_per_rank"]
            averaged["mfu"] = achieved / peak
        module = self.engine.module
        # Under ZeRO-3 a parameter is a shard outside forward; gather it to read it.
        with deepspeed.zero.GatheredParameters([module.logit_scale]):
            averaged["logit_scale"] = float(module.logit_scale_value.detach())
        self.history.append({"step": self.state.step, **averaged})
        if world.is_main:
            self.tracker.log_metrics(averaged, step=self.state.step)
            shown = ", ".join(
                f"{k} {averaged[k]:.4g}"
                for k in ("loss", "loss_contrastive", "loss_masked_video", "loss_masked_language")
                if k in averaged
            )
            log.info(
                "step %d/%d: %s, %.1f samples/s, data wait %.0f%%",
                self.state.step,
                self.config.train.steps,
                shown,
                averaged["samples_per_second"],
                100 * averaged["data_wait_fraction"],
            )

    def evaluate(self) -> dict[str, float] | None:
        config, world = self.config, self.world
        if not config.data.eval_shards:
            return None
        video = self.model_config.video_config
        loader = build_loader(
            ReaderConfig(
                shards=config.data.eval_shards,
                mode="eval",
                num_frames=video.num_frames,
                size=video.image_size,
                batch_size=config.data.eval_batch_size,
                num_workers=config.data.workers,
                max_text_length=config.data.max_text_length,
            ),
            rank=world.rank,
            world_size=world.world_size,
            tokenizer=self.tokenizer,
        )
        metrics = evaluate_retrieval(
            self.engine,
            loader,
            device=world.device,
            gather=all_gather_objects,
            max_batches=config.data.eval_max_batches or None,
        )
        if world.is_main:
            log.info("step %d eval: %s", self.state.step, format_retrieval(metrics))
            self.tracker.log_metrics({f"eval_{k}": v for k, v in metrics.items()}, self.state.step)
            report = {"step": self.state.step, **metrics}
            path = self.output_dir / "eval" / f"step_{self.state.step:08d}.json"
            atomic_write_text(path, json.dumps(report, indent=2))
            self.tracker.log_artifact(path, "eval")
        return metrics

    def save(self) -> None:
        self.state.reader = self.reader.state_dict()
        checkpoint.save_training(
            self.engine, self.output_dir, self.state, self.generator, self.tracker, self.world,
            self.resolved, self.config.train.keep_last,
        )  # fmt: skip

    # ----------------------------------------------------------------------------- fit

    def fit(self) -> dict[str, Any]:
        config = self.config.train
        self.resume_or_start()
        self.engine.train()
        status = "FAILED"
        last_eval = None
        try:
            batches = self._batches()
            start_step = self.state.step
            while self.state.step < config.steps:
                metrics = self.train_step(batches)
                step = self.state.step
                if config.log_every and (step % config.log_every == 0 or step == config.steps):
                    self.log_step(metrics)
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    last_eval = self.evaluate()
                    self.engine.train()
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    self.save()
            if self.state.step > start_step:
                # (a job resumed at its last step has nothing new; rewriting the checkpoint
                # that `latest` names, in place, could leave it half-written if killed)
                self.save()
            last_eval = self.evaluate() or last_eval
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.world.is_main:
                self.tracker.log_loss_curve(
                    keys=("loss", "loss_contrastive", "loss_masked_video", "loss_masked_language")
                )
            self.tracker.finish(status=status)
        return self.summary(last_eval)

    def _batches(self):
        """Endless micro-batches: the resampled reader, pass after pass."""
        while True:
            yielded = False
            for batch in self.reader:
                if "video" not in batch:
                    continue
                yielded = True
                yield batch
            if not yielded:
                raise RuntimeError("the training reader delivered no batch")

    def summary(self, evaluation: dict[str, float] | None) -> dict[str, Any]:
        first = self.history[0] if self.history else {}
        last = self.history[-1] if self.history else {}
        summary = {
            "steps": self.state.step,
            "rank": self.world.rank,
            "world_size": self.world.world_size,
            "first_loss": first.get("loss"),
            "last_loss": last.get("loss"),
            "history": self.history,
            "evaluation": evaluation,
            "nonfinite_skipped": self.state.nonfinite_skipped,
            "mlflow_run_id": self.state.tracking_run_id,
            "output_dir": str(self.output_dir),
        }
        if self.world.is_main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


def run(config: PretrainConfig) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Pretrainer(config).fit()
