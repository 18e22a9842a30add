"""The model card (README.md) of an export: what it says, and the figures of the training run
it quotes. Text only: ``pretrain.export.write_model_card`` reads and writes the files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_shards.shard_set import read_index
from pretrain.consolidate import ConsolidatedCheckpoint


@dataclass
class ModelCard:
    """What the card says beyond what the config and weights show."""

    source: str = ""
    """Where the weights came from (checkpoint tag dir)."""
    step: int | None = None
    mlflow_run_id: str | None = None
    zero_stage: int | None = None
    world_size: int | None = None
    preset: str | None = None
    training_data: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    evaluation_heading: str = "Evaluation (held-out text-video retrieval, recall in %)"
    """What the ``evaluation`` figures are: the heading above them."""
    datasets: list[str] = field(default_factory=list)
    """Names of the data the model was trained on (no paths: the card travels)."""
    tags: list[str] = field(default_factory=lambda: ["text-to-video-retrieval"])
    metrics: list[str] = field(default_factory=lambda: ["recall"])
    """Hugging Face metric ids of the ``evaluation`` figures."""


def checkpoint_card(consolidated: ConsolidatedCheckpoint) -> ModelCard:
    """The card of a pretraining checkpoint: provenance, the shipped preset the run used, the
    shard set it trained on, and its held-out evaluation at or before the exported step."""
    run_config = consolidated.run.get("config") or {}
    train_shards = str(run_config.get("data", {}).get("train_shards", ""))
    return ModelCard(
        source=str(consolidated.tag_dir),
        datasets=[_name(train_shards)] if train_shards else [],
        step=consolidated.step,
        mlflow_run_id=consolidated.mlflow_run_id,
        zero_stage=consolidated.zero_stage,
        world_size=consolidated.world_size,
        preset=_preset(run_config.get("model", {})),
        training_data=_training_data(run_config, consolidated.trainer_states),
        evaluation=_evaluation(consolidated.output_dir, consolidated.step),
    )


def render_model_card(
    card: ModelCard,
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    tower_dirs: tuple[str, str],
) -> str:
    """README.md of an export, from its card, ``export_info.json``, ``config.json`` and
    ``video_preprocessing.json``; ``tower_dirs``: the (video, text) stock-transformers dirs."""
    video_dir, text_dir = tower_dirs
    video, text = config["video_config"], config["text_config"]
    lines = [
        *_front_matter(card),
        f"# {info['model_id']}",
        "",
        "Video-text dual encoder pretrained by vidrec: a VideoMAE video tower and a BERT text",
        "tower projected into one L2-normalized embedding space (contrastive, masked video and",
        "video-conditioned masked language modelling), for text-to-video retrieval and as the",
        "item encoder of the recommender.",
        "",
        "## Model",
        "",
        f"- preset: {card.preset or 'custom (no shipped config matches)'}",
        f"- parameters: {info['parameters']:,} (weights stored as {info['dtype']})",
        f"- video tower: VideoMAE, {video['num_hidden_layers']} layers × {video['hidden_size']}, "
        f"{video['num_frames']} frames of {video['image_size']} px, tubelets "
        f"{video['tubelet_size']}×{video['patch_size']}×{video['patch_size']}",
        f"- text tower: BERT, {text['num_hidden_layers']} layers × {text['hidden_size']}, "
        f"vocabulary {text['vocab_size']}, {config['text_pooling']} pooling",
        f"- joint embedding: {config['embed_dim']} dimensions, fusion layers: "
        f"{config['fusion_num_layers']}",
        f"- input: {preprocessing['num_frames']} frames (uniform), centre crop "
        f"{preprocessing['image_size']} px, fps {preprocessing.get('fps') or 'unknown'}; "
        f"text up to {preprocessing['max_text_length']} tokens",
        "",
        "## Provenance",
        "",
        f"- checkpoint: `{_name(card.source) or 'n/a'}` (step {card.step}, "
        f"ZeRO-{card.zero_stage}, "
        f"{card.world_size} ranks)",
        f"- MLflow run: {card.mlflow_run_id or 'n/a'}",
        f"- model_id: `{info['model_id']}` (hash of the weight files; embeddings carry it)",
        "",
    ]
    lines += _card_section_training(card)
    if card.evaluation:
        lines += [f"## {card.evaluation_heading}", ""]
        lines += [f"- {key}: {value}" for key, value in card.evaluation.items()]
        lines.append("")
    if info["components"]:
        lines += ["## Components", ""]
        for name, entry in info["components"].items():
            lines.append(f"- `{entry['file']}`: {entry['description'] or name}")
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "from pretrain.export import load_export",
        "exported = load_export(path)",
        "video_embeds = exported.embed_video(clips)   # (B, T, C, H, W) uint8 → (B, E)",
        "text_embeds = exported.embed_text(['a red square moving left'])",
        "```",
        "",
        f"`{video_dir}/` and `{text_dir}/` load with `transformers.AutoModel`",
        "alone (no vidrec code): they give token features, not the joint embedding (the",
        "projections, the video norm and the pooling are vidrec's). The text encoder's pooler",
        "is its starting point's, carried along frozen: vidrec does not use it.",
        "",
        "## Limits",
        "",
        "- Trained on the data above only; embeddings of other domains are not evaluated.",
        "- Clips must be preprocessed as in `video_preprocessing.json` (frame count, size,",
        "  centre crop); the model normalizes pixels itself.",
        "- Retrieval figures are from the held-out shards of the training run, small and",
        "  in-domain; they are not a benchmark result.",
        "",
    ]
    return "\n".join(lines)


def _card_section_training(card: ModelCard) -> list[str]:
    lines = []
    data = card.training_data
    if data:
        lines.append("## Training data\n")
        for key, value in data.items():
            lines.append(f"- {key}: {_shown(value)}")
        lines.append("")
    return lines


def _front_matter(card: ModelCard) -> list[str]:
    """The Hugging Face model card metadata block (YAML between ``---`` lines)."""
    import yaml

    metadata = {
        "library_name": "vidrec",
        "pipeline_tag": "feature-extraction",
        "tags": ["vidrec", "video-text", "videomae", "bert", *card.tags],
        "datasets": card.datasets,
        "metrics": card.metrics if card.evaluation else [],
    }
    metadata = {key: value for key, value in metadata.items() if value}
    return ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", ""]


def _name(path: str | None) -> str:
    """A path as the card shows it: its last part (the training machine's paths mean nothing
    where the export goes)."""
    return Path(path).name if path else ""


def _shown(value: Any) -> Any:
    """``value`` with absolute paths (the training machine's) cut to their last part."""
    if isinstance(value, list):
        return [_shown(item) for item in value]
    if isinstance(value, str) and value.startswith("/"):
        return _name(value)
    return value


def _training_data(run_config: Mapping[str, Any], trainer_states: list[dict]) -> dict[str, Any]:
    """Shard-set figures from the training set's index.json, and what the ranks consumed."""
    data = run_config.get("data", {})
    stats: dict[str, Any] = {"shards": data.get("train_shards", "")}
    content = read_index(str(data.get("train_shards", "")))
    if content is not None:
        settings = content.get("settings", {})
        stats["clips"] = content.get("total_samples")
        stats["shard files"] = content.get("total_shards")
        stats["hours of video"] = round(content.get("total_clip_seconds", 0) / 3600, 3)
        stats["clip format"] = (
            f"up to {settings.get('clip_seconds')} s at {settings.get('fps')} fps, "
            f"short side {settings.get('short_side')} px"
        )
    seen = [state.get("train_state", {}).get("samples_seen") for state in trainer_states]
    if seen and all(isinstance(value, int) for value in seen):
        stats["clips seen in training (all ranks)"] = sum(seen)
    if data.get("eval_shards"):
        stats["eval_shards"] = data["eval_shards"]
    return stats


def _evaluation(output_dir: Path, step: int) -> dict[str, Any]:
    """The newest ``eval/step_*.json`` at or before the exported step, if the run wrote one."""
    reports = sorted((output_dir / "eval").glob("step_*.json"))
    chosen = [path for path in reports if int(path.stem.split("_")[1]) <= step]
    if not chosen:
        return {}
    return json.loads(chosen[-1].read_text())


def _preset(model_section: Mapping[str, Any]) -> str | None:
    """The shipped launch config whose model section this run used, if one matches."""
    import yaml

    configs = Path(__file__).resolve().parent.parent / "launch" / "configs"
    for path in sorted(configs.glob("*.yaml")):
        try:
            shipped = (yaml.safe_load(path.read_text()) or {}).get("model", {})
        except yaml.YAMLError:
            continue
        if shipped and all(model_section.get(key) == value for key, value in shipped.items()):
            return path.stem
    return None
