"""Finetuning for recommendation: setup → fit (train_step, evaluate, save) → final report.

Next-item training (SASRec style) of ``finetune.model``'s Recommender on every position of each
user's training sequence, with in-batch + uniform negatives and the logQ correction, the whole
loss inside the engine's forward (``finetune.objective``; ZeRO-3 weights exist only there);
then leave-one-out evaluation by full ranking, against two baselines trained and scored on the
same split in the same run: popularity and an ID-only SASRec. Runs unchanged under
``deepspeed``, ``torchrun``, SLURM and as a plain process (``pretrain/distributed.py``); files,
MLflow and progress bars come from global rank 0 only (``self.world.is_main``).

Shapes: B users per rank, L history window, D embedding size, S uniform negatives,
R next-item rows (real targets of the batch), N catalogue items (N + 1 rows with padding).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import yaml

from data_shards.atomic import atomic_write_text
from data_shards.text import load_tokenizer, resolve_text_model_dir
from finetune import report
from finetune.catalogue import read_catalogue, read_cold_items
from finetune.config import FinetuneConfig, deepspeed_config
from finetune.interactions import (
    EvalSet,
    InteractionData,
    Sequences,
    check_no_leakage,
    load_interactions,
)
from finetune.item_content import (
    CACHE_FILE,
    ClipStore,
    build_clip_store,
    load_or_compute_content,
    locate_clips,
    tokenize_catalogue,
)
from finetune.metrics import auc, evaluate_popularity, evaluate_ranking
from finetune.model import (
    PAD_ID,
    ContentEmbeddings,
    IDOnlyItemTower,
    ItemTower,
    RankingHead,
    Recommender,
    UserTower,
    mixed_sampling_log_q,
)
from finetune.objective import ItemInputs, NextItemBatch, NextItemObjective
from pretrain import checkpoint
from pretrain.config import PretrainConfig, from_dict, resolve_precision, to_dict
from pretrain.distributed import (
    World,
    any_rank,
    broadcast_object,
    init_distributed,
    mean_over_ranks,
)
from pretrain.model import VideoTextModel
from pretrain.tracking import Tracker, environment_params, flatten_params
from pretrain.train import lr_lambda

log = logging.getLogger(__name__)

# ============================================================================= encoder start


def load_encoder(config: FinetuneConfig) -> tuple[VideoTextModel, str | None]:
    """The pretrained encoders (fp32; DeepSpeed casts them if the run is bf16) and the MLflow
    run id of the pretraining they come from (``export_info.json`` of an export, the trainer
    state of a checkpoint)."""
    from pretrain.export import INFO_FILE, consolidate_checkpoint

    settings = config.encoder
    if settings.export_dir:
        directory = Path(settings.export_dir)
        info_file = directory / INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        model = VideoTextModel.from_pretrained(str(directory)).float()
        log.info("encoders from export %s (%s)", directory, info.get("model_id", "no info"))
        return model, info.get("mlflow_run_id")
    if settings.pretrain_dir:
        # pretrain/export.py's consolidation: reads the ZeRO files without unpickling code.
        consolidated = consolidate_checkpoint(settings.pretrain_dir)
        pretrain_config = from_dict(PretrainConfig, consolidated.run["config"])
        # Random towers, then the checkpoint's weights: no need to load MiniLM first.
        model = VideoTextModel(pretrain_config.model.build_config())
        result = model.load_state_dict(consolidated.state_dict, strict=False)
        missing = [key for key in result.missing_keys if "mlm_head.predictions.decoder" not in key]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{consolidated.tag_dir}: weights do not fit the model (missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]})"
            )
        model.tie_weights()
        log.info("encoders from pretrain checkpoint %s", consolidated.tag_dir)
        return model.float(), consolidated.mlflow_run_id
    log.warning("encoder.random_init: random encoders (tests only)")
    return VideoTextModel(settings.random_model.build_config()), None


# ============================================================================= user windows


@dataclass
class Windows:
    """Padded item windows of some users: right-padded with ``PAD_ID``."""

    items: torch.Tensor  # (B, W) long
    time_gaps: torch.Tensor  # (B, W) float seconds since the previous item, -1 unknown
    times: torch.Tensor  # (B, W) float64 timestamps, +inf at padding


def _windows(sequences: Sequences, times: np.ndarray, users: np.ndarray, width: int) -> Windows:
    """The last ``width`` items of each user's sequence (``times``: (total,) per item)."""
    items = np.zeros((len(users), width), dtype=np.int64)
    stamps = np.full((len(users), width), np.inf)
    for row, user in enumerate(users):
        start, stop = sequences.offsets[user], sequences.offsets[user + 1]
        start = max(start, stop - width)
        items[row, : stop - start] = sequences.items[start:stop]
        stamps[row, : stop - start] = times[start:stop]
    gaps = np.full_like(stamps, -1.0)
    with np.errstate(invalid="ignore"):  # inf - inf between padding slots
        gaps[:, 1:] = stamps[:, 1:] - stamps[:, :-1]
    gaps[~np.isfinite(gaps)] = -1.0
    return Windows(
        torch.from_numpy(items), torch.from_numpy(gaps).float(), torch.from_numpy(stamps)
    )


