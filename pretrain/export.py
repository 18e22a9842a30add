"""Hand-off of a pretrained model: DeepSpeed checkpoint → self-contained directory, and back.

``export_checkpoint`` reads any checkpoint of ``pretrain.train`` (ZeRO 0-3, saved by any number
of ranks) in one plain process, with no process group and no DeepSpeed engine (merged by
``pretrain.consolidate.consolidate_checkpoint``), and writes::

    <out>/
      config.json                  VideoTextConfig (AutoModel-registered, model_type
                                   "vidrec-video-text"); the tower directories it started from
                                   are not needed any more and are dropped
      model.safetensors            or model-0000i-of-0000n.safetensors and
                                   model.safetensors.index.json above max_shard_size
      tokenizer.json, tokenizer_config.json, ...
      video_preprocessing.json     how a clip becomes the model's (T, C, H, W) uint8 input
      export_info.json             provenance (checkpoint, step, MLflow run), model_id, components
      README.md                    model card (its text: ``pretrain.model_card``)
      video_encoder/               stock transformers VideoMAEModel (the video tower alone)
      text_encoder/                stock transformers BertModel + tokenizer (the text tower alone)
      components/<name>.safetensors  extra parts added later (finetune: user tower, ranking
                                   head, item-embedding table), see ``add_component``

``load_export`` reads it back with checks that fail with a message naming the file or tensor:
safetensors only (never a pickle), config present and of this model type, every tensor present
with the expected shape, files complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_shards.atomic import atomic_write_text, file_sha256, make_output_dir
from data_shards.shard_set import read_index
from pretrain.checkpoint import ExportError, check_weights, load_weights
from pretrain.consolidate import consolidate_checkpoint
from pretrain.model_card import ModelCard, checkpoint_card, render_model_card

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
INFO_FILE = "export_info.json"
PREPROCESSING_FILE = "video_preprocessing.json"
CARD_FILE = "README.md"
COMPONENTS_DIR = "components"
VIDEO_ENCODER_DIR = "video_encoder"
TEXT_ENCODER_DIR = "text_encoder"
DEFAULT_MAX_SHARD_SIZE = "2GB"
"""Above this, ``model.safetensors`` is split into shards with an index (transformers' rule)."""
MODEL_TYPE = "vidrec-video-text"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHT_SUFFIXES_REFUSED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
"""Weight files that would need unpickling: an export holding one is refused, not read."""


# --------------------------------------------------------------------------- export layout


@dataclass
class VideoPreprocessing:
    """How a video file becomes the model's input, as in the eval reader (written next to the
    weights so that serving code needs nothing from the training run)."""

    num_frames: int
    """T frames per clip, the centre frame of each of T equal segments of the clip."""
    image_size: int
    """Frames are centre-cropped to a square and resized to image_size × image_size."""
    mean: list[float]
    """Per-channel mean of pixels in [0, 1]; the model subtracts it itself."""
    std: list[float]
    max_text_length: int
    """Tokens per caption or query (padded and truncated) used in training."""
    fps: float | None = None
    """Frame rate the training clips were resampled to (None: unknown)."""
    clip_seconds: float | None = None
    """Longest clip the training shards were cut to (None: unknown)."""
    frame_sampling: str = "uniform"
    crop: str = "center"
    input_format: str = "uint8 RGB, (B, T, C, H, W), not normalized"

    @classmethod
    def from_json(cls, path: Path) -> VideoPreprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        data = json.loads(path.read_text())
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class ExportComponent:
    """An extra part of an export, stored as ``components/<name>.safetensors``: e.g. the
    finetune stage's user tower, ranking head or item-embedding table."""

    name: str
    """File stem and key in ``export_info.json``: letters, digits, ``_`` and ``-``."""
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    """JSON-safe description needed to rebuild the part (sizes, item-id order, ...)."""
    description: str = ""
    """One line for the model card."""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"component name {self.name!r}: use letters, digits, _ and -")


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    return [directory / "model.safetensors"]


