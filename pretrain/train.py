"""Pretraining on the shared loop (``pretrain.trainer``): the model, its objectives, the shard
reader and held-out retrieval; the loop does the rest.

Runs unchanged under ``deepspeed`` (one node or ``--hostfile``), ``torchrun``, SLURM ``srun``
and as a plain single process; see ``pretrain/distributed.py``. Side effects (files, MLflow,
progress logs) happen on global rank 0 only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import torch

from data_shards.atomic import atomic_write_text
from data_shards.augment import expand_crops
from data_shards.reader import ReaderConfig, build_loader
from data_shards.sources import ShardSource
from data_shards.text import load_tokenizer, resolve_text_model_dir
from pretrain import trainer
from pretrain.capacity import DataWaitAlarm, WaitInterval, capacity_report, format_capacity
from pretrain.config import PretrainConfig, deepspeed_config, model_width, resolve_precision
from pretrain.distributed import (
    World,
    all_gather_objects,
    cores_on_node,
    init_distributed,
    ranks_per_node,
    sum_over_ranks,
)
from pretrain.evaluate import evaluate_retrieval, format_retrieval
from pretrain.flops import peak_bf16_flops
from pretrain.model import VideoTextModel
from pretrain.objectives import ClipLoss, PretrainObjectives
from pretrain.trainer import Trainer, TrainState

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "loss_contrastive", "loss_masked_video", "loss_masked_language")


@dataclass
class PretrainState(TrainState):
    samples_seen: int = 0
    """Samples this rank consumed (skipped micro-batches included)."""
    reader: dict[str, Any] = field(default_factory=dict)


def build_model(config: PretrainConfig) -> VideoTextModel:
    model_config = config.model.build_config()
    if model_config.text_model_dir or model_config.video_model_dir:
        return VideoTextModel.from_towers(model_config)
    return VideoTextModel(model_config)


def build_optimizer(model: VideoTextModel, config: PretrainConfig):
    """AdamW (no decay on biases, norms, embeddings and the temperature; towers loaded from a
    directory at ``lr × pretrained_lr_scale``) and its warmup + cosine schedule."""
    optim = config.optimizer
    pretrained = tuple(
        prefix
        for prefix, directory in (
            ("text_model.", config.model.text_model_dir),
            ("video_model.", config.model.video_model_dir),
        )
        if directory
    )
    groups = trainer.parameter_groups(
        model, optim.lr, optim.weight_decay, pretrained, optim.lr * optim.pretrained_lr_scale
    )
    return trainer.build_optimizer(
        groups, optim, config.train.steps, offload=config.parallel.offload_optimizer
    )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        key: batch[key].to(device, non_blocking=True)
        for key in ("video", "input_ids", "attention_mask")
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class Pretrainer(Trainer):
    """One pretraining job. ``fit()`` runs it to ``train.steps`` and returns the summary."""

    stage = "pretrain"
    loss_curve_keys = LOSS_KEYS
    state_class = PretrainState

    def __init__(self, config: PretrainConfig, world: World | None = None):
        super().__init__(config, world or init_distributed())
        world = self.world
        # The same initial weights on every rank (ZeRO-3 partitions each rank's own copy),
        # then a different stream per rank for dropout and masks.
        torch.manual_seed(config.train.seed)
        model = build_model(config)
        self.seed_rank()

        self.model_config = model.config
        optimizer, scheduler = build_optimizer(model, config)
        self.ds_config = deepspeed_config(config, world.world_size, model_width(config))
        self.engine, self.scheduler = trainer.build_engine(
            model, optimizer, scheduler, self.ds_config
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
            objectives,
            self.model_config.video_grid,
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=self.model_config.text_config.vocab_size,
            special_token_ids=self.tokenizer.all_special_ids,
            video_mask_ratio=objectives.mask_ratio,
            mlm_probability=objectives.mlm_probability,
            full_clip_for_contrastive=objectives.contrastive_on_unmasked,
            contrastive_masking=objectives.contrastive_masking,
        )
        if not config.data.train_shards:
            raise ValueError("data.train_shards is empty: nothing to train on")
        self.reader = build_loader(
            self.reader_config(config.data.train_sources(), "train"),
            rank=world.rank,
            world_size=world.world_size,
            tokenizer=self.tokenizer,
        )
        self.batches = self._batches()
        """Micro-batches of the reader (a benchmark may swap in its own iterator)."""
        self.watch_capacity()
        self.last_evaluation: dict[str, float] | None = None

    def watch_capacity(self) -> None:
        """FLOPs per sample (MFU, HFU), the capacity report, logged at start, and the alarm
        that tells, once, what a loader that keeps training waiting would need."""
        config, world = self.config, self.world
        # MLM on captions that fill data.max_text_length: an upper bound on the masked
        # tokens, whose head is under 0.5% of the base preset's FLOPs
        self.capacity = capacity_report(
            config,
            gpus_per_node=ranks_per_node(os.environ, world.world_size),
            cores=cores_on_node(os.environ),
            model_config=self.model_config,
        )
        self.flops_per_sample = self.capacity.model_flops
        """Model FLOPs per training sample, forward + backward: MFU's."""
        self.hardware_flops_per_sample = self.capacity.hardware_flops
        """With the recomputed forward of activation checkpointing: HFU's."""
        self.device_name = device_name(world.device)
        self.peak_flops = peak_bf16_flops(self.device_name)
        self.data_wait_alarm = DataWaitAlarm(self.capacity, self.device_name, self.peak_flops)
        self.interval = WaitInterval()
        if world.is_main:
            for line in format_capacity(self.capacity):
                log.info("%s", line)
            for warning in self.capacity.warnings:
                log.warning("%s", warning)

    def reader_config(self, shards: str | list[ShardSource], mode: str) -> ReaderConfig:
        """The reader of ``shards``, a spec or a weighted mix (``mode`` train or eval; eval
        ignores shuffle and seed)."""
        data, video = self.config.data, self.model_config.video_config
        return ReaderConfig(
            shards=shards,
            mode=mode,
            num_frames=video.num_frames,
            size=video.image_size,
            batch_size=self.config.parallel.micro_batch_size
            if mode == "train"
            else data.eval_batch_size,
            num_workers=data.workers,
            shuffle_buffer=data.shuffle_buffer,
            seed=self.config.train.seed,
            max_text_length=data.max_text_length,
            epoch_size=data.pass_samples or None,
            samples_per_clip=data.samples_per_clip,
            crop_scale=data.crop_scale,
            crop_ratio=data.crop_ratio,
            flip_prob=data.flip_prob,
            text_fields=tuple(data.train_text_fields),
        )

    def parameter_count(self) -> int:
        module = self.engine.module
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    # ----------------------------------------------------------------------------- loop hooks

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

    def next_micro_batch(self) -> dict[str, Any]:
        batch = next(self.batches)
        self.state.samples_seen += batch["crops"].shape[:2].numel()
        return batch

    def micro_batch_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # the clips travel to the device once; their training crops are cut there
        on_device = _to_device(batch, self.world.device) | {"crops": batch["crops"]}
        samples = expand_crops(on_device, self.model_config.video_config.image_size)
        losses = self.objectives(self.engine, samples, self.generator)
        return {name if name == "loss" else f"loss_{name}": value for name, value in losses.items()}

    def train_step(self) -> dict[str, float]:
        metrics = super().train_step()
        local_samples = (
            self.config.parallel.micro_batch_size * self.config.parallel.grad_accum_steps
        )
        metrics["clips_per_second_per_rank"] = local_samples / metrics["step_seconds"]
        self.interval.add(metrics["step_seconds"], metrics["data_wait_fraction"], local_samples)
        return metrics | self.interval.metrics()

    def step_metrics(self, averaged: dict[str, float]) -> dict[str, float]:
        extra = {
            "samples_per_second": averaged["clips_per_second_per_rank"] * self.world.world_size,
            "skipped_samples": self.reader.skipped_samples,
        }
        # The blend actually trained on: samples delivered and skipped per source, all ranks.
        per_source = {f"source/{name}/delivered": n for name, n in self.reader.delivered.items()}
        per_source |= {f"source/{name}/skipped": n for name, n in self.reader.skipped.items()}
        extra |= {k: round(v) for k, v in sum_over_ranks(per_source, self.world.device).items()}
        if self.peak_flops:
            rate = averaged["clips_per_second_per_rank"] / self.peak_flops
            extra["mfu"] = self.flops_per_sample * rate
            if self.hardware_flops_per_sample != self.flops_per_sample:
                extra["hfu"] = self.hardware_flops_per_sample * rate
        starved = self.data_wait_alarm.check(
            averaged["interval_data_wait_fraction"], averaged["interval_clips_per_second_per_rank"]
        )
        if starved and self.world.is_main:
            log.warning("%s", starved)
        self.interval = WaitInterval()
        module = self.engine.module
        # Under ZeRO-3 a parameter is a shard outside forward; gather it to read it.
        with deepspeed.zero.GatheredParameters([module.logit_scale]):
            extra["logit_scale"] = float(module.logit_scale_value.detach())
        return extra

    def progress(self, averaged: dict[str, float]) -> str:
        shown = ", ".join(f"{k} {averaged[k]:.4g}" for k in LOSS_KEYS if k in averaged)
        return (
            f"step {self.state.step}/{self.config.train.steps}: {shown}, "
            f"{averaged['samples_per_second']:.1f} samples/s, "
            f"data wait {100 * averaged['interval_data_wait_fraction']:.0f}%"
        )

    def run_params(self) -> dict[str, Any]:
        return {"parameters": self.parameter_count()}

    def start_files(self) -> dict[str, str]:
        return {"deepspeed.json": json.dumps(self.ds_config, indent=2)}

    def restore(self) -> None:
        self.reader.load_state_dict(self.state.reader)

    def save(self) -> None:
        self.state.reader = self.reader.state_dict()
        super().save()

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float] | None:
        """Retrieval on the held-out shards; with several named sources, on each of them,
        its metrics named ``<source>/<metric>``."""
        held_out = self.config.data.eval_shards
        if not held_out:
            return None
        if isinstance(held_out, list):
            metrics = {}
            for source in held_out:
                found = self.evaluate_shards(source.shards, f"eval {source.name}")
                metrics |= {f"{source.name}/{key}": value for key, value in found.items()}
        else:
            metrics = self.evaluate_shards(held_out, "eval")
        if self.world.is_main:
            step = self.state.step
            self.tracker.log_metrics({f"eval_{k}": v for k, v in metrics.items()}, step)
            path = self.output_dir / "eval" / f"step_{step:08d}.json"
            atomic_write_text(path, json.dumps({"step": step, **metrics}, indent=2))
            self.tracker.log_artifact(path, "eval")
        self.last_evaluation = metrics
        return metrics

    def evaluate_shards(self, shards: str, label: str) -> dict[str, float]:
        """Retrieval metrics over one held-out shard spec, each sample once across ranks."""
        world = self.world
        loader = build_loader(
            self.reader_config(shards, "eval"),
            rank=world.rank,
            world_size=world.world_size,
            tokenizer=self.tokenizer,
        )
        metrics = evaluate_retrieval(
            self.engine,
            loader,
            device=world.device,
            gather=all_gather_objects,
            max_batches=self.config.data.eval_max_batches or None,
        )
        if world.is_main:
            log.info("step %d %s: %s", self.state.step, label, format_retrieval(metrics))
        return metrics

    def final_report(self) -> dict[str, Any]:
        """The last evaluation and the run's summary (``summary.json``)."""
        evaluation = self.evaluate() or self.last_evaluation
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
