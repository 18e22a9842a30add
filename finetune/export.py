"""Hand-off of a finetuned recommender: finetune output dir → self-contained export, and back.

``export_finetune`` reads a checkpoint of ``finetune.train`` (any ZeRO stage, any number of
ranks; merged by ``pretrain.consolidate`` in one plain process, no DeepSpeed) and writes the
pretrain export layout (``pretrain/export.py``) with the *finetuned* encoders, so
``load_export`` and stock ``AutoModel`` keep working on it, plus::

    <out>/
      components/item_tower.safetensors       the item tower's own layers (modality mix,
                                              projection, ID table of the hybrid model)
      components/user_tower.safetensors       SASRec user tower
      components/ranking_head.safetensors     logit scale (and the MLP of an "mlp" head, the
                                              popularity prior and its weight)
      components/item_embeddings.safetensors  (N + 1, D) embedding of every catalogue item
                                              (row 0 padding), plus warm / cold flags (N + 1,)
      catalogue.json                          item ids in table-row order (row i = ids[i - 1])
      item_index.faiss                        faiss index of the items (``finetune.item_index``)
      finetune.json                           resolved finetune config, provenance, metrics.json

Each component's ``config`` in ``export_info.json`` holds the constructor arguments of its
module, so loading needs neither the finetune config nor the training data. Modules are built
by ``finetune.recommender`` and the item table is computed once at export time from the cached
content (frozen encoders) or the run's clip store (encoders that trained) through
``finetune.item_source``, as training does; a serving process then scores users against it
with one matmul and embeds only genuinely new items.

``load_recommender`` reads it back (or builds the same object straight from a finetune output
dir with ``build_recommender``) after checks whose errors name the component, file or tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data_shards.atomic import atomic_write_text, file_sha256
from data_shards.text import load_tokenizer, resolve_text_model_dir
from finetune.batches import history_windows
from finetune.config import ConfigError, FinetuneConfig
from finetune.interactions import load_run_data
from finetune.item_content import (
    CACHE_FILE,
    read_clip_store,
    read_content_cache,
    tokenize_catalogue,
)
from finetune.item_index import INDEX_KEY, IndexSettings, ItemIndex, build_index
from finetune.item_source import ItemSource, refresh_predicted_prior
from finetune.model import PAD_ID, Recommender
from finetune.popularity import new_item_prior
from finetune.recommender import TIED_DECODER, RecommenderSpec, build_model, load_encoder
from pretrain.checkpoint import load_weights
from pretrain.config import from_dict
from pretrain.consolidate import consolidate_checkpoint, resolve_tag_dir
from pretrain.export import (
    CARD_FILE,
    DEFAULT_MAX_SHARD_SIZE,
    INFO_FILE,
    ExportComponent,
    ExportError,
    VideoPreprocessing,
    export_model,
    load_export,
    read_info,
    video_preprocessing,
)
from pretrain.model_card import ModelCard

log = logging.getLogger(__name__)

FINETUNE_FORMAT = 1
FINETUNE_FILE = "finetune.json"
CATALOGUE_FILE = "catalogue.json"
INDEX_FILE = "item_index.faiss"
ITEM_TOWER, USER_TOWER, HEAD, ITEMS = "item_tower", "user_tower", "ranking_head", "item_embeddings"
COMPONENTS = (ITEM_TOWER, USER_TOWER, HEAD, ITEMS)
"""Every component a recommender export must hold."""
ENCODER_PREFIX = "item_tower.encoder."
CARD_METRICS = ("hr@10", "ndcg@10", "mrr")
"""metrics.json figures copied to the model card (all of them stay in finetune.json)."""


# ============================================================================= the loaded object


@dataclass
class ExportedRecommender:
    """A finetuned recommender ready for inference: modules in eval mode, no process group.

    Items are addressed by table row (1..N; 0 is padding), as in training; ``item_index``
    maps catalogue ids to rows. Shapes: U users, L history window, N catalogue items,
    D embedding size.
    """

    model: Recommender
    """Item tower (finetuned encoders inside), user tower and head."""
    item_embeddings: torch.Tensor
    """(N + 1, D) every catalogue item, row ``PAD_ID`` zero."""
    item_ids: list[str]
    """Row i (1-based) is ``item_ids[i - 1]``."""
    cold: torch.Tensor
    """(N + 1,) bool: cold-start items (never seen in training, served from content)."""
    warm: torch.Tensor
    """(N + 1,) bool: items with training interactions (the hybrid tower's ID rows apply)."""
    tokenizer: Any
    preprocessing: VideoPreprocessing
    finetune: dict[str, Any]
    """``finetune.json``: resolved config, provenance, metrics."""
    directory: Path
    removed: torch.Tensor | None = None
    """(N + 1,) bool: items removed from serving (``vidrec index remove``): never recommended,
    still read in histories. None: none removed."""
    index: ItemIndex | None = None
    """The export's item index (None: an export older than the index; scoring is exhaustive)."""
    item_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.item_index = {item_id: row for row, item_id in enumerate(self.item_ids, start=1)}
        if self.removed is None:
            self.removed = torch.zeros(len(self.item_ids) + 1, dtype=torch.bool)

    @property
    def device(self) -> torch.device:
        return self.item_embeddings.device

    @property
    def max_history_length(self) -> int:
        """L: the most recent items a user state sees (as in training)."""
        return self.model.user_tower.position_embeddings.num_embeddings

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: Sequence[str]) -> list[int]:
        """Catalogue ids → table rows; a ``KeyError`` naming every unknown id."""
        unknown = [item_id for item_id in item_ids if item_id not in self.item_index]
        if unknown:
            raise KeyError(f"unknown item id(s), not in the catalogue: {', '.join(unknown[:20])}")
        return [self.item_index[item_id] for item_id in item_ids]

    @torch.no_grad()
    def user_states(
        self,
        histories: Sequence[Sequence[int]],
        timestamps: Sequence[Sequence[float] | None] | None = None,
    ) -> torch.Tensor:
        """(U, D) state after each history (item rows, oldest first), windowed to the last L
        items exactly as training and evaluation window them. ``timestamps`` (seconds, one per
        item) feed the time-gap embeddings; None → gaps unknown."""
        window = history_windows(histories, timestamps, self.max_history_length)
        device = self.device
        return self.model.last_user_states(
            self.item_embeddings[window.items.to(device)],
            (window.items != PAD_ID).to(device),
            window.time_gaps.to(device),
        )

    @torch.no_grad()
    def score_items(self, states: torch.Tensor) -> torch.Tensor:
        """(U, D) states → (U, N + 1) logits against the whole catalogue (row 0 included)."""
        rows = torch.arange(len(self.item_embeddings), device=self.device)
        return self.model.head.score_all(states.to(self.device), self.item_embeddings, rows)

    @torch.no_grad()
    def score_users(
        self, states: torch.Tensor, item_embedding: torch.Tensor, row: int | None = None
    ) -> torch.Tensor:
        """(U, D) states × (D,) one item → (U,) logits; ``row``: the item's table row, None
        for a new item (its popularity prior: 0, the catalogue mean, or with a predicted prior
        the one its embedding predicts)."""
        item_ids = torch.tensor([PAD_ID if row is None else row], device=self.device)
        head = self.model.head
        return head.score_all(states.to(self.device), item_embedding[None], item_ids)[:, 0]

    @torch.no_grad()
    def embed_new_item(
        self, text: str | None = None, clips: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:
        """A new item's embedding (D,) from its content alone, as the tower embeds a cold item:
        text (tokenized as the catalogue was) and/or clips, each (T, C, H, W) uint8 prepared
        as ``preprocessing`` says (``pretrain.pyfunc.load_clip`` does that from a file)."""
        if not text and not clips:
            raise ValueError("a new item needs text, a clip, or both")
        device = self.device
        video = mask = input_ids = attention = None
        if clips:
            video = torch.stack(list(clips))[None].to(device)  # (1, K, T, C, H, W)
            mask = torch.ones(1, len(clips), dtype=torch.bool, device=device)
        if text:
            tokens = self.tokenizer(
                [text],
                padding="max_length",
                truncation=True,
                max_length=self.preprocessing.max_text_length,
                return_tensors="pt",
            )
            input_ids = tokens["input_ids"].long().to(device)
            attention = tokens["attention_mask"].long().to(device)
        no_id = torch.zeros(1, dtype=torch.long, device=device)
        return self.model.item_tower(
            video, mask, input_ids, attention, item_ids=no_id, id_mask=no_id.bool()
        )[0]

    def to(self, device: str | torch.device) -> ExportedRecommender:
        self.model.to(device)
        self.item_embeddings = self.item_embeddings.to(device)
        self.removed = self.removed.to(device)  # masks candidate rows on the device
        return self


# ============================================================================= building it


def _module_config(module: torch.nn.Module, kind: str, dim: int) -> dict[str, Any]:
    """Constructor arguments that rebuild ``module`` (recorded in the component config)."""
    if kind == USER_TOWER:
        layer = module.encoder.layers[0]
        return {
            "dim": module.position_embeddings.embedding_dim,
            "num_layers": len(module.encoder.layers),
            "num_heads": module.num_heads,
            "max_length": module.position_embeddings.num_embeddings,
            "dropout": float(module.dropout.p),
            "num_time_buckets": module.num_time_buckets,
            "feedforward_multiplier": layer.linear1.out_features // layer.linear1.in_features,
        }
    if kind == HEAD:
        config = {
            "dim": dim,
            "kind": module.kind,
            "learn_temperature": isinstance(module.log_logit_scale, torch.nn.Parameter),
            "max_logit_scale": module.max_logit_scale,
            "normalize": module.normalize,
            "mlp_hidden": module.mlp[0].out_features if module.mlp is not None else 256,
        }
        if module.popularity_prior is not None:  # absent otherwise: older readers load it
            config["num_prior_items"] = len(module.popularity_prior) - 1
        if module.prior_predictor is not None:
            config["predicted_prior"] = True
        return config
    raise ValueError(kind)


def is_finetune_checkpoint(checkpoint: str | Path, tag: str | None = None) -> bool:
    """Whether ``checkpoint`` (output dir, checkpoints/ dir or tag dir) is a finetune run's:
    its tag's ``config.json`` has the finetune sections. False when it is not a checkpoint."""
    try:
        tag_dir = resolve_tag_dir(checkpoint, tag)
    except ExportError:
        return False
    config_file = tag_dir / "config.json"
    if not config_file.is_file():
        return False
    run_config = json.loads(config_file.read_text()).get("config", {})
    return {"encoder", "loss", "baselines"} <= set(run_config)


@dataclass
class _Built:
    """What ``build_recommender`` assembles from a run, before it is written or served."""

    recommender: ExportedRecommender
    consolidated: Any
    config: Any
    data_figures: dict[str, Any]


def _build(output_dir: str | Path, tag: str | None = None) -> _Built:
    consolidated = consolidate_checkpoint(output_dir, tag)
    run_config = consolidated.run.get("config") or {}
    if not {"encoder", "loss", "baselines"} <= set(run_config):
        raise ExportError(
            f"{consolidated.tag_dir}: not a finetune checkpoint (its config.json has no "
            "encoder/loss/baselines sections); export a pretraining run with pretrain.export"
        )
    try:
        config = from_dict(FinetuneConfig, run_config)
    except ConfigError as err:  # e.g. the interactions file moved since training
        raise ExportError(f"{consolidated.tag_dir / 'config.json'}: {err}") from err
    run_dir = consolidated.output_dir

    # --- the data the item table and the warm / cold flags come from, as in training
    settings = config.data
    data = load_run_data(settings)
    catalogue = data.catalogue
    num_items = data.num_items
    warm = torch.from_numpy(data.popularity() > 0)  # (N + 1,)
    cold = torch.from_numpy(data.cold_items.copy())  # (N + 1,)

    # --- the modules, as training builds them, then the checkpoint's weights
    encoder, _ = load_encoder(config.encoder, weights=False)
    model_config = encoder.config
    spec = RecommenderSpec.from_config(config, model_config.embed_dim, num_items)
    model = build_model(replace(spec, trainable_encoder_layers=0), encoder)  # inference
    load_weights(
        model, consolidated.state_dict, consolidated.tag_dir, ignore_missing=(TIED_DECODER,)
    )
    encoder.tie_weights()
    model.eval().requires_grad_(False)

    # --- every catalogue item through the item tower, as training's evaluation embeds them
    tokenizer = load_tokenizer(resolve_text_model_dir(model_config.text_model_dir))
    items = ItemSource(warm, content_batch_size=settings.content_batch_size)
    try:
        if config.encoder.mode == "frozen":
            cache_path = run_dir / CACHE_FILE
            if not cache_path.is_file():
                raise ExportError(f"{cache_path} is missing: the item content cache of the run")
            items.cache = read_content_cache(cache_path)
            if len(items.cache.video) != num_items + 1:
                raise ExportError(
                    f"{cache_path}: {len(items.cache.video) - 1} items, the catalogue has "
                    f"{num_items}"
                )
        else:
            items.clips = read_clip_store(run_dir)
            items.texts = tokenize_catalogue(catalogue, tokenizer, settings.max_text_length)
    except FileNotFoundError as err:
        raise ExportError(str(err)) from err
    table = items.table(model.item_tower, torch.device("cpu"))
    refresh_predicted_prior(model, items, torch.device("cpu"))

    preprocessing = video_preprocessing(
        model_config, settings.shards[0] if settings.shards else "", settings.max_text_length
    )
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    finetune = {
        "format": FINETUNE_FORMAT,
        "source": str(consolidated.tag_dir),
        "step": consolidated.step,
        "zero_stage": consolidated.zero_stage,
        "world_size": consolidated.world_size,
        "mlflow_run_id": consolidated.mlflow_run_id,
        "pretrain_run_id": metrics.get("pretrain_run_id"),
        "config": run_config,
        "metrics": metrics,
    }
    recommender = ExportedRecommender(
        model, table, list(catalogue.item_ids), cold, warm, tokenizer, preprocessing, finetune,
        run_dir,
    )  # fmt: skip
    figures = {
        "interactions": settings.interactions,
        "users": data.num_users,
        "items": num_items,
        "cold-start items": int(cold.sum()),
        "items with training interactions": int(warm.sum()),
        "encoder mode": config.encoder.mode,
        "finetune steps": consolidated.step,
    }
    return _Built(recommender, consolidated, config, figures)


def build_recommender(output_dir: str | Path, tag: str | None = None) -> ExportedRecommender:
    """The recommender of a finetune output dir, in memory (what ``export_finetune`` writes)."""
    return _build(output_dir, tag).recommender


# ============================================================================= writing


def _prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _card_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """metrics.json's test figures, flattened for the card: ``test/content/cold/hr@10``."""
    figures = {}
    for model_name, groups in metrics.get("metrics", {}).get("test", {}).items():
        for group, values in groups.items():
            if not isinstance(values, Mapping):
                figures[f"test/{model_name}/{group}"] = values
                continue
            for name in CARD_METRICS:
                if name in values:
                    figures[f"test/{model_name}/{group}/{name}"] = round(float(values[name]), 4)
    return figures


def export_finetune(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    tag: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    index: IndexSettings | None = None,
) -> Path:
    """Export one checkpoint of a finetune run (see the module docstring for the layout).
    ``dtype`` applies to the encoders; the recommender components stay fp32. ``index``: how
    the item index is built (default ``IndexSettings()``)."""
    built = _build(checkpoint, tag)
    recommender, consolidated = built.recommender, built.consolidated
    model = recommender.model
    state = model.state_dict()
    tower_state = {
        k: v for k, v in _prefixed(state, "item_tower.").items() if not k.startswith("encoder.")
    }
    catalogue_json = json.dumps({"item_ids": recommender.item_ids}).encode()
    dim = recommender.item_embeddings.shape[1]
    components = [
        ExportComponent(
            ITEM_TOWER,
            tower_state,
            config={
                "dim": dim,
                "num_item_ids": recommender.num_items if model.item_tower.id_embeddings else 0,
                "pooled_text": model.item_tower.text_projection is not None,
                "encoder_mode": built.config.encoder.mode,
            },
            description="item tower's own layers (modality mix, projection"
            + (", text projection" if model.item_tower.text_projection is not None else "")
            + (", warm-item ID table)" if model.item_tower.id_embeddings is not None else ")"),
        ),
        ExportComponent(
            USER_TOWER,
            _prefixed(state, "user_tower."),
            config=_module_config(model.user_tower, USER_TOWER, dim),
            description="SASRec user tower (history of item embeddings → user state)",
        ),
        ExportComponent(
            HEAD,
            _prefixed(state, "head."),
            config=_module_config(model.head, HEAD, dim),
            description=f"ranking head ({model.head.kind}"
            + (", popularity prior)" if model.head.popularity_prior is not None else ")"),
        ),
        ExportComponent(
            ITEMS,
            {
                "item_embeddings": recommender.item_embeddings,
                "warm": recommender.warm.to(torch.uint8),
                "cold": recommender.cold.to(torch.uint8),
            },
            config={
                "num_items": recommender.num_items,
                "dim": dim,
                "padding_row": PAD_ID,
                "catalogue_file": CATALOGUE_FILE,
                "catalogue_sha256": hashlib.sha256(catalogue_json).hexdigest(),
            },
            description=f"embeddings of all {recommender.num_items} catalogue items (row 0 "
            f"padding; ids in {CATALOGUE_FILE}), warm and cold-start flags",
        ),
    ]
    card = ModelCard(
        source=str(consolidated.tag_dir),
        step=consolidated.step,
        mlflow_run_id=consolidated.mlflow_run_id,
        zero_stage=consolidated.zero_stage,
        world_size=consolidated.world_size,
        preset=f"finetuned recommender ({built.config.encoder.mode} encoders)",
        training_data=built.data_figures,
        evaluation=_card_metrics(recommender.finetune["metrics"]),
        evaluation_heading="Evaluation (recommendation: leave-one-out test split, full "
        "catalogue ranking)",
        datasets=[Path(str(built.data_figures["interactions"])).name],
        tags=["recommendation", "cold-start"],
        metrics=["hit_rate", "ndcg", "mrr"],
    )
    out = export_model(
        model.item_tower.encoder,
        out_dir,
        tokenizer=recommender.tokenizer,
        preprocessing=recommender.preprocessing,
        card=card,
        components=components,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )
    (out / CATALOGUE_FILE).write_bytes(catalogue_json)
    atomic_write_text(out / FINETUNE_FILE, json.dumps(recommender.finetune, indent=2))
    item_index = build_index(
        model.head, recommender.item_embeddings, recommender.removed, index or IndexSettings()
    )
    item_index.write(out / INDEX_FILE)
    info = read_info(out)
    info[INDEX_KEY] = item_index.entry(INDEX_FILE, out / INDEX_FILE, recommender.num_items, dim, 0)
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    _append_card_usage(out)
    log.info("recommender exported to %s (%d items, D=%d)", out, recommender.num_items, dim)
    return out


def _append_card_usage(out: Path) -> None:
    """The recommender's own use section (``add_component`` rewrites the card without it)."""
    lines = [
        "",
        "## Recommender",
        "",
        "The encoders above are the finetuned item encoders; `components/` holds the rest of",
        f"the recommender and `{FINETUNE_FILE}` its config and full metrics. The evaluation",
        "figures are the finetune run's leave-one-out test split (next item, full ranking of",
        "the catalogue, seen items excluded; cold = cold-start targets), not the pretraining's.",
        "",
        "```python",
        "from finetune.export import load_recommender",
        "recommender = load_recommender(path)",
        "states = recommender.user_states([recommender.rows(['item_1', 'item_7'])])",
        "scores = recommender.score_items(states)   # (1, N + 1), column 0 is padding",
        "```",
        "",
        "or `vidrec recommend --model PATH --interactions FILE --users u1,u2 --top-k 10`.",
        "",
    ]
    card = out / CARD_FILE
    atomic_write_text(card, card.read_text() + "\n".join(lines))


# ============================================================================= loading


def load_recommender(
    export_dir: str | Path, device: str | torch.device = "cpu"
) -> ExportedRecommender:
    """Load a recommender export for inference (no DeepSpeed, no process group), checking
    that every component is there, intact (sha256) and of the shapes its config implies."""
    directory = Path(export_dir)
    info = read_info(directory)
    missing = [name for name in COMPONENTS if name not in info.get("components", {})]
    if missing:
        raise ExportError(
            f"{directory}: component(s) {', '.join(missing)} missing from export_info.json: "
            "not a recommender export (vidrec export --checkpoint <finetune output dir>)"
        )
    for name in COMPONENTS:
        entry = info["components"][name]
        path = directory / entry["file"]
        if not path.is_file():
            raise ExportError(f"{path} is missing: component {name} of the recommender")
        if entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            raise ExportError(f"{path}: content differs from the export (sha256 mismatch)")
    items_config = info["components"][ITEMS].get("config", {})
    catalogue_name = items_config.get("catalogue_file", CATALOGUE_FILE)
    for name in (FINETUNE_FILE, catalogue_name):
        if not (directory / name).is_file():
            raise ExportError(f"{directory / name} is missing: not a recommender export")
    index = ItemIndex.read(directory, info[INDEX_KEY]) if INDEX_KEY in info else None

    exported = load_export(directory, device="cpu", dtype="fp32")
    parts = exported.components
    catalogue_path = directory / catalogue_name
    if file_sha256(catalogue_path) != items_config.get("catalogue_sha256"):
        raise ExportError(f"{catalogue_path}: content differs from the export (sha256 mismatch)")
    item_ids = json.loads(catalogue_path.read_text())["item_ids"]

    spec = RecommenderSpec.from_components({name: parts[name].config for name in COMPONENTS})
    dim = spec.dim
    user_dim = parts[USER_TOWER].config.get("dim")
    if user_dim != dim:
        raise ExportError(f"{directory}: user tower dim {user_dim} != item tower dim {dim}")
    model = build_model(spec, exported.model)
    components = f"{directory}/components"
    # the item tower's encoders are the export's own, loaded above: only its layers here
    load_weights(
        model.item_tower,
        parts[ITEM_TOWER].tensors,
        f"{components}/{ITEM_TOWER}.safetensors",
        ignore_missing=("encoder.",),
    )
    for name, module in ((USER_TOWER, model.user_tower), (HEAD, model.head)):
        load_weights(module, parts[name].tensors, f"{components}/{name}.safetensors")

    table = parts[ITEMS].tensors["item_embeddings"]
    where = f"{directory}/components/{ITEMS}.safetensors"
    expected = (len(item_ids) + 1, dim)
    if tuple(table.shape) != expected:
        raise ExportError(
            f"{where}: tensor item_embeddings has shape {list(table.shape)}, expected "
            f"{list(expected)} ({len(item_ids)} items in {CATALOGUE_FILE} + padding, D={dim})"
        )
    flags = {"removed": torch.zeros(len(item_ids) + 1, dtype=torch.uint8)}
    for name in ("warm", "cold", "removed"):
        flag = parts[ITEMS].tensors.get(name, flags.get(name))
        if flag is None or tuple(flag.shape) != (len(item_ids) + 1,):
            shape = None if flag is None else list(flag.shape)
            raise ExportError(f"{where}: tensor {name} has shape {shape}, expected {expected[:1]}")
        flags[name] = flag.bool()

    model.eval().requires_grad_(False)
    extend_popularity_prior(model.head, table.float())
    finetune = json.loads((directory / FINETUNE_FILE).read_text())
    recommender = ExportedRecommender(
        model, table.float(), item_ids, flags["cold"], flags["warm"], exported.tokenizer,
        exported.preprocessing, finetune, directory, flags["removed"], index,
    )  # fmt: skip
    return recommender.to(device)


def extend_popularity_prior(head: torch.nn.Module, table: torch.Tensor) -> None:
    """Give the (N + 1, D) ``table``'s items added after training (``vidrec index add``) the
    prior of a new item (``new_item_prior``)."""
    prior = head.popularity_prior
    if prior is not None and len(prior) < len(table):
        added = new_item_prior(head, table[len(prior) :].to(prior.device))
        head.popularity_prior = torch.cat([prior, added.to(prior.dtype)])
