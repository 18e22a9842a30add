"""The training loop every stage shares: state, accumulation with the non-finite skip, the
log / eval / save cadence, resume, save, step logging and the tracker's lifecycle.

A stage subclasses ``Trainer`` and supplies its micro-batches and their loss, its evaluation,
its final report and what it saves beside the weights (torchtitan's ``Trainer``, litgpt's
shared ``fit``); it builds its own model and engine. The one rule: every rank runs the same
collectives in the same order, so the non-finite decision is taken together (``any_rank``).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml

from data_shards.atomic import atomic_write_text
from pretrain import checkpoint
from pretrain.checkpoint import TrainState
from pretrain.config import OptimizerSettings, resolve_precision, to_dict
from pretrain.distributed import World, any_rank, broadcast_object, mean_over_ranks
from pretrain.tracking import Tracker, environment_params, flatten_params

log = logging.getLogger(__name__)


# ============================================================================= optimizer


def parameter_groups(
    module: torch.nn.Module,
    lr: float,
    weight_decay: float,
    prefixes: tuple[str, ...] = (),
    prefix_lr: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, scales (ndim < 2) and embeddings; parameters
    whose names start with one of ``prefixes`` train at ``prefix_lr``."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim < 2 or "embeddings" in name
        prefixed = name.startswith(prefixes) if prefixes else False
        groups.setdefault((no_decay, prefixed), []).append(parameter)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": prefix_lr if prefixed else lr,
        }
        for (no_decay, prefixed), params in sorted(groups.items())
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


def build_optimizer(
    groups: list[dict[str, Any]], settings: OptimizerSettings, steps: int, offload: bool = False
):
    """AdamW over ``groups`` (DeepSpeed's CPU Adam when the optimizer state is offloaded) and
    warmup + cosine over ``steps``."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=settings.lr, betas=settings.betas, eps=settings.eps
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings, steps))
    return optimizer, scheduler


def build_engine(module: torch.nn.Module, optimizer, scheduler, ds_config: dict[str, Any]):
    """The DeepSpeed engine around ``module`` and the scheduler it steps."""
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, scheduler


# ============================================================================= one step


