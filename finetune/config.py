"""Finetune configuration: one typed tree, loaded from YAML with ``--set a.b=c`` overrides.

The generic machinery (``from_dict``, ``apply_overrides``, the ``parallel``, ``optimizer`` and
``tracking`` sections) is pretrain's, imported rather than copied; the DeepSpeed JSON is derived
from this tree by ``pretrain.config.deepspeed_config`` (it reads only ``parallel`` and
``optimizer.grad_clip``). Every check runs before any rank starts (``vidrec finetune --check``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pretrain.config import (
    ConfigError,
    ModelSettings,
    OptimizerSettings,
    ParallelSettings,
    TrainSettings,
    apply_overrides,
    deepspeed_config,
    from_dict,
    load_yaml,
)
from pretrain.tracking import TrackingSettings

__all__ = [
    "BaselineSettings",
    "ConfigError",
    "EncoderSettings",
    "FinetuneConfig",
    "FinetuneDataSettings",
    "FinetuneModelSettings",
    "FinetuneTrainSettings",
    "LossSettings",
    "deepspeed_config",
    "load_finetune_config",
]


@dataclass
class FinetuneDataSettings:
    interactions: str = ""
    """Interaction log (CSV, TSV, JSONL, Parquet, RecBole ``.inter``; see finetune.tables)."""
    catalogue: str = ""
    """Item catalogue (e.g. the synthetic ``items.jsonl``); "" = items known by id only."""
    shards: list[str] = field(default_factory=list)
    """Shard directories holding the items' clips (e.g. shards_warm and shards_cold); the
    clips are matched to items by the ``item_id`` of their JSON member."""
    cold_items: str | list[str] = ""
    """Cold-start item ids: a list of ids, or a file: ``synth.json``, a manifest/catalogue, or
    a text file ("" = none)."""
    min_interactions: int = 3
    """Users with fewer engaged interactions are dropped (>= 3: train + valid + test)."""
    max_history_length: int = 50
    """L: the most recent items a user state sees (training windows and evaluation)."""
    text_fields: list[str] | None = None
    """Catalogue columns joined into an item's text; None = every text column."""
    max_text_length: int = 32
    """Tokens per item text."""
    content_batch_size: int = 32
    """Clips or texts per encoder forward when caching content or building the clip store."""
    workers: int = 0
    """DataLoader workers per rank when reading clips from the shards."""

    def __post_init__(self):
        if self.min_interactions < 3:
            raise ConfigError("data.min_interactions must be >= 3 (leave-one-out needs 3)")
        if self.max_history_length < 2:
            raise ConfigError("data.max_history_length must be >= 2")
        if self.max_text_length < 2 or self.content_batch_size < 1 or self.workers < 0:
            raise ConfigError("data.max_text_length >= 2, content_batch_size >= 1, workers >= 0")


@dataclass
class EncoderSettings:
    export_dir: str = ""
    """A directory written by ``VideoTextModel.save_pretrained`` (``pretrain/export.py``)."""
    pretrain_dir: str = ""
    """A pretrain ``train.output_dir``: its latest checkpoint is consolidated and loaded."""
    random_init: bool = False
    """Random encoders built from ``random_model`` — for tests only, never a real run."""
    random_model: ModelSettings = field(default_factory=ModelSettings)
    """Architecture of the random encoders (pretrain's ``model`` section)."""
    mode: Literal["frozen", "top_k", "full"] = "frozen"
    """frozen: content computed once and cached (fast path); top_k: the top ``top_k`` blocks
    of both towers train end to end; full: every encoder block on the embedding path trains."""
    top_k: int = 1
    """Blocks per tower that train in ``top_k`` mode."""
    lr: float = 1e-5
    """Learning rate of the encoder blocks that train (the other parts use optimizer.lr)."""

    def __post_init__(self):
        sources = [bool(self.export_dir), bool(self.pretrain_dir), self.random_init]
        if sum(sources) != 1:
            raise ConfigError(
                "encoder: set exactly one of encoder.export_dir, encoder.pretrain_dir or "
                "encoder.random_init (tests only)"
            )
        if self.mode == "top_k" and self.top_k < 1:
            raise ConfigError("encoder.top_k must be >= 1 in top_k mode")
        if self.lr <= 0:
            raise ConfigError("encoder.lr must be > 0")