def export_model(
    model,
    out_dir: str | Path,
    *,
    tokenizer,
    preprocessing: VideoPreprocessing,
    card: ModelCard | None = None,
    components: Iterable[ExportComponent] = (),
    dtype: str = "fp32",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` (a ``VideoTextModel`` with full weights, on any device; not a ZeRO-3
    partitioned engine module: export its checkpoint) as an export directory.

    The generic writer: ``export_checkpoint`` calls it for a pretraining checkpoint, and a
    later stage can call it with its own components. ``out_dir`` must be empty or absent.
    """
    from pretrain.model import VideoTextModel

    if not isinstance(model, VideoTextModel):
        raise TypeError(f"export_model takes a VideoTextModel, got {type(model).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new directory")
    make_output_dir(out)
    card = card or ModelCard()

    # The model is not touched (a caller may go on using it): the weights are copied to the CPU
    # in the export dtype, and the config fields below are changed only while saving.
    torch_dtype = DTYPES[dtype]
    weights: dict[str, torch.Tensor] = {}
    converted: dict[tuple, torch.Tensor] = {}  # one copy per storage: tied weights stay tied
    for name, tensor in model.state_dict().items():
        storage = (tensor.device, tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
        if storage not in converted:
            cast = torch_dtype if tensor.is_floating_point() else None
            converted[storage] = tensor.detach().to("cpu", cast)
        weights[name] = converted[storage]
    with _config_for_saving(model, torch_dtype):
        model.save_pretrained(
            out, state_dict=weights, max_shard_size=max_shard_size, safe_serialization=True
        )
        # The towers alone, as stock transformers directories.
        for tower, directory in (
            ("video_model", VIDEO_ENCODER_DIR),
            ("text_model", TEXT_ENCODER_DIR),
        ):
            prefix = f"{tower}."
            getattr(model, tower).save_pretrained(
                out / directory,
                state_dict={
                    k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)
                },
                max_shard_size=max_shard_size,
                safe_serialization=True,
            )
    tokenizer.save_pretrained(out)
    preprocessing_json = json.dumps(dataclasses.asdict(preprocessing), indent=2)
    atomic_write_text(out / PREPROCESSING_FILE, preprocessing_json)
    atomic_write_text(out / VIDEO_ENCODER_DIR / PREPROCESSING_FILE, preprocessing_json)
    tokenizer.save_pretrained(out / TEXT_ENCODER_DIR)

    files = {path.name: file_sha256(path) for path in _weight_files(out)}
    model_id = f"{MODEL_TYPE}@{hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]}"
    info = {
        "format": EXPORT_FORMAT,
        "model_type": MODEL_TYPE,
        "model_id": model_id,
        "dtype": dtype,
        "parameters": model.num_parameters(),
        "weights_sha256": files,
        "source": card.source,
        "step": card.step,
        "zero_stage": card.zero_stage,
        "world_size": card.world_size,
        "mlflow_run_id": card.mlflow_run_id,
        "components": {},
    }
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    for component in components:
        add_component(out, component, card=False)
    write_model_card(out, card)
    log.info(
        "exported %s (%s, %s) to %s", model_id, dtype, f"{info['parameters']:,} parameters", out
    )
    return out


@contextlib.contextmanager
def _config_for_saving(model, dtype: torch.dtype) -> Iterator[None]:
    """The config as an export stores it: no starting-point directories (they were needed once,
    to build the towers, and may not exist where the export goes), no activation checkpointing,
    the export dtype; restored afterwards."""
    config = model.config
    changes = [
        (config, "text_model_dir", None),
        (config, "video_model_dir", None),
        (config, "activation_checkpointing", False),
        (config, "dtype", dtype),
        (config.video_config, "dtype", dtype),
        (config.text_config, "dtype", dtype),
    ]
    saved = [(target, name, getattr(target, name, None)) for target, name, _ in changes]
    try:
        for target, name, value in changes:
            setattr(target, name, value)
        yield
    finally:
        for target, name, value in saved:
            setattr(target, name, value)


def add_component(export_dir: str | Path, component: ExportComponent, card: bool = True) -> Path:
    """Add (or replace) one extra part of an export: ``components/<name>.safetensors`` plus its
    entry in ``export_info.json``; the model card is rewritten unless ``card`` is False."""
    from safetensors.torch import save_file

    out = Path(export_dir)
    info = read_info(out)
    path = out / COMPONENTS_DIR / f"{component.name}.safetensors"
    path.parent.mkdir(exist_ok=True)
    tensors = {
        name: tensor.detach().cpu().contiguous() for name, tensor in component.tensors.items()
    }
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata={"component": component.name})
    temporary.replace(path)
    info["components"][component.name] = {
        "file": f"{COMPONENTS_DIR}/{path.name}",
        "sha256": file_sha256(path),
        "shapes": {name: list(tensor.shape) for name, tensor in tensors.items()},
        "config": component.config,
        "description": component.description,
    }
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2))
    if card:
        write_model_card(out, None)
    return path


def read_info(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / INFO_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing: {export_dir} is not a vidrec export")
    return json.loads(path.read_text())


def write_model_card(export_dir: Path, card: ModelCard | None) -> None:
    """README.md of the export. Called again when a component is added: the card then keeps
    what the previous card recorded (stored in ``export_info.json`` as ``card``)."""
    info = read_info(export_dir)
    if card is None:
        card = ModelCard(**info.get("card", {}))
    else:
        info["card"] = dataclasses.asdict(card)
        atomic_write_text(export_dir / INFO_FILE, json.dumps(info, indent=2))
    config = json.loads((export_dir / "config.json").read_text())
    preprocessing = json.loads((export_dir / PREPROCESSING_FILE).read_text())
    towers = (VIDEO_ENCODER_DIR, TEXT_ENCODER_DIR)
    text = render_model_card(card, info, config, preprocessing, towers)
    atomic_write_text(export_dir / CARD_FILE, text)


# --------------------------------------------------------------------------- from a checkpoint


def video_preprocessing(model_config, shards: str, max_text_length: int) -> VideoPreprocessing:
    """What the model expects of a clip: its frames and normalisation, and the fps and clip
    length of the shard set it trained on (``shards``, when a built directory)."""
    video = model_config.video_config
    settings = (read_index(shards) or {}).get("settings", {}) if shards else {}
    return VideoPreprocessing(
        num_frames=video.num_frames,
        image_size=video.image_size,
        mean=list(model_config.video_mean),
        std=list(model_config.video_std),
        max_text_length=max_text_length,
        fps=settings.get("fps"),
        clip_seconds=settings.get("clip_seconds"),
    )


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    tag: str | None = None,
    components: Iterable[ExportComponent] = (),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Export one checkpoint of a pretraining run (see the module docstring for the layout)."""
    from data_shards.text import load_tokenizer
    from pretrain.config import PretrainConfig, from_dict
    from pretrain.model import VideoTextModel

    consolidated = consolidate_checkpoint(checkpoint, tag)
    run_config = consolidated.run.get("config")
    if not run_config:
        raise ExportError(f"{consolidated.tag_dir / 'config.json'} is missing: no run config")
    config = from_dict(PretrainConfig, run_config)
    model_config = config.model.build_config()
    # Built for real, not on the meta device: non-persistent buffers and the decoder's sin-cos
    # table are not in the checkpoint and must exist. The random init is overwritten at once.
    model = VideoTextModel(model_config)
    load_weights(model, consolidated.state_dict, str(consolidated.tag_dir))
    model.tie_weights()
    tokenizer = load_tokenizer(model_config.text_model_dir or None)
    card = checkpoint_card(consolidated)
    return export_model(
        model,
        out_dir,
        tokenizer=tokenizer,
        preprocessing=video_preprocessing(
            model_config,
            str(run_config.get("data", {}).get("train_shards", "")),
            int(run_config.get("data", {}).get("max_text_length", 32)),
        ),
        card=card,
        components=components,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedComponent:
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    description: str


@dataclass
class ExportedModel:
    """An export loaded for inference: model in eval mode, tokenizer, preprocessing."""

    model: Any
    """The ``VideoTextModel``."""
    tokenizer: Any
    preprocessing: VideoPreprocessing
    info: dict[str, Any]
    directory: Path
    components: dict[str, LoadedComponent] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.info["model_id"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) uint8 clips → (B, E) float32 L2-normalized embeddings."""
        return self.model.encode_video(video.to(self.device))[1].float()

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Captions or queries → (B, E) float32 L2-normalized embeddings."""
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.preprocessing.max_text_length,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].long().to(self.device)
        mask = tokens["attention_mask"].long().to(self.device)
        return self.model.encode_text(ids, mask)[1].float()


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking the file is whole."""
    from safetensors import safe_open

    if not path.is_file():
        raise ExportError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()  # (safe_open has no __iter__)
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    except Exception as err:  # SafetensorError, OSError: the file, not the caller, is at fault
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from err
    return shapes


def load_export(
    export_dir: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
) -> ExportedModel:
    """Load an export for inference after checking it (see the module docstring).

    ``dtype`` ("fp32"/"bf16") overrides the stored one, e.g. fp32 on a CPU without bf16 speed.
    """
    from transformers import AutoTokenizer

    from pretrain.model import VideoTextModel

    directory = Path(export_dir)
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{config_path} is missing: not a model directory")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise ExportError(
            f"{config_path}: model_type is {model_type!r}, not {MODEL_TYPE!r} "
            "(a directory of another model)"
        )
    pickled = sorted(
        path.name for path in directory.iterdir() if path.suffix in WEIGHT_SUFFIXES_REFUSED
    )
    if pickled:
        raise ExportError(
            f"{directory}: holds {', '.join(pickled)}; only safetensors weights are loaded "
            "(pickled weights can run code)"
        )
    info = read_info(directory)

    for path in _weight_files(directory):
        _safetensors_shapes(path)  # whole and readable, or an error naming the file
    for name, digest in info.get("weights_sha256", {}).items():
        path = directory / name
        if file_sha256(path) != digest:
            raise ExportError(f"{path}: content differs from the export (sha256 mismatch)")

    torch_dtype = DTYPES[dtype or info.get("dtype", "fp32")]
    # transformers maps stored names to module names (VideoMAE keeps its original q_bias /
    # v_bias on disk); its loading report is checked instead of guessing that mapping here.
    model, report = VideoTextModel.from_pretrained(
        directory,
        dtype=torch_dtype,
        local_files_only=True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    check_weights(
        model,
        directory,
        missing=report["missing_keys"],
        unexpected=report["unexpected_keys"],
        mismatched=report.get("mismatched_keys", ()),
        errors=report.get("error_msgs", ()),
    )
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    preprocessing = VideoPreprocessing.from_json(directory / PREPROCESSING_FILE)
    components = {}
    for name, entry in info.get("components", {}).items():
        components[name] = _load_component(directory / entry["file"], entry)
    return ExportedModel(model, tokenizer, preprocessing, info, directory, components)


def _load_component(path: Path, entry: Mapping[str, Any]) -> LoadedComponent:
    from safetensors.torch import load_file

    shapes = _safetensors_shapes(path)
    for name, shape in entry.get("shapes", {}).items():
        if tuple(shape) != shapes.get(name):
            raise ExportError(
                f"{path}: tensor {name} has shape {list(shapes.get(name, ()))}, "
                f"export_info.json says {shape}"
            )
    return LoadedComponent(
        load_file(str(path)), entry.get("config", {}), entry.get("description", "")
    )
