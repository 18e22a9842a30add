"""Finetuning for recommendation on the shared loop (``pretrain.trainer``).

Next-item training (SASRec style) of the recommender on every position of each user's
training sequence, with in-batch + uniform negatives and the logQ correction, the whole loss
inside the engine's forward (``finetune.objective``; ZeRO-3 weights exist only there); then
leave-one-out evaluation by full ranking (``finetune.evaluate``) against baselines scored on
the same split in the same run: popularity, an ID-only SASRec, and content-kNN (the pretrained
content alone, no training). Runs unchanged
under ``deepspeed``, ``torchrun``, SLURM and as a plain process; files, MLflow and progress
bars come from global rank 0 only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from data_shards.atomic import atomic_write_bytes, atomic_write_text, file_sha256
from data_shards.text import load_tokenizer, resolve_text_model_dir
from finetune import report
from finetune.batches import NextItemBatcher, SamplerState, UserSampler
from finetune.config import FinetuneConfig, deepspeed_config
from finetune.evaluate import RankingEvaluation, gathered_copy
from finetune.interactions import InteractionData, check_no_leakage, load_run_data
from finetune.item_content import (
    CACHE_FILE,
    ClipReading,
    build_clip_store,
    load_or_compute_content,
    locate_clips,
    tokenize_catalogue,
)
from finetune.item_source import ItemSource
from finetune.model import ContentEmbeddings, Recommender
from finetune.objective import NextItemBatch
from finetune.recommender import RecommenderSpec, build_model, load_encoder
from pretrain import checkpoint, trainer
from pretrain.checkpoint import load_weights
from pretrain.distributed import World, broadcast_object, init_distributed
from pretrain.trainer import Trainer

log = logging.getLogger(__name__)

ID_SASREC_FILE = "id_sasrec.safetensors"
"""The trained ID-SASRec baseline, reused by a rerun with the same fingerprint."""


def build_engine(module: torch.nn.Module, config: FinetuneConfig, world: World, steps: int,
                 lr: float, encoder_lr: float):  # fmt: skip
    """The engine of ``module``: AdamW with encoder blocks at ``encoder_lr`` and the rest at
    ``lr``, pretraining's warmup + cosine over ``steps``."""
    groups = trainer.parameter_groups(
        module, lr, config.optimizer.weight_decay, ("item_tower.encoder.",), encoder_lr
    )
    optimizer, scheduler = trainer.build_optimizer(groups, config.optimizer, steps)
    return trainer.build_engine(
        module, optimizer, scheduler, deepspeed_config(config, world.world_size)
    )