def optimizer_step(
    engine,
    state: TrainState,
    next_micro_batch: Callable[[], Any],
    micro_batch_loss: Callable[[Any], dict[str, torch.Tensor]],
    *,
    grad_accum_steps: int,
    max_nonfinite_streak: int,
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step over ``grad_accum_steps`` micro-batches with finite losses: their
    mean losses, ``step_seconds`` and ``data_wait_fraction`` (time in ``next_micro_batch``).

    A micro-batch whose loss is not finite on some rank is skipped by every rank before
    backward, counted, and replaced by the next one: the step still averages
    ``grad_accum_steps`` micro-batches, and DeepSpeed's accumulation boundary (it counts
    micro-batches) stays on this step's last one. ``max_nonfinite_streak`` skips in a row stop
    the run."""
    started = time.perf_counter()
    data_wait = 0.0
    totals: dict[str, float] = {}
    accumulated = 0
    while accumulated < grad_accum_steps:
        fetch_start = time.perf_counter()
        batch = next_micro_batch()
        data_wait += time.perf_counter() - fetch_start
        losses = micro_batch_loss(batch)
        if any_rank(not torch.isfinite(losses["loss"]).item(), device):
            # Every rank skips this micro-batch together (the collective above), before
            # backward: nothing non-finite reaches the gradients or the optimizer.
            state.nonfinite_skipped += 1
            state.nonfinite_streak += 1
            log.warning("non-finite loss skipped (%d in a row)", state.nonfinite_streak)
            if state.nonfinite_streak >= max_nonfinite_streak:
                raise FloatingPointError(
                    f"{state.nonfinite_streak} non-finite losses in a row at step "
                    f"{state.step} (train.max_nonfinite_streak)"
                )
            continue
        state.nonfinite_streak = 0
        engine.backward(losses["loss"])
        engine.step()
        accumulated += 1
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.item()
    state.step += 1
    elapsed = time.perf_counter() - started
    metrics = {name: value / grad_accum_steps for name, value in totals.items()}
    return metrics | {"step_seconds": elapsed, "data_wait_fraction": data_wait / elapsed}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ============================================================================= the loop


class Trainer:
    """One training job: ``fit()`` resumes or starts, trains to ``train.steps`` with the
    configured cadence, saves, and returns ``final_report()``.

    A stage's ``__init__`` calls this one, builds its engine (``engine``, ``scheduler``),
    calls ``seed_rank()`` after drawing the initial weights, and implements the hooks below."""

    stage = ""
    """MLflow tag ``vidrec.stage``."""
    loss_curve_keys: tuple[str, ...] = ("loss",)
    incompatible_fields: tuple[str, ...] = checkpoint.INCOMPATIBLE_FIELDS
    """Config fields a checkpoint must share with the run that resumes it."""
    state_class: type[TrainState] = TrainState

    def __init__(self, config, world: World):
        self.config = config
        self.world = world
        self.output_dir = Path(config.train.output_dir)
        self.resolved = to_dict(config)
        self.tracker = Tracker(config.tracking, enabled=world.is_main)
        self.state = self.state_class()
        self.history: list[dict[str, float]] = []
        self.engine = self.scheduler = self.generator = None

    def seed_rank(self) -> None:
        """A different stream per rank for dropout, masks and negatives, from here on (the
        initial weights, drawn before, are the same on every rank)."""
        seed = self.config.train.seed * 1000 + self.world.rank
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)

    # ----------------------------------------------------------------------------- hooks

    def next_micro_batch(self) -> Any:
        """The stage's next micro-batch (its fetch time counts as data wait)."""
        raise NotImplementedError

    def micro_batch_loss(self, batch: Any) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch, ``"loss"`` the one to minimize."""
        raise NotImplementedError

    def evaluate(self) -> Any:
        """The periodic evaluation (every ``train.eval_every`` steps); None: none."""
        return None

    def final_report(self) -> Any:
        """After the last save: the final evaluation and what ``fit()`` returns."""
        raise NotImplementedError

    def run_params(self) -> dict[str, Any]:
        """MLflow params beside the config, the environment, world size and precision."""
        return {}

    def run_tags(self) -> dict[str, str]:
        return {}

    def start_files(self) -> dict[str, str]:
        """Files written to the output directory (and logged as config artifacts) at start,
        beside ``config.yaml``."""
        return {}

    def restore(self) -> None:
        """Resume the stage's data position from ``self.state``, just loaded."""

    def step_metrics(self, averaged: dict[str, float]) -> dict[str, float]:
        """Stage metrics added to a logged step's rank-averaged ones."""
        return {}

    def progress(self, averaged: dict[str, float]) -> str:
        """The log line of a logged step."""
        return f"step {self.state.step}/{self.config.train.steps}: loss {averaged['loss']:.4f}"

    # ----------------------------------------------------------------------------- steps

    def train_step(self) -> dict[str, float]:
        return optimizer_step(
            self.engine,
            self.state,
            self.next_micro_batch,
            self.micro_batch_loss,
            grad_accum_steps=self.config.parallel.grad_accum_steps,
            max_nonfinite_streak=self.config.train.max_nonfinite_streak,
            device=self.world.device,
        )

    def log_step(self, metrics: dict[str, float]) -> None:
        averaged = mean_over_ranks(metrics, self.world.device)
        averaged["lr"] = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            averaged["grad_norm"] = float(grad_norm)
        averaged["peak_memory_mb"] = peak_memory_mb(self.world.device)
        averaged["nonfinite_skipped"] = self.state.nonfinite_skipped
        averaged |= self.step_metrics(averaged)
        self.history.append({"step": self.state.step, **averaged})
        if self.world.is_main:
            self.tracker.log_metrics(averaged, step=self.state.step)
            log.info("%s", self.progress(averaged))

    # ----------------------------------------------------------------------------- checkpoints

    def resume_or_start(self) -> None:
        saved = checkpoint.load(
            self.engine, self.output_dir, self.world, self.resolved, self.incompatible_fields
        )
        if saved is not None:
            self.state = self.state_class(**saved["train_state"])
            self.restore()
            checkpoint.restore_rng(saved["rng"], self.generator)
        files = {"config.yaml": yaml.safe_dump(self.resolved)} | self.start_files()
        if self.world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                atomic_write_text(self.output_dir / name, text)
        params = flatten_params(self.resolved) | environment_params()
        params |= {
            "world_size": self.world.world_size,
            "precision.resolved": resolve_precision(self.config.parallel.precision),
        }
        self.tracker.start(
            params=params | self.run_params(),
            tags={"vidrec.stage": self.stage} | self.run_tags(),
            resume_run_id=self.state.tracking_run_id,
        )
        self.state.tracking_run_id = broadcast_object(self.tracker.run_id)
        if self.world.is_main:
            for name in files:
                self.tracker.log_artifact(self.output_dir / name, "config")

    def save(self) -> None:
        checkpoint.save_training(
            self.engine, self.output_dir, self.state, self.generator, self.tracker, self.world,
            self.resolved, self.config.train.keep_last,
        )  # fmt: skip

    # ----------------------------------------------------------------------------- fit

    def fit(self) -> Any:
        train = self.config.train
        self.resume_or_start()
        self.engine.train()
        status = "FAILED"
        try:
            start_step = self.state.step
            while self.state.step < train.steps:
                metrics = self.train_step()
                step = self.state.step
                if train.log_every and (step % train.log_every == 0 or step == train.steps):
                    self.log_step(metrics)
                if train.eval_every and step % train.eval_every == 0 and step < train.steps:
                    self.evaluate()
                    self.engine.train()
                if train.save_every and step % train.save_every == 0 and step < train.steps:
                    self.save()
            if self.state.step > start_step:
                # (a job resumed at its last step has nothing new; rewriting the checkpoint
                # that `latest` names, in place, could leave it half-written if killed)
                self.save()
            report = self.final_report()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.world.is_main:
                self.tracker.log_loss_curve(keys=self.loss_curve_keys)
            self.tracker.finish(status=status)
        return report
