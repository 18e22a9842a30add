"""The one construction path of a recommender: encoder source → ``RecommenderSpec`` →
modules. Training, its evaluation replica, export and ``load_recommender`` all build through
``build_model``; a spec comes from a finetune config or from an export's component configs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.config import EncoderSettings, FinetuneConfig
from finetune.model import IDOnlyItemTower, ItemTower, RankingHead, Recommender, UserTower
from finetune.objective import NextItemObjective
from pretrain.checkpoint import load_weights
from pretrain.config import PretrainConfig, from_dict
from pretrain.consolidate import consolidate_checkpoint, resolve_tag_dir
from pretrain.export import INFO_FILE
from pretrain.model import VideoTextConfig, VideoTextModel

log = logging.getLogger(__name__)

TIED_DECODER = "mlm_head.predictions.decoder"
"""The encoders' MLM decoder is tied to the word embeddings; checkpoints may leave it out."""


# ============================================================================= encoder source


def load_encoder(settings: EncoderSettings, weights: bool = True):
    """The encoders a finetune run starts from and the MLflow run id of the pretraining they
    come from (``export_info.json`` of an export, the trainer state of a checkpoint).

    ``weights=False``: the same architecture, randomly initialised, for a caller that loads
    its own weights over it (a finetune checkpoint holds the encoders it trained)."""
    if settings.export_dir:
        directory = Path(settings.export_dir)
        if not weights:
            return VideoTextModel(VideoTextConfig.from_pretrained(str(directory))), None
        info_file = directory / INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        model = VideoTextModel.from_pretrained(str(directory)).float()
        log.info("encoders from export %s (%s)", directory, info.get("model_id", "no info"))
        return model, info.get("mlflow_run_id")
    if settings.pretrain_dir:
        if not weights:
            run = json.loads((resolve_tag_dir(settings.pretrain_dir) / "config.json").read_text())
            return VideoTextModel(_pretrain_architecture(run)), None
        # the ZeRO files, read without unpickling code
        consolidated = consolidate_checkpoint(settings.pretrain_dir)
        # Random towers, then the checkpoint's weights: no need to load MiniLM first.
        model = VideoTextModel(_pretrain_architecture(consolidated.run))
        load_weights(model, consolidated.state_dict, consolidated.tag_dir)
        model.tie_weights()
        log.info("encoders from pretrain checkpoint %s", consolidated.tag_dir)
        return model.float(), consolidated.mlflow_run_id
    if weights:
        log.warning("encoder.random_init: random encoders (tests only)")
    return VideoTextModel(settings.random_model.build_config()), None


def _pretrain_architecture(run: Mapping[str, Any]) -> VideoTextConfig:
    return from_dict(PretrainConfig, run["config"]).model.build_config()


# ============================================================================= the spec


@dataclass
class RecommenderSpec:
    """Constructor arguments of a recommender's modules (D = ``dim``)."""

    dim: int
    num_items: int
    """N catalogue items (the ID tables have N + 1 rows, row 0 padding)."""
    id_embeddings: bool
    """Hybrid item tower: content plus learned IDs of warm items."""
    pooled_text: bool = False
    """The item tower reads pooled text features through its own text projection."""
    popularity_prior: bool = False
    """The head adds a learned weight times each item's popularity prior (content models)."""
    predicted_prior: bool = False
    """The prior is predicted from content (``finetune.popularity``), with ``popularity_prior``."""
    user_tower: dict[str, Any] = field(default_factory=dict)
    """``UserTower`` arguments after ``dim``."""
    head: dict[str, Any] = field(default_factory=dict)
    """``RankingHead`` arguments after ``dim``."""
    trainable_encoder_layers: int | Literal["all"] = 0
    """Encoder blocks per tower that train: 0 frozen (inference, cached content), "all"."""

    @classmethod
    def from_config(cls, config: FinetuneConfig, embed_dim: int, num_items: int):
        """The spec a finetune run trains (``embed_dim``: the encoders' joint size E)."""
        model, encoder = config.model, config.encoder
        return cls(
            dim=model.dim or embed_dim,
            num_items=num_items,
            id_embeddings=model.id_embeddings,
            pooled_text=model.item_text == "pooled",
            popularity_prior=model.popularity_prior,
            predicted_prior=model.predicted_prior,
            user_tower={
                "num_layers": model.user_layers,
                "num_heads": model.user_heads,
                "max_length": config.data.max_history_length,
                "dropout": model.dropout,
                "num_time_buckets": model.time_buckets if model.time_gaps else 0,
            },
            head={"kind": model.head, "temperature": model.temperature},
            trainable_encoder_layers={"frozen": 0, "full": "all"}.get(encoder.mode, encoder.top_k),
        )

    @classmethod
    def from_components(cls, configs: Mapping[str, Mapping[str, Any]]):
        """The spec an export records: its ``item_tower``, ``user_tower``, ``ranking_head``
        and ``item_embeddings`` component configs (see ``finetune.export``)."""
        tower, head = configs["item_tower"], dict(configs["ranking_head"])
        items = configs["item_embeddings"]
        user = {k: v for k, v in configs["user_tower"].items() if k != "dim"}
        head.pop("dim", None)
        prior_items = int(head.pop("num_prior_items", 0))
        predicted = bool(head.pop("predicted_prior", False))
        # The temperature only initialises the (stored) log scale; any valid value will do.
        head.setdefault("temperature", 1 / min(20.0, head["max_logit_scale"]))
        return cls(
            dim=int(tower["dim"]),
            # the catalogue the modules were trained on; items added later (vidrec index add)
            # live in the item table only
            num_items=int(items.get("trained_items", items["num_items"])),
            id_embeddings=int(tower["num_item_ids"]) > 0,
            pooled_text=bool(tower.get("pooled_text", False)),
            popularity_prior=prior_items > 0,
            predicted_prior=predicted,
            user_tower=user,
            head=head,
        )


def build_model(
    spec: RecommenderSpec, encoder: VideoTextModel | None, loss_bce_weight: float | None = None
) -> Recommender:
    """The recommender of ``spec`` around ``encoder`` (None: the ID-only item tower of the
    ID-SASRec baseline, which never has the popularity prior: its ID embeddings can learn
    popularity, and it stays one baseline for every content model). ``loss_bce_weight``
    given: the training objective (a ``Recommender`` whose forward is the loss, same parameter
    names). A popularity prior starts at zero: the trainer sets it from its training counts
    (``RankingHead.set_popularity_prior``), a checkpoint or an export holds it."""
    prior = spec.popularity_prior and encoder is not None
    if encoder is None:
        item_tower = IDOnlyItemTower(spec.num_items, spec.dim)
    else:
        item_tower = ItemTower(
            encoder,
            spec.dim,
            spec.num_items if spec.id_embeddings else 0,
            pooled_text=spec.pooled_text,
        )
        layers = spec.trainable_encoder_layers
        if layers == "all":
            item_tower.unfreeze_encoders()
        else:
            item_tower.unfreeze_top_k(layers)  # 0: frozen
    user_tower = UserTower(spec.dim, **spec.user_tower)
    head = RankingHead(
        spec.dim,
        **spec.head,
        num_prior_items=spec.num_items if prior else 0,
        predicted_prior=prior and spec.predicted_prior,
    )
    if loss_bce_weight is None:
        return Recommender(item_tower, user_tower, head)
    return NextItemObjective(item_tower, user_tower, head, bce_weight=loss_bce_weight)
