"""Merge one DeepSpeed checkpoint tag (ZeRO 0-3, saved by any number of ranks) into a plain
state dict, in one process, with no process group and no DeepSpeed engine.

Why the consolidation is our own code: DeepSpeed's ``zero_to_fp32`` calls ``torch.load(...,
weights_only=False)`` on every file, i.e. it runs whatever the pickles say. What the files
really hold (DeepSpeed 0.19): tensors, plain containers, ``torch.Size``, and in the optimizer
files three DeepSpeed objects: the ZeRO stage (``ZeroStageEnum``), the ``LossScaler`` and, for
ZeRO 1/2, ``fragment_address`` records. Here every file is read with ``weights_only=True``;
those DeepSpeed classes, and only DeepSpeed's, are mapped to ``OpaqueRecord``, an inert
stand-in that stores what it is given: no DeepSpeed (or other non-torch) code runs while
reading, and a file naming any other global is refused. The merge arithmetic (how ZeRO-2 and
ZeRO-3 lay parameters out in their flat fp32 partitions) is the same as ``zero_to_fp32``'s and
is tested against the live engine.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import LATEST, ExportError, latest_tag

log = logging.getLogger(__name__)


class OpaqueRecord:
    """Inert stand-in for a class pickled into a DeepSpeed checkpoint (``ZeroStageEnum``,
    ``LossScaler``, ``fragment_address``): it keeps the constructor arguments and the pickled
    state as data and runs no code of the class it replaces."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueRecord:
        record = super().__new__(cls)
        record.args = args
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:
        # an IntEnum such as ZeroStageEnum pickles as (class, (value,))
        if len(self.args) == 1 and isinstance(self.args[0], int):
            return self.args[0]
        raise TypeError("this record holds no integer")


def _is_opaque_candidate(name: str) -> bool:
    """Globals that become ``OpaqueRecord``: DeepSpeed's own classes. Anything else outside
    torch's weights-only allowlist is refused."""
    return name.startswith("deepspeed.")