class UserSampler:
    """Batches of training users: a seeded permutation per epoch, the same on every rank, cut
    into global batches of which rank r takes slice r. The position is two integers in the
    trainer state, so a resumed job continues exactly where the checkpoint left off."""

    def __init__(self, users: np.ndarray, batch_per_rank: int, world: World, seed: int):
        self.users, self.batch, self.world, self.seed = users, batch_per_rank, world, seed
        self.global_batch = batch_per_rank * world.world_size
        if len(users) < self.global_batch:
            raise ValueError(
                f"{len(users)} users with >= 2 training items, fewer than one global batch "
                f"({self.global_batch}): lower parallel.micro_batch_size"
            )

    def next(self, state: TrainState) -> np.ndarray:
        if state.position + self.global_batch > len(self.users):
            state.epoch, state.position = state.epoch + 1, 0
        order = np.random.default_rng([self.seed, state.epoch]).permutation(self.users)
        chunk = order[state.position : state.position + self.global_batch]
        state.position += self.global_batch
        return chunk[self.world.rank * self.batch : (self.world.rank + 1) * self.batch]


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    position: int = 0
    """Users of this epoch's permutation consumed (all ranks)."""
    nonfinite_skipped: int = 0
    nonfinite_streak: int = 0
    tracking_run_id: str | None = None


# ============================================================================= optimizer