class Finetuner(Trainer):
    """One finetuning job. ``fit()`` trains to ``train.steps``, evaluates the recommender
    (``content`` or ``hybrid`` by its item tower, ``+pop`` with the popularity prior) and the
    baselines on the validation and test splits, and returns the metrics."""

    stage = "finetune"
    loss_curve_keys = ("loss", "loss_bce", "loss_prior", "id_sasrec_loss")
    # other encoders or other data make the content cache, the item table and the sampler's
    # position meaningless, beside what pretraining refuses
    incompatible_fields = (*checkpoint.INCOMPATIBLE_FIELDS, "encoder", "data")
    state_class = SamplerState

    def __init__(self, config: FinetuneConfig, world: World | None = None):
        super().__init__(config, world or init_distributed())
        world, data_config = self.world, config.data
        torch.manual_seed(config.train.seed)  # the same initial weights on every rank

        # --- interactions
        self.data: InteractionData = load_run_data(data_config)
        check_no_leakage(self.data)
        self.batcher = NextItemBatcher(
            self.data, config.loss, data_config.max_history_length, config.model.id_dropout
        )
        self.evaluation = RankingEvaluation(
            self.data,
            self.batcher.times_by_row,
            data_config.max_history_length,
            config.train.eval_user_chunk,
            world,
        )

        # --- encoders and item content
        encoder, self.pretrain_run_id = load_encoder(config.encoder)
        encoder.to(world.device)
        self.encoder_config = encoder.config
        self.tokenizer = load_tokenizer(resolve_text_model_dir(encoder.config.text_model_dir))
        self.pretrained_text_projection = None
        """The encoder's text projection before training, with pooled item text (content-kNN)."""
        self.items, self.pretrained_content = self._item_source(encoder, self.data.catalogue)

        # --- the recommender
        self.model_name = report.model_name(
            config.model.id_embeddings, config.model.popularity_prior, config.model.predicted_prior
        )
        self.spec = RecommenderSpec.from_config(config, encoder.config.embed_dim, self.num_items)
        self.zero3 = config.parallel.zero_stage == 3
        # under ZeRO-3, items embedded with every batch so that every rank runs both encoders
        self.anchors = self.items.anchors() if self.zero3 else torch.zeros(0, dtype=torch.long)
        objective = build_model(self.spec, encoder, loss_bce_weight=config.loss.bce_weight)
        if config.model.popularity_prior and not config.model.predicted_prior:
            objective.head.set_popularity_prior(torch.from_numpy(self.batcher.popularity))
        self.engine, self.scheduler = build_engine(
            objective, config, world, config.train.steps, config.optimizer.lr, config.encoder.lr
        )
        self.seed_rank()  # dropout and negatives differ per rank
        users = self.batcher.trainable_users()
        self.sampler = UserSampler(
            users, config.parallel.micro_batch_size, world, config.train.seed
        )

    @property
    def num_items(self) -> int:
        return self.data.num_items

    def _item_source(self, encoder, catalogue) -> tuple[ItemSource, ContentEmbeddings | None]:
        """Cached content (frozen encoders) or the clip store and texts (encoders that train),
        and the pretrained encoders' content of every item: the frozen mode's cache, which the
        content-kNN baseline also reads (encoders that train: computed here, before they do;
        None when neither needs it)."""
        data_config, world, config = self.config.data, self.world, self.config
        video = encoder.config.video_config
        tokenizer = self.tokenizer
        texts = tokenize_catalogue(catalogue, tokenizer, data_config.max_text_length)
        sources = locate_clips(catalogue, data_config.shards)
        reading = ClipReading(
            video.num_frames,
            video.image_size,
            data_config.content_batch_size,
            data_config.workers,
            world,
            tokenizer,
        )
        items = ItemSource(
            torch.from_numpy(self.batcher.popularity > 0),
            texts=texts,
            content_batch_size=data_config.content_batch_size,
        )
        frozen = config.encoder.mode == "frozen"
        content = None
        if frozen or config.baselines.content_knn:
            content = load_or_compute_content(
                self.output_dir / CACHE_FILE,
                encoder,
                texts,
                sources,
                reading,
                pooled_text=config.model.item_text == "pooled",
            ).to(world.device)
            if config.model.item_text == "pooled":
                # content-kNN projects with it after training, when under ZeRO-3 the
                # encoder's own is a shard: a whole copy, taken before the engine exists
                self.pretrained_text_projection = copy.deepcopy(encoder.text_projection)
        if frozen:
            items.cache = content
        else:
            items.clips = build_clip_store(self.output_dir, sources, self.num_items, reading)
        return items, content

    # ----------------------------------------------------------------------------- loop hooks

    def next_micro_batch(self) -> NextItemBatch:
        return self.next_item_batch(self.state, self.items)

    def next_item_batch(
        self, state: SamplerState, items: ItemSource, generator: torch.Generator | None = None
    ) -> NextItemBatch:
        """The next users' batch; negatives drawn from ``generator`` (default: the run's)."""
        users = self.sampler.next(state)
        generator = generator or self.generator
        return self.batcher.batch(users, items, generator, self.world.device, self.anchors)

    def micro_batch_loss(self, batch: NextItemBatch) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch, computed inside the engine's forward (ZeRO-3)."""
        return self.engine(batch)

    def progress(self, averaged: dict[str, float]) -> str:
        return f"{super().progress(averaged)} ({averaged['step_seconds']:.2f} s/step)"

    def run_params(self) -> dict[str, Any]:
        return {
            "encoder.pretrain_run_id": self.pretrain_run_id or "none",
            "data.num_users": self.data.num_users,
            "data.num_items": self.num_items,
        }

    def run_tags(self) -> dict[str, str]:
        return {"vidrec.pretrain_run_id": self.pretrain_run_id} if self.pretrain_run_id else {}

    def start_files(self) -> dict[str, str]:
        report_text = json.dumps(self.data.report.to_dict(), indent=2, default=str)
        return {"data_report.json": report_text}

    # ----------------------------------------------------------------------------- evaluation

    def evaluate_model(
        self, module: Recommender, items: ItemSource, splits=("valid", "test")
    ) -> dict[str, Any]:
        """Full-ranking metrics of one recommender per split (every rank calls this)."""
        if self.zero3:
            module = gathered_copy(module, self.spec, self.encoder_config)
        return self.evaluation.evaluate(module, items, splits)

    def evaluate(self) -> dict[str, Any]:
        """The periodic evaluation: the recommender on the validation split."""
        valid = self.evaluate_model(self.engine.module, self.items, splits=("valid",))
        if self.world.is_main:
            metrics = report.mlflow_metrics({"valid": {self.model_name: valid["valid"]}})
            self.tracker.log_metrics(metrics, self.state.step)
        return valid

    def id_sasrec_fingerprint(self) -> str:
        """What the baseline depends on: the data, the settings its model, loss, engine and
        seeds come from, the world size, and the data files' content (not the main training's
        length, its encoders, what its item tower reads (IDs added to content, joint or pooled
        text, ID dropout) or whether its head adds a popularity prior (counted or predicted),
        the other baselines, or where the
        run is written: a content and a hybrid run share one baseline)."""
        resolved, data = self.resolved, self.config.data
        sections = ("data", "model", "loss", "baselines", "optimizer", "parallel")
        record = {name: resolved[name] for name in sections}
        not_in_baseline = (
            "id_embeddings", "item_text", "popularity_prior", "predicted_prior", "id_dropout"
        )  # fmt: skip
        record["model"] = {k: v for k, v in record["model"].items() if k not in not_in_baseline}
        record["baselines"] = {
            k: v for k, v in record["baselines"].items() if k.startswith("id_sasrec")
        }
        record |= {
            "seed": resolved["train"]["seed"],
            "max_nonfinite_streak": resolved["train"]["max_nonfinite_streak"],
            "world_size": self.world.world_size,
            "files": [
                file_sha256(path) if isinstance(path, str) and path else ""
                for path in (data.interactions, data.catalogue, data.cold_items)
            ],
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def id_sasrec(self) -> tuple[Recommender, ItemSource]:
        """The ID-only SASRec baseline as a plain module, trained once per fingerprint and
        reused from ``id_sasrec.safetensors`` on a rerun (every rank calls this together)."""
        ids = ItemSource(self.items.warm)
        path, fingerprint = self.output_dir / ID_SASREC_FILE, self.id_sasrec_fingerprint()
        reuse = False
        if self.world.is_main and path.is_file():
            with safe_open(str(path), "pt") as handle:
                reuse = (handle.metadata() or {}).get("fingerprint") == fingerprint
        if broadcast_object(reuse):
            log.info("ID-SASRec baseline reused from %s", path)
            tensors = load_file(str(path), device=str(self.world.device))
            dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
            module = build_model(self.spec, None).to(self.world.device, dtype)  # as trained
            load_weights(module, tensors, path)
            return module.requires_grad_(False), ids
        module = self.train_id_sasrec(ids)
        if self.zero3:
            module = gathered_copy(module, self.spec, None)
        if self.world.is_main:
            tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            atomic_write_bytes(path, save(tensors, metadata={"fingerprint": fingerprint}))
        return module, ids

    def train_id_sasrec(self, ids: ItemSource) -> Recommender:
        """The ID-only SASRec baseline: same user tower, head, loss and sampler, its own
        engine, from scratch."""
        baselines, train = self.config.baselines, self.config.train
        torch.manual_seed(train.seed + 1)
        # its own negatives stream, so that it depends on the baseline settings and the data
        # only, not on how long the main training drew from the run's generator
        generator = torch.Generator().manual_seed((train.seed + 1) * 1000 + self.world.rank)
        module = build_model(self.spec, None, loss_bce_weight=self.config.loss.bce_weight)
        engine, _ = build_engine(
            module, self.config, self.world, baselines.id_sasrec_steps, baselines.id_sasrec_lr,
            baselines.id_sasrec_lr,
        )  # fmt: skip
        state = SamplerState()
        engine.train()
        started = time.perf_counter()
        for _ in range(baselines.id_sasrec_steps):
            metrics = trainer.optimizer_step(
                engine,
                state,
                lambda: self.next_item_batch(state, ids, generator),
                engine,
                grad_accum_steps=self.config.parallel.grad_accum_steps,
                max_nonfinite_streak=train.max_nonfinite_streak,
                device=self.world.device,
            )
            logged = state.step % max(1, train.log_every) == 0
            if self.world.is_main and logged:
                self.tracker.log_metrics({"id_sasrec_loss": metrics["loss"]}, state.step)
                log.info(
                    "ID-SASRec baseline step %d/%d: loss %.4f (%.0f s)",
                    state.step,
                    baselines.id_sasrec_steps,
                    metrics["loss"],
                    time.perf_counter() - started,
                )
        log.info("ID-SASRec baseline: %d steps, last loss %.4f", state.step, metrics["loss"])
        return engine.module

    def final_report(self) -> dict[str, Any]:
        """The recommender and the baselines on valid and test: metrics.json, a comparison
        plot and MLflow metrics."""
        baselines = self.config.baselines
        by_model = {self.model_name: self.evaluate_model(self.engine.module, self.items)}
        if baselines.id_sasrec:
            by_model[report.ID_SASREC] = self.evaluation.evaluate(*self.id_sasrec())
        if baselines.popularity:
            by_model[report.POPULARITY] = self.evaluation.popularity(self.batcher.popularity)
        if baselines.content_knn:
            by_model[report.CONTENT_KNN] = self.evaluation.content_knn(
                self.pretrained_content, self.pretrained_text_projection
            )
        results = {
            "step": self.state.step,
            "encoder_mode": self.config.encoder.mode,
            "pretrain_run_id": self.pretrain_run_id,
            "mlflow_run_id": self.state.tracking_run_id,
            "num_users": self.data.num_users,
            "num_items": self.num_items,
            "cold_targets": dict(self.data.report.cold_targets),
            "first_loss": self.history[0]["loss"] if self.history else None,
            "last_loss": self.history[-1]["loss"] if self.history else None,
            "metrics": {
                split: {name: model[split] for name, model in by_model.items()}
                for split in ("valid", "test")
            },
        }
        if self.world.is_main:
            metrics_path = self.output_dir / "metrics.json"
            atomic_write_text(metrics_path, json.dumps(results, indent=2))
            plot_path = report.plot_comparison(results["metrics"]["test"],
                                               self.output_dir / "comparison.png")  # fmt: skip
            log.info("report: %s, %s", metrics_path, plot_path)
            self.tracker.log_metrics(report.mlflow_metrics(results["metrics"]), self.state.step)
            self.tracker.log_artifact(metrics_path, "metrics")
            self.tracker.log_artifact(plot_path, "metrics")
        return results


def run(config: FinetuneConfig) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Finetuner(config).fit()
