"""Checkpoints through DeepSpeed, plus what DeepSpeed does not hold: per-rank reader position
and RNG states, the resolved config, the MLflow run id.

Layout of ``<output_dir>/checkpoints``::

    latest                      the newest COMPLETE tag; written last, atomically
    step_00000200/              one DeepSpeed tag: model/optimizer/scheduler shards per rank
        trainer_state_rank0.json  step, reader position, RNG states of rank 0 (JSON, no pickle)
        config.json             the resolved run config, for the compatibility check

Reading a tag back without DeepSpeed is ``pretrain.consolidate``'s job.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.atomic import atomic_write_text
from pretrain.distributed import World, barrier, broadcast_object

log = logging.getLogger(__name__)

LATEST = "latest"
# Config fields whose change makes an existing checkpoint unusable (shapes or sharding differ).
INCOMPATIBLE_FIELDS = ("model", "parallel.zero_stage", "parallel.precision")


@dataclass
class TrainState:
    """What a rank saves beside the weights (its ``trainer_state_rank<r>.json``); a stage adds
    its data position as fields."""

    step: int = 0
    """Optimizer steps done."""
    nonfinite_skipped: int = 0
    nonfinite_streak: int = 0
    tracking_run_id: str | None = None


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported, an export that cannot be loaded, or weights that
    do not fit a model; the message names the file or tensor at fault."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(directory: Path) -> str | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (directory / tag).is_dir() else None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "objectives": generator.get_state().tolist(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    generator.set_state(torch.tensor(state["objectives"], dtype=torch.uint8))


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _differences(saved: Any, current: Any, path: str) -> list[tuple[str, Any, Any]]:
    """(dotted path, saved value, current value) of every leaf where two config trees differ,
    so that a refusal names ``model.embed_dim`` rather than printing two whole sections."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            difference
            for key in sorted(saved.keys() | current.keys(), key=str)
            for difference in _differences(saved.get(key), current.get(key), f"{path}.{key}")
        ]
    return [] if saved == current else [(path, saved, current)]


def check_compatible(
    saved: dict[str, Any],
    current: dict[str, Any],
    world: World,
    fields: tuple[str, ...] = INCOMPATIBLE_FIELDS,
) -> None:
    """Refuse to resume when the checkpoint cannot hold the current run's state (``fields``:
    the config paths whose change makes it unusable)."""
    problems = [
        f"{path}: checkpoint has {old!r}, this run has {new!r}"
        for name in fields
        for path, old, new in _differences(_get(saved["config"], name), _get(current, name), name)
    ]
    zero_stage = _get(current, "parallel.zero_stage")
    if zero_stage and saved["world_size"] != world.world_size:
        problems.append(
            f"world size: checkpoint was saved by {saved['world_size']} ranks, this run has "
            f"{world.world_size} (ZeRO {zero_stage} shards optimizer state per rank)"
        )
    if problems:
        raise RuntimeError(
            "the output directory holds checkpoints of an incompatible run:\n  "
            + "\n  ".join(problems)
            + "\nuse another train.output_dir, or restore the settings above"
        )


def save(
    engine,
    output_dir: str | Path,
    step: int,
    world: World,
    trainer_state: dict[str, Any],
    resolved_config: dict[str, Any],
    keep_last: int,
    before_latest: Callable[[str], Any] | None = None,
) -> str:
    """Save a complete checkpoint, then move ``latest`` to it, then prune old ones.
    ``before_latest(tag)`` runs on rank 0 once its files are written, before the pointer
    moves (the other ranks wait for it at the barrier)."""
    directory = checkpoint_dir(output_dir)
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(directory), tag=tag, save_latest=False)
    atomic_write_text(
        directory / tag / f"trainer_state_rank{world.rank}.json", json.dumps(trainer_state)
    )
    if world.is_main:
        saved = {"config": resolved_config, "world_size": world.world_size, "step": step}
        atomic_write_text(directory / tag / "config.json", json.dumps(saved, indent=2))
        if before_latest is not None:
            before_latest(tag)
    barrier()  # every rank's files are on disk before the pointer moves
    if world.is_main:
        atomic_write_text(directory / LATEST, tag)
        tags = sorted(p.name for p in directory.glob("step_*") if p.is_dir())
        for old in tags[: max(0, len(tags) - keep_last)]:
            if old != tag:
                shutil.rmtree(directory / old, ignore_errors=True)
    barrier()
    log.info("checkpoint %s saved", tag)
    return tag