@dataclass
class FinetuneModelSettings:
    dim: int = 0
    """D, item and user embedding size; 0 = the encoder's joint embedding size E."""
    user_layers: int = 2
    user_heads: int = 2
    dropout: float = 0.1
    """Dropout of the user tower (SASRec)."""
    time_gaps: bool = True
    """Embed the (log-bucketed) time since the previous interaction in the user tower."""
    time_buckets: int = 24
    head: Literal["dot", "mlp"] = "dot"
    """dot: cosine × learnable scale (retrieval); mlp: pairwise MLP (re-ranking, costly)."""
    temperature: float = 0.05
    id_embeddings: bool = False
    """Hybrid item tower: content plus a learned ID embedding for warm items. Off: on the demo
    data the hybrid ranks below content alone, warm and cold-start (BENCHMARKS.md)."""
    item_text: Literal["joint", "pooled"] = "joint"
    """What the item tower reads of an item's text. joint: its pretrained joint embedding,
    fixed while the encoders are frozen. pooled: the text tower's pooled sentence features
    through the item tower's own copy of the pretrained text projection, which trains even
    with frozen encoders: it can recover what the joint space dropped (what captions say
    that the pretrained video tower cannot see), at the joint embedding on the first step."""
    popularity_prior: bool = False
    """Add w · prior to every score, the prior the item's log(1 + training count) centred over
    the items with training interactions and w a learned scalar (0 at init): popularity, which
    content cannot express. Items without training interactions (cold-start, new) get 0, the
    catalogue mean. Never applied to the ID-SASRec baseline."""
    predicted_prior: bool = False
    """With ``popularity_prior``: the prior is predicted from the item's content embedding by a
    small head fitted to the centred log training counts, plus a learned per-ID correction of
    warm items that drops out with the ID (``id_dropout``); cold-start and new items get the
    prediction instead of 0, in training, evaluation, the export and ``vidrec recommend``
    (``finetune.popularity``)."""
    id_dropout: float = 0.0
    """p in [0, 1): at each training step every item of the batch loses its learned ID (the
    hybrid tower's ID embedding and the predicted prior's correction) with probability p,
    drawn from the run's seeded generator (DropoutNet): the model learns to score from
    content alone as well as with the ID. Items without training interactions never have an
    ID, in training or serving; evaluation and serving keep every warm item's. Needs
    ``id_embeddings`` or ``predicted_prior``."""

    def __post_init__(self):
        if self.dim < 0 or self.user_layers < 1 or self.user_heads < 1:
            raise ConfigError("model.dim >= 0, model.user_layers >= 1, model.user_heads >= 1")
        if self.dim and self.dim % self.user_heads:
            raise ConfigError(f"model.dim {self.dim} must divide by model.user_heads")
        if self.time_gaps and self.time_buckets < 2:
            raise ConfigError("model.time_buckets must be >= 2")
        if not 0 < self.temperature <= 1:
            raise ConfigError("model.temperature must be in (0, 1]")
        if self.predicted_prior and not self.popularity_prior:
            raise ConfigError("model.predicted_prior needs model.popularity_prior: true")
        if not 0 <= self.id_dropout < 1:
            raise ConfigError(f"model.id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.id_dropout > 0 and not (self.id_embeddings or self.predicted_prior):
            raise ConfigError(
                "model.id_dropout > 0 needs model.id_embeddings or model.predicted_prior (an "
                "ID to drop)"
            )


@dataclass
class LossSettings:
    uniform_negatives: int = 128
    """S: negatives per step drawn uniformly from the warm items, on top of in-batch ones."""
    logq: bool = True
    """Subtract log of each candidate's expected count in the step's candidate set (the in-batch
    targets of uniformly drawn users, plus the uniform negatives): ``mixed_sampling_log_q``."""
    bce_weight: float = 0.0
    """Weight of binary cross-entropy on labelled training rows (skips = 0); 0 = off."""
    row_weights: bool = False
    """Weight each next-item row's loss by its target interaction's ``weight`` column (e.g.
    the watch ratio; 1 where the log has none), normalised over the rows of a micro-batch."""

    def __post_init__(self):
        if self.uniform_negatives < 0 or self.bce_weight < 0:
            raise ConfigError("loss.uniform_negatives and loss.bce_weight must be >= 0")


@dataclass
class BaselineSettings:
    popularity: bool = True
    """Rank every item by its training count (evaluated in the same run, same split)."""
    id_sasrec: bool = True
    """Train an ID-only SASRec (same user tower and head) in-process and evaluate it."""
    id_sasrec_steps: int = 200
    id_sasrec_lr: float = 1e-3
    content_knn: bool = True
    """Score items by the cosine of their pretrained content embedding to the mean of the
    user's history (training-free: what the trained user tower adds over pretraining)."""

    def __post_init__(self):
        if self.id_sasrec_steps < 1 or self.id_sasrec_lr <= 0:
            raise ConfigError("baselines.id_sasrec_steps >= 1 and id_sasrec_lr > 0")


@dataclass
class FinetuneTrainSettings(TrainSettings):
    """Pretraining's loop settings (steps, seed, log/eval/save cadence, keep_last, non-finite
    streak), with finetune defaults and the ranking chunk."""

    steps: int = 500
    output_dir: str = "outputs/finetune"
    """Checkpoints, content cache, clip store, metrics.json, plots, MLflow sqlite file."""
    eval_user_chunk: int = 256
    """Users scored at once in full ranking."""


@dataclass
class FinetuneConfig:
    data: FinetuneDataSettings = field(default_factory=FinetuneDataSettings)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    """Where the encoders come from (no default: a real run never starts from random ones)."""
    model: FinetuneModelSettings = field(default_factory=FinetuneModelSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    optimizer: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=1e-3))
    """``lr`` is the head / user tower / item-tower-combine rate; ``encoder.lr`` the encoders'."""
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    """``micro_batch_size`` counts *users* per rank per micro-batch (each gives up to L
    next-item rows)."""
    train: FinetuneTrainSettings = field(default_factory=FinetuneTrainSettings)
    tracking: TrackingSettings = field(
        default_factory=lambda: TrackingSettings(experiment="vidrec-finetune")
    )

    def __post_init__(self):
        if not self.tracking.output_dir:
            self.tracking.output_dir = self.train.output_dir
        if not self.data.interactions:
            raise ConfigError("data.interactions is empty: nothing to finetune on")
        for name in ("interactions", "catalogue", "cold_items"):
            value = getattr(self.data, name)
            if value and isinstance(value, str) and not Path(value).is_file():
                raise ConfigError(f"data.{name}: {value} is not a file")
        for index, directory in enumerate(self.data.shards):
            if not Path(directory).is_dir():
                raise ConfigError(f"data.shards[{index}]: {directory} is not a directory")
        encoder = self.encoder
        if encoder.export_dir and not (Path(encoder.export_dir) / "config.json").is_file():
            raise ConfigError(f"encoder.export_dir: {encoder.export_dir} has no config.json")
        if encoder.pretrain_dir and not (Path(encoder.pretrain_dir) / "checkpoints").is_dir():
            raise ConfigError(f"encoder.pretrain_dir: {encoder.pretrain_dir} has no checkpoints/")
        if self.optimizer.warmup_steps >= self.train.steps and self.train.steps > 1:
            raise ConfigError("optimizer.warmup_steps must be < train.steps")


def load_finetune_config(path: str | Path | None, overrides: list[str] = ()) -> FinetuneConfig:
    data: dict[str, Any] = load_yaml(path) if path else {}
    return from_dict(FinetuneConfig, apply_overrides(data, list(overrides)))