def parameter_groups(module: torch.nn.Module, lr: float, encoder_lr: float) -> list[dict]:
    """AdamW groups: encoder blocks at ``encoder.lr``, the rest at ``optimizer.lr``; no decay
    on biases, norms, embeddings, the logit scale and the modality mix."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim < 2 or "embeddings" in name
        in_encoder = name.startswith("item_tower.encoder.")
        groups.setdefault((no_decay, in_encoder), []).append(parameter)
    return [
        {"params": params, "decay": not no_decay, "lr": encoder_lr if encoder else lr}
        for (no_decay, encoder), params in sorted(groups.items())
    ]


def build_engine(module: torch.nn.Module, config: FinetuneConfig, world: World, steps: int,
                 lr: float, encoder_lr: float):  # fmt: skip
    optim = config.optimizer
    groups = parameter_groups(module, lr, encoder_lr)
    for group in groups:
        group["weight_decay"] = optim.weight_decay if group.pop("decay") else 0.0
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=optim.betas, eps=optim.eps)
    # pretrain's warmup + cosine, over this engine's own step count
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, world.world_size),
    )
    return engine, scheduler


# ============================================================================= the trainer


class Finetuner:
    """One finetuning job. ``fit()`` trains to ``train.steps``, evaluates the content model and
    the baselines on the validation and test splits, and returns the metrics."""

    def __init__(self, config: FinetuneConfig, world: World | None = None):
        self.config = config
        self.world = world = world or init_distributed()
        self.output_dir = Path(config.train.output_dir)
        self.resolved = to_dict(config)
        data_config, seed = config.data, config.train.seed
        torch.manual_seed(seed)  # the same initial weights on every rank

        # --- interactions
        catalogue = read_catalogue(data_config.catalogue, text_fields=data_config.text_fields)
        cold = read_cold_items(data_config.cold_items) if data_config.cold_items else set()
        self.data: InteractionData = load_interactions(
            data_config.interactions,
            catalogue,
            cold_items=cold,
            min_interactions=data_config.min_interactions,
        )
        check_no_leakage(self.data)
        self.num_items = self.data.num_items
        self.times_by_row = np.zeros(int(self.data.row.max()) + 1)
        self.times_by_row[self.data.row] = self.data.timestamp
        self.train_sequences = self.data.train_sequences()
        # per item of the training sequences, once: a step cuts windows out of it
        self.train_times = self.times_by_row[self.train_sequences.rows]
        self.popularity = self.data.popularity()  # (N + 1,)
        self.popularity_probability = torch.from_numpy(self.popularity / self.popularity.sum())
        self.warm = torch.from_numpy(self.popularity > 0)  # (N + 1,) items seen in training
        self.warm_ids = torch.nonzero(self.warm).squeeze(1)

        # --- encoders and item content
        encoder, self.pretrain_run_id = load_encoder(config)
        encoder.to(world.device)
        video = encoder.config.video_config
        self.tokenizer = load_tokenizer(resolve_text_model_dir(encoder.config.text_model_dir))
        self.texts = tokenize_catalogue(catalogue, self.tokenizer, data_config.max_text_length)
        sources = locate_clips(catalogue, data_config.shards)
        content_args = dict(
            num_frames=video.num_frames,
            size=video.image_size,
            batch_size=data_config.content_batch_size,
            workers=data_config.workers,
            world=world,
            tokenizer=self.tokenizer,
        )
        mode = config.encoder.mode
        self.cache: ContentEmbeddings | None = None
        self.clip_store: ClipStore | None = None
        if mode == "frozen":
            self.cache = load_or_compute_content(
                self.output_dir / CACHE_FILE, encoder, self.texts, sources, **content_args
            ).to(world.device)
        else:
            self.clip_store = build_clip_store(
                self.output_dir, sources, self.num_items, **content_args
            )

        # --- the content model
        model = config.model
        dim = model.dim or encoder.config.embed_dim
        item_tower = ItemTower(encoder, dim, self.num_items if model.id_embeddings else 0)
        {"frozen": item_tower.freeze_encoders, "full": item_tower.unfreeze_encoders}.get(
            mode, lambda: item_tower.unfreeze_top_k(config.encoder.top_k)
        )()
        self.dim = dim
        self.encoder_config = encoder.config
        self.zero3 = config.parallel.zero_stage == 3
        self.content_anchors = self._content_anchors()
        objective = self.objective(item_tower)
        self.engine, self.scheduler = build_engine(
            objective, config, world, config.train.steps, config.optimizer.lr, config.encoder.lr
        )
        self.generator = torch.Generator().manual_seed(seed * 1000 + world.rank)
        torch.manual_seed(seed * 1000 + world.rank)  # dropout differs per rank
        users = np.flatnonzero(self.train_sequences.lengths() >= 2)
        self.sampler = UserSampler(users, config.parallel.micro_batch_size, world, seed)
        self.pointwise = self.data.pointwise("train")
        self.state = TrainState()
        self.tracker = Tracker(config.tracking, enabled=world.is_main)
        self.history: list[dict[str, float]] = []

    def user_tower(self) -> UserTower:
        model = self.config.model
        return UserTower(
            self.dim,
            model.user_layers,
            model.user_heads,
            max_length=self.config.data.max_history_length,
            dropout=model.dropout,
            num_time_buckets=model.time_buckets if model.time_gaps else 0,
        )

    def head(self) -> RankingHead:
        return RankingHead(self.dim, self.config.model.head, self.config.model.temperature)

    def objective(self, item_tower: ItemTower | IDOnlyItemTower) -> NextItemObjective:
        """The recommender around ``item_tower`` with its training loss as ``forward``."""
        return NextItemObjective(
            item_tower, self.user_tower(), self.head(), bce_weight=self.config.loss.bce_weight
        )

    def _content_anchors(self) -> torch.Tensor:
        """Under ZeRO-3 with live encoders: an item with a clip and one with text, embedded
        with every batch so that each rank runs both encoders at every step (ZeRO-3 gathers a
        module's weights with a collective; a rank whose items all lack clips would skip the
        video encoder and the ranks would deadlock). Empty otherwise."""
        if not self.zero3 or self.clip_store is None:
            return torch.zeros(0, dtype=torch.long)
        anchors = []
        for present in (self.clip_store.has_clip, self.texts.text_mask):
            real = torch.nonzero(present.bool()[1:]).squeeze(1) + 1
            anchors += real[:1].tolist()
        return torch.tensor(anchors, dtype=torch.long)

    # ----------------------------------------------------------------------------- items

    def embed_items(self, module: Recommender, ids: torch.Tensor) -> torch.Tensor:
        """(K,) item ids → (K, D) embeddings through ``module``'s item tower."""
        tower, device = module.item_tower, self.world.device
        ids = ids.to(device)
        if isinstance(tower, IDOnlyItemTower):
            return tower(ids)
        id_mask = self.warm.to(device)[ids] & (ids != PAD_ID)
        if self.cache is not None:
            return tower.from_cache(self.cache, ids, id_mask)
        clips, clip_mask = self.clip_store.get(ids)
        texts = self.texts
        cpu_ids = ids.cpu()
        return tower(
            clips.to(device),
            clip_mask.to(device),
            texts.input_ids[cpu_ids].to(device),
            texts.attention_mask[cpu_ids].to(device),
            texts.text_mask[cpu_ids].to(device),
            item_ids=ids,
            id_mask=id_mask,
        )

    # ----------------------------------------------------------------------------- steps

    def item_inputs(self, module: Recommender, ids: torch.Tensor) -> ItemInputs:
        """What ``module``'s item tower needs to embed ``ids`` (K,), on the device: the ids
        alone (ID-only tower), the cached content (frozen encoders) or clips and text."""
        device = self.world.device
        inputs = ItemInputs(ids.to(device))
        if isinstance(module.item_tower, IDOnlyItemTower):
            return inputs
        inputs.id_mask = (self.warm[ids] & (ids != PAD_ID)).to(device)
        if self.cache is not None:
            if not module.item_tower.encoders_frozen:
                raise RuntimeError("cached content is stale once encoder layers train")
            inputs.content = self.cache[ids.to(device)]
            return inputs
        clips, clip_mask = self.clip_store.get(ids)
        inputs.clips, inputs.clip_mask = clips.to(device), clip_mask.to(device)
        inputs.input_ids = self.texts.input_ids[ids].to(device)
        inputs.attention_mask = self.texts.attention_mask[ids].to(device)
        inputs.text_mask = self.texts.text_mask[ids].to(device)
        return inputs

    def next_item_batch(self, module: Recommender, users: np.ndarray) -> NextItemBatch:
        """The users' windows, the step's uniform negatives, their logQ and the labelled rows
        (when ``loss.bce_weight`` > 0), as plain tensors for ``NextItemObjective``."""
        config, device = self.config, self.world.device
        length = config.data.max_history_length
        window = _windows(self.train_sequences, self.train_times, users, length + 1)  # (B, L + 1)
        num_negatives = config.loss.uniform_negatives
        draws = torch.randint(len(self.warm_ids), (num_negatives,), generator=self.generator)
        negatives = self.warm_ids[draws]  # (S,)
        bce = self._bce_rows(users, window) if config.loss.bce_weight > 0 else None
        bce_items = bce[2] if bce is not None else torch.zeros(0, dtype=torch.long)
        ids, inverse = torch.unique(
            torch.cat([window.items.flatten(), negatives, bce_items, self.content_anchors]),
            return_inverse=True,
        )  # (K,), every item embedded once
        count = window.items.numel()
        batch = NextItemBatch(
            items=self.item_inputs(module, ids),
            window_rows=inverse[:count].view(window.items.shape).to(device),
            time_gaps=window.time_gaps.to(device),
            negative_rows=inverse[count : count + num_negatives].to(device),
        )
        if config.loss.logq:
            targets = window.items[:, 1:]
            positive_ids = targets[targets != PAD_ID]  # (R,), row-major like the loss rows
            batch.log_q = mixed_sampling_log_q(
                torch.cat([positive_ids, negatives]),
                self.popularity_probability,
                batch_size=len(positive_ids),
                num_uniform=num_negatives,
                num_items=len(self.warm_ids),
            ).to(device)
        if bce is not None:
            user, position, _, labels = bce
            start = count + num_negatives
            batch.bce_user, batch.bce_position = user.to(device), position.to(device)
            batch.bce_item_rows = inverse[start : start + len(bce_items)].to(device)
            batch.bce_labels = labels.to(device)
        return batch

    def _bce_rows(self, users: np.ndarray, window: Windows):
        """The labelled training rows of the batch users, each scored with the state after the
        window items strictly before it (rows older than the window are left out): batch row
        (P,), window slot (P,), item id (P,), label (P,)."""
        rows = np.flatnonzero(np.isin(self.pointwise["user"], users))
        slot = {int(user): index for index, user in enumerate(users)}
        batch_index = np.array([slot[int(u)] for u in self.pointwise["user"][rows]], dtype=int)
        row_times = self.times_by_row[self.pointwise["row"][rows]]
        before = (window.times.numpy()[batch_index, :-1] < row_times[:, None]).sum(axis=1)
        keep = before >= 1  # a state exists: at least one window item precedes the row
        return (
            torch.from_numpy(batch_index[keep]).long(),
            torch.from_numpy(before[keep] - 1).long(),
            torch.from_numpy(self.pointwise["item"][rows][keep]).long(),
            torch.from_numpy(self.pointwise["label"][rows][keep]).float(),
        )

    def next_item_loss(self, engine, users: np.ndarray) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch, computed inside the engine's forward (ZeRO-3)."""
        return engine(self.next_item_batch(engine.module, users))

    def train_step(self, engine=None, state: TrainState | None = None) -> dict[str, float]:
        """One optimizer step (``grad_accum_steps`` micro-batches with finite losses)."""
        engine = engine or self.engine
        state = state or self.state
        started = time.perf_counter()
        totals: dict[str, float] = {}
        accumulated = 0
        while accumulated < self.config.parallel.grad_accum_steps:
            losses = self.next_item_loss(engine, self.sampler.next(state))
            if any_rank(not torch.isfinite(losses["loss"]).item(), self.world.device):
                state.nonfinite_skipped += 1
                state.nonfinite_streak += 1
                log.warning("non-finite loss skipped (%d in a row)", state.nonfinite_streak)
                if state.nonfinite_streak >= self.config.train.max_nonfinite_streak:
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
        accum = self.config.parallel.grad_accum_steps
        metrics = {name: value / accum for name, value in totals.items()}
        metrics["step_seconds"] = time.perf_counter() - started
        return metrics

    # ----------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def item_table(self, module: Recommender) -> torch.Tensor:
        """(N + 1, D) embeddings of every item (row ``PAD_ID`` included)."""
        ids = torch.arange(self.num_items + 1)
        chunk = self.config.data.content_batch_size if self.clip_store is not None else 65_536
        return torch.cat([self.embed_items(module, part) for part in ids.split(chunk)])

    @torch.no_grad()
    def user_states(self, module: Recommender, items: torch.Tensor, eval_set: EvalSet):
        """(U, D) state after each evaluation user's history window."""
        length = self.config.data.max_history_length
        times = self.times_by_row[eval_set.histories.rows]
        states = []
        chunk = self.config.train.eval_user_chunk
        for start in range(0, len(eval_set.users), chunk):
            users = np.arange(start, min(start + chunk, len(eval_set.users)))
            window = _windows(eval_set.histories, times, users, length)
            device = self.world.device
            states.append(
                module.last_user_states(
                    items[window.items.to(device)],
                    (window.items != PAD_ID).to(device),
                    window.time_gaps.to(device),
                )
            )
        return torch.cat(states)

    def evaluation_copy(self, module: Recommender) -> Recommender:
        """``module`` itself, or under ZeRO-3 a plain replica holding its gathered weights.

        ZeRO-3 weights are whole only inside the engine's forward, and its module hooks
        re-partition even gathered weights after each submodule call, so evaluation (which
        calls tower and head methods directly, some on rank 0 only) runs on a replica without
        hooks. Every rank must call this together: the gather is a collective."""
        if not self.zero3:
            return module
        tower = module.item_tower
        with torch.random.fork_rng(devices=[]):  # random init must not shift training's RNG
            if isinstance(tower, IDOnlyItemTower):
                replica_tower = IDOnlyItemTower(self.num_items, self.dim)
            else:
                ids = tower.id_embeddings.num_embeddings - 1 if tower.id_embeddings else 0
                encoder = VideoTextModel(self.encoder_config)
                encoder.tie_weights()
                replica_tower = ItemTower(encoder, self.dim, ids)
                layers = tower.trainable_encoder_layers
                if layers == "all":
                    replica_tower.unfreeze_encoders()
                else:
                    replica_tower.unfreeze_top_k(layers)  # 0: frozen, as the cache requires
            replica = Recommender(replica_tower, self.user_tower(), self.head())
        replica.requires_grad_(False)
        targets = dict(replica.named_parameters()) | dict(replica.named_buffers())
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                targets[name].data = tensor.data.detach().clone()  # dtype and device as trained
        return replica.train(module.training)

    def evaluate_model(self, module: Recommender, splits=("valid", "test")) -> dict[str, Any]:
        """Full-ranking metrics of one recommender per split: ``{split: {group: {metric}}}``.
        Every rank embeds (the same calls everywhere); rank 0 ranks; the result is broadcast."""
        module = self.evaluation_copy(module)
        was_training = module.training
        module.eval()
        items = self.item_table(module)
        results = {}
        for split in splits:
            eval_set = self.data.eval_set(split)
            states = self.user_states(module, items, eval_set)
            if not self.world.is_main:
                continue
            results[split] = self._rank(
                eval_set, lambda ex, it, s=states: module.head.score_all(s[ex], items[it])
            )
            results[split]["auc"] = self._auc(module, split, states, items)
        module.train(was_training)
        return broadcast_object(results)

    def _rank(self, eval_set: EvalSet, score_fn) -> dict[str, Any]:
        cold = torch.from_numpy(eval_set.is_cold)
        flat = evaluate_ranking(
            torch.from_numpy(eval_set.targets),
            score_fn=score_fn,
            num_items=self.num_items + 1,
            histories=eval_set.histories,
            groups={"warm": ~cold, "cold": cold},
            user_chunk=self.config.train.eval_user_chunk,
        )
        return report.nest(flat)

    def _auc(self, module, split: str, states: torch.Tensor, items: torch.Tensor) -> float:
        rows = self.data.pointwise(split)
        if len(np.unique(rows["label"])) < 2:
            return math.nan
        users = torch.from_numpy(rows["user"]).to(states.device)
        scores = module.head.score_pairs(states[users], items[torch.from_numpy(rows["item"])])
        return auc(scores, rows["label"])

    def evaluate_popularity(self) -> dict[str, Any]:
        results = {}
        for split in ("valid", "test"):
            eval_set = self.data.eval_set(split)
            cold = torch.from_numpy(eval_set.is_cold)
            flat = evaluate_popularity(
                self.popularity,
                torch.from_numpy(eval_set.targets),
                eval_set.histories,
                groups={"warm": ~cold, "cold": cold},
            )
            results[split] = report.nest(flat)
            rows = self.data.pointwise(split)
            results[split]["auc"] = auc(self.popularity[rows["item"]], rows["label"])
        return results

    def train_id_sasrec(self) -> Recommender:
        """The ID-only SASRec baseline: same user tower, head, loss and sampler, its own
        engine; trained from scratch each time (seconds; not checkpointed)."""
        baselines = self.config.baselines
        torch.manual_seed(self.config.train.seed + 1)
        module = self.objective(IDOnlyItemTower(self.num_items, self.dim))
        engine, _ = build_engine(
            module, self.config, self.world, baselines.id_sasrec_steps, baselines.id_sasrec_lr,
            baselines.id_sasrec_lr,
        )  # fmt: skip
        state = TrainState()
        engine.train()
        for _ in range(baselines.id_sasrec_steps):
            metrics = self.train_step(engine, state)
            if self.world.is_main and (state.step % max(1, self.config.train.log_every) == 0):
                self.tracker.log_metrics({"id_sasrec_loss": metrics["loss"]}, state.step)
        log.info("ID-SASRec baseline: %d steps, last loss %.4f", state.step, metrics["loss"])
        return engine.module

    # ----------------------------------------------------------------------------- checkpoints

    def resume_or_start(self) -> None:
        # other encoders or other data make the content cache, the item table and the
        # sampler's position meaningless, beside what pretraining refuses
        incompatible = (*checkpoint.INCOMPATIBLE_FIELDS, "encoder", "data")
        state = checkpoint.load(
            self.engine, self.output_dir, self.world, self.resolved, incompatible
        )
        if state is not None:
            self.state = TrainState(**state["train_state"])
            checkpoint.restore_rng(state["rng"], self.generator)
        if self.world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.yaml", yaml.safe_dump(self.resolved))
            atomic_write_text(
                self.output_dir / "data_report.json",
                json.dumps(self.data.report.to_dict(), indent=2, default=str),
            )
        params = flatten_params(self.resolved) | environment_params()
        params |= {
            "world_size": self.world.world_size,
            "encoder.pretrain_run_id": self.pretrain_run_id or "none",
            "data.num_users": self.data.num_users,
            "data.num_items": self.num_items,
            "precision.resolved": resolve_precision(self.config.parallel.precision),
        }
        tags = {"vidrec.stage": "finetune"}
        if self.pretrain_run_id:
            tags["vidrec.pretrain_run_id"] = self.pretrain_run_id
        self.tracker.start(params=params, tags=tags, resume_run_id=self.state.tracking_run_id)
        self.state.tracking_run_id = broadcast_object(self.tracker.run_id)
        if self.world.is_main:
            for name in ("config.yaml", "data_report.json"):
                self.tracker.log_artifact(self.output_dir / name, "config")

    def save(self) -> None:
        checkpoint.save_training(
            self.engine, self.output_dir, self.state, self.generator, self.tracker, self.world,
            self.resolved, self.config.train.keep_last,
        )  # fmt: skip

    # ----------------------------------------------------------------------------- fit

    def log_step(self, metrics: dict[str, float]) -> None:
        averaged = mean_over_ranks(metrics, self.world.device)
        averaged["lr"] = self.scheduler.get_last_lr()[0]
        averaged["nonfinite_skipped"] = self.state.nonfinite_skipped
        self.history.append({"step": self.state.step, **averaged})
        if self.world.is_main:
            self.tracker.log_metrics(averaged, step=self.state.step)
            log.info(
                "step %d/%d: loss %.4f (%.2f s/step)",
                self.state.step,
                self.config.train.steps,
                averaged["loss"],
                averaged["step_seconds"],
            )

    def fit(self) -> dict[str, Any]:
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
                    valid = self.evaluate_model(self.engine.module, splits=("valid",))
                    if self.world.is_main:
                        self.tracker.log_metrics(
                            report.mlflow_metrics({"valid": {"content": valid["valid"]}}), step
                        )
                if train.save_every and step % train.save_every == 0 and step < train.steps:
                    self.save()
            if self.state.step > start_step:
                self.save()
            results = self.evaluate()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.world.is_main:
                self.tracker.log_loss_curve(keys=("loss", "loss_bce", "id_sasrec_loss"))
            self.tracker.finish(status=status)
        return results

    def evaluate(self) -> dict[str, Any]:
        """The final report: content model and baselines on valid and test."""
        by_model = {"content": self.evaluate_model(self.engine.module)}
        if self.config.baselines.id_sasrec:
            by_model["id_sasrec"] = self.evaluate_model(self.train_id_sasrec())
        if self.config.baselines.popularity:
            by_model["popularity"] = self.evaluate_popularity()
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