def save_training(
    engine, output_dir, state, generator, tracker, world: World, resolved_config, keep_last: int
) -> str:
    """``save`` for a training stage: its ``state`` dataclass (step, reader position, MLflow run
    id ...) and the RNG states become this rank's trainer state.

    The tracker creates its run in the background: when that outlasted ``start()``'s wait (a
    slow store, a server down at start), the id is known only now. Without it here a resumed
    job would start a second MLflow run. The metrics logged up to the checkpoint reach MLflow
    before it becomes ``latest`` (``Tracker.flush_for_checkpoint``)."""
    state.tracking_run_id = broadcast_object(tracker.run_id) or state.tracking_run_id
    trainer_state = {"train_state": vars(state) | {}, "rng": rng_state(generator)}
    return save(
        engine, output_dir, state.step, world, trainer_state, resolved_config, keep_last,
        before_latest=tracker.flush_for_checkpoint,
    )  # fmt: skip


def load(
    engine,
    output_dir: str | Path,
    world: World,
    resolved_config: dict[str, Any],
    incompatible_fields: tuple[str, ...] = INCOMPATIBLE_FIELDS,
) -> dict[str, Any] | None:
    """Resume from the latest complete checkpoint: this rank's trainer state, or None."""
    directory = checkpoint_dir(output_dir)
    tag = latest_tag(directory)
    if tag is None:
        return None
    saved = json.loads((directory / tag / "config.json").read_text())
    check_compatible(saved, resolved_config, world, incompatible_fields)
    load_path, _ = engine.load_checkpoint(
        str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory / tag}")
    state_file = directory / tag / f"trainer_state_rank{world.rank}.json"
    state = json.loads(state_file.read_text())
    log.info("resumed from %s (step %d)", tag, state["train_state"]["step"])
    return state


# --------------------------------------------------------------------------- loading weights


def check_weights(
    module: torch.nn.Module,
    where: str | Path,
    *,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[tuple[str, Sequence[int], Sequence[int]]] = (),
    errors: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
) -> None:
    """Refuse weights that do not fit ``module``: an ``ExportError`` naming ``where`` and the
    first ten problems. ``mismatched`` holds (name, stored shape, module shape). A missing
    tensor is allowed when ``module`` ties it to another (``_tied_weights_keys``) or its name
    contains one of ``ignore_missing``: the caller ties it after loading."""
    tied = set(getattr(module, "_tied_weights_keys", None) or {})
    ignored = tuple(ignore_missing)
    shapes = {name: list(tensor.shape) for name, tensor in module.state_dict().items()}
    problems = [
        f"tensor {name} has shape {list(stored)}, the config needs {list(needed)}"
        for name, stored, needed in sorted(mismatched)
    ]
    problems += [
        f"tensor {name} is missing (expected shape {shapes.get(name, '?')})"
        for name in sorted(missing)
        if name not in tied and not any(part in name for part in ignored)
    ]
    problems += [f"unexpected tensor {name}" for name in sorted(unexpected)]
    problems += list(errors)
    if problems:
        raise ExportError(f"{where}: " + "; ".join(problems[:10]))


def load_weights(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    where: str | Path,
    *,
    ignore_missing: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``module`` once ``check_weights`` finds that it fits: every
    tensor of the module present with its shape, nothing unknown (tie weights afterwards)."""
    expected = module.state_dict()
    mismatched = [
        (name, tuple(state_dict[name].shape), tuple(tensor.shape))
        for name, tensor in expected.items()
        if name in state_dict and state_dict[name].shape != tensor.shape
    ]
    check_weights(
        module,
        where,
        missing=expected.keys() - state_dict.keys(),
        unexpected=state_dict.keys() - expected.keys(),
        mismatched=mismatched,
        ignore_missing=ignore_missing,
    )
    module.load_state_dict(state_dict, strict=False)