def load_deepspeed_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's classes read as inert records."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # a truncated or foreign zip: say which file
        raise ExportError(f"{path}: not a readable torch checkpoint file ({err})") from err
    refused = sorted(name for name in unsafe if not _is_opaque_candidate(name))
    if refused:
        raise ExportError(
            f"{path}: refers to {', '.join(refused)}, which weights-only loading does not "
            "allow and export does not know: not a checkpoint of this project?"
        )
    stand_ins = [(OpaqueRecord, name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ExportError(f"{path}: cannot be read safely ({err})") from err


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _as_int(value: Any) -> int:
    return int(value) if not isinstance(value, (list, tuple)) else max(int(v) for v in value)


@dataclass
class ConsolidatedCheckpoint:
    """One checkpoint tag merged into a plain state dict, and what was saved next to it."""

    state_dict: dict[str, torch.Tensor]
    """Full (unpartitioned) tensors by parameter name; fp32 where an fp32 master existed."""
    tag_dir: Path
    zero_stage: int
    world_size: int
    """Ranks that saved the checkpoint."""
    weights_source: str
    """"fp32 master" (ZeRO optimizer partitions) or "module" (the engine's module weights)."""
    run: dict[str, Any]
    """``config.json`` of the tag: {"config": resolved run config, "world_size", "step"}."""
    trainer_states: list[dict[str, Any]] = field(default_factory=list)
    """``trainer_state_rank*.json`` of every rank, in rank order."""

    @property
    def step(self) -> int:
        return int(self.run.get("step") or self.trainer_states[0]["train_state"]["step"])

    @property
    def output_dir(self) -> Path:
        """The training run's ``train.output_dir`` (eval/, summary.json, mlflow.db)."""
        return self.tag_dir.parent.parent

    @property
    def mlflow_run_id(self) -> str | None:
        for state in self.trainer_states:
            run_id = state.get("train_state", {}).get("tracking_run_id")
            if run_id:
                return run_id
        return None


def resolve_tag_dir(checkpoint: str | Path, tag: str | None = None) -> Path:
    """A training output dir, its ``checkpoints`` dir, or a tag dir → the tag dir to export."""
    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if tag is not None:
        tag_dir = path / tag
    elif (path / LATEST).is_file():
        latest = latest_tag(path)
        if latest is None:
            raise ExportError(f"{path / LATEST} names a tag that does not exist")
        tag_dir = path / latest
    else:
        tag_dir = path
    if not any(tag_dir.glob("*_model_states.pt")):
        raise ExportError(
            f"{tag_dir}: no DeepSpeed checkpoint here (no *_model_states.pt); pass a training "
            "output dir, its checkpoints/ dir or a step_XXXXXXXX tag dir"
        )
    return tag_dir


def consolidate_checkpoint(
    checkpoint: str | Path, tag: str | None = None
) -> ConsolidatedCheckpoint:
    """Merge the per-rank files of one DeepSpeed tag into full tensors, in this process.

    ZeRO 1-3 keep an fp32 master copy of every trainable parameter, partitioned over the ranks
    in the optimizer files: that is what is merged (exact even for a bf16 run). ZeRO 0 keeps the
    whole module in the model file.
    """
    tag_dir = resolve_tag_dir(checkpoint, tag)
    config_file = tag_dir / "config.json"
    run = json.loads(config_file.read_text()) if config_file.is_file() else {}
    trainer_states = [
        json.loads(path.read_text())
        for path in sorted(tag_dir.glob("trainer_state_rank*.json"), key=_natural_key)
    ]
    model_files = sorted(tag_dir.glob("*_model_states.pt"), key=_natural_key)
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"), key=_natural_key)
    model_states = [load_deepspeed_file(path) for path in model_files]
    first = model_states[0]
    if not isinstance(first, dict) or "module" not in first:
        raise ExportError(f"{model_files[0]}: not a DeepSpeed model state file (no 'module')")

    optimizer_states = [load_deepspeed_file(path) for path in optim_files]
    zero = [state.get("optimizer_state_dict", {}) for state in optimizer_states]
    zero_stage = _as_int(zero[0]["zero_stage"]) if zero and "zero_stage" in zero[0] else 0
    if zero_stage == 0:
        state_dict = {name: tensor for name, tensor in first["module"].items()}
        consolidated = ConsolidatedCheckpoint(
            state_dict, tag_dir, 0, int(run.get("world_size", 1)), "module", run, trainer_states
        )
        dtypes = {str(t.dtype) for t in state_dict.values() if t.is_floating_point()}
        log.info("read %s: no ZeRO partitions, module weights (%s)", tag_dir, ", ".join(dtypes))
        if dtypes - {"torch.float32"}:
            # DeepSpeed's bf16 optimizer without ZeRO keeps fp32 masters in bf16_zero_* files;
            # they are not merged here, so the export has the precision of the module.
            log.warning("ZeRO-0 checkpoint with %s module weights: exporting those", dtypes)
        return consolidated

    world_size = _as_int(zero[0]["partition_count"])
    if len(optimizer_states) != world_size:
        raise ExportError(
            f"{tag_dir}: {len(optimizer_states)} optimizer files for a world of {world_size} "
            "ranks; the checkpoint is incomplete"
        )
    buffer_names = set(first.get("buffer_names", ()))
    state_dict = {name: tensor for name, tensor in first["module"].items() if name in buffer_names}
    if zero_stage <= 2:
        groups = [state["single_partition_of_fp32_groups"] for state in zero]
        paddings = zero[0].get("param_alignment_paddings")
        state_dict |= _merge_zero2(first["param_shapes"], groups, paddings, world_size, tag_dir)
        state_dict |= dict(first.get("frozen_param_fragments") or {})
    else:
        groups = [state["fp32_flat_groups"] for state in zero]
        state_dict |= _merge_zero3(first["param_shapes"], groups, world_size, tag_dir)
        state_dict |= _merge_zero3_frozen(model_states, world_size)
    for name, source in (first.get("shared_params") or {}).items():
        if source in state_dict:
            state_dict[name] = state_dict[source]
    log.info("read %s: ZeRO-%d, %d ranks, fp32 master weights", tag_dir, zero_stage, world_size)
    return ConsolidatedCheckpoint(
        state_dict, tag_dir, zero_stage, world_size, "fp32 master", run, trainer_states
    )


def _merge_zero2(
    param_shapes: list[dict[str, torch.Size]],
    partitions: list[list[torch.Tensor]],  # [rank][group] flat fp32 partition
    paddings: list[list[int]] | None,
    world_size: int,
    tag_dir: Path,
) -> dict[str, torch.Tensor]:
    """ZeRO 1/2: each group is one flat vector cut into ``world_size`` equal slices; the
    parameters lie in it one after the other (with optional per-parameter alignment padding),
    the whole padded to a multiple of 2 × world size."""
    merged: dict[str, torch.Tensor] = {}
    for group, shapes in enumerate(param_shapes):
        flat = torch.cat([rank_groups[group] for rank_groups in partitions])
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            merged[name] = flat.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (paddings[group][index] if paddings else 0)
        align = 2 * world_size
        if math.ceil(offset / align) * align != math.ceil(flat.numel() / align) * align:
            raise ExportError(
                f"{tag_dir}: parameter group {group} holds {flat.numel()} values, its "
                f"parameters need {offset}: the model states and optimizer files disagree"
            )
    return merged


def _merge_zero3(
    param_shapes: list[dict[str, torch.Size]],
    partitions: list[list[torch.Tensor]],  # [rank][group] flat fp32 partition
    world_size: int,
    tag_dir: Path,
) -> dict[str, torch.Tensor]:
    """ZeRO 3: every parameter is split over the ranks by itself, ``ceil(numel / world_size)``
    values each (the last rank's slice padded), and each rank's slices lie one after the other
    in its flat partition."""
    flats = [torch.cat(list(rank_groups)) for rank_groups in partitions]  # [rank] (P,)
    merged: dict[str, torch.Tensor] = {}
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            width = math.ceil(numel / world_size)
            pieces = [flat.narrow(0, offset, width) for flat in flats]
            merged[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += width
    if offset != flats[0].numel():
        raise ExportError(
            f"{tag_dir}: each rank holds {flats[0].numel()} values, the parameters need "
            f"{offset}: the model states and optimizer files disagree"
        )
    return merged


def _merge_zero3_frozen(model_states: list[dict], world_size: int) -> dict[str, torch.Tensor]:
    shapes = model_states[0].get("frozen_param_shapes") or {}
    merged = {}
    for name, shape in shapes.items():
        pieces = [state["frozen_param_fragments"][name] for state in model_states]
        merged[name] = torch.cat(pieces)[: math.prod(shape)].view(shape).clone()
    return merged
