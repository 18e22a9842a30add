"""New items into a recommender export, and items out of it, atomically.

``add_items`` embeds new items (text and/or clips) with the export's item tower, as a
cold-start item is embedded, and appends them to its item table, catalogue and index;
``remove_items`` marks items removed (never recommended again, still read in histories) and
drops them from the index. The one rule: **``export_info.json`` is the commit**. Every file an
update changes is written under a new generation name (``catalogue-g3.json``,
``components/item_embeddings-g3.safetensors``, ``item_index-g3.faiss``), and only then is
``export_info.json``, which names and hashes them, replaced in one rename. A process killed
before that rename leaves the export exactly as it was (the new files are unreferenced and
deleted by the next update); killed after it, the update is done. Embeddings are staged in
chunks under ``.index-add-<digest>/`` so a rerun of the same add skips what was embedded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data_shards.atomic import atomic_write_bytes, atomic_write_text, file_sha256
from data_shards.reader import ClipCropper, uniform_frame_indices
from data_shards.shard_set import iter_samples, list_shards
from data_shards.video import decode_clip
from finetune.catalogue import read_catalogue
from finetune.export import CATALOGUE_FILE, INDEX_FILE, ITEMS, ExportedRecommender, load_recommender
from finetune.item_index import INDEX_KEY, IndexSettings, build_index, head_item_vectors
from finetune.model import PAD_ID
from finetune.tables import InteractionFileError, normalize_id, read_table
from pretrain.export import COMPONENTS_DIR, INFO_FILE, read_info

log = logging.getLogger(__name__)

LOCK_FILE = ".index.lock"
STAGING_PREFIX = ".index-add-"
GENERATED = re.compile(r"^(catalogue|item_index|item_embeddings)-g(\d+)\.(json|faiss|safetensors)$")
MAX_CLIPS_PER_ITEM = 4


@dataclass
class NewItem:
    """An item to add: its id, its text (joined fields; None without) and its clips."""

    item_id: str
    text: str | None
    clip_files: list[str] = field(default_factory=list)
    """Video files, decoded as ``recommend --item-clip`` decodes them."""
    clip_bytes: list[bytes] = field(default_factory=list)
    """Clips read from shards (encoded mp4 members)."""

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.item_id, self.text, self.clip_files]).encode())
        for clip in self.clip_bytes:
            digest.update(hashlib.sha256(clip).digest())
        return digest.hexdigest()


@dataclass
class UpdateReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Ids the export already had (a rerun after a finished add), or already removed."""
    reused_chunks: int = 0
    """Embedding chunks a killed earlier run had staged."""
    generation: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


# ============================================================================= reading new items


def read_new_items(
    path: str | Path,
    text_fields: Sequence[str] | None = None,
    shards: str | None = None,
    *,
    strict: bool = True,
) -> list[NewItem]:
    """New items from a catalogue-style file (``item_id``, text columns, optional ``video``
    paths relative to the file), with their clips from ``shards`` (found by ``item_id``).
    ``text_fields``: every one must be a column (``strict``) or those that are, in that order
    (e.g. the export's fields, of which a new item may lack some). A missing video file or an
    item with neither text nor clip is refused, row named."""
    table = read_table(path)
    if text_fields is not None and not strict:
        text_fields = [name for name in text_fields if name in table.columns]
    catalogue = read_catalogue(path, text_fields=text_fields)
    videos = table.columns.get("video")
    base = Path(path).parent
    rows = {normalize_id(item_id): row for row, item_id in enumerate(table.columns["item_id"])}
    items = []
    for index, item_id in enumerate(catalogue.item_ids, start=1):
        files, row = [], rows[item_id]
        video = None if videos is None else videos[row]
        if isinstance(video, str) and video.strip():
            file = base / video.strip()
            if not file.is_file():
                raise InteractionFileError(f"{path}: row {row}, video: {file} does not exist")
            files.append(str(file))
        items.append(NewItem(item_id, catalogue.text(index) or None, files))
    if shards:
        clips = _shard_clips(shards, {item.item_id for item in items})
        for item in items:
            item.clip_bytes = clips.get(item.item_id, [])
    for item in items:
        if not item.text and not item.clip_files and not item.clip_bytes:
            raise InteractionFileError(
                f"{path}: row {rows[item.item_id]}, item {item.item_id}: no text and no clip "
                "(no text field, no video, nothing in --shards)"
            )
    return items


def _shard_clips(shards: str, wanted: set[str]) -> dict[str, list[bytes]]:
    clips: dict[str, list[bytes]] = {}
    for sample in iter_samples(list_shards(shards), extensions={"json", "mp4"}):
        if "mp4" not in sample or "json" not in sample:
            continue
        item_id = str(json.loads(sample["json"]).get("item_id", ""))
        if item_id in wanted and len(clips.setdefault(item_id, [])) < MAX_CLIPS_PER_ITEM:
            clips[item_id].append(sample["mp4"])
    return clips


# ============================================================================= embedding


def _decode(data: bytes, recommender: ExportedRecommender) -> torch.Tensor:
    prep = recommender.preprocessing
    select = lambda available: uniform_frame_indices(available, prep.num_frames)  # noqa: E731
    return torch.from_numpy(decode_clip(data, select=select, convert=ClipCropper(prep.image_size)))


@torch.no_grad()
def embed_items(recommender: ExportedRecommender, items: Sequence[NewItem]) -> torch.Tensor:
    """(B, D) embeddings of new items from their content, as the tower embeds a cold item."""
    for item in items:
        if not item.text and not item.clip_files and not item.clip_bytes:
            raise ValueError(f"item {item.item_id}: no text and no clip to embed it from")
    device = recommender.device
    clips = [
        [_decode(Path(file).read_bytes(), recommender) for file in item.clip_files]
        + [_decode(data, recommender) for data in item.clip_bytes]
        for item in items
    ]
    video = mask = None
    most = max(len(item_clips) for item_clips in clips)
    if most:
        shape = next(c[0] for c in clips if c).shape  # (T, C, H, W)
        video = torch.zeros(len(items), most, *shape, dtype=torch.uint8)
        mask = torch.zeros(len(items), most, dtype=torch.bool)
        for row, item_clips in enumerate(clips):
            for slot, clip in enumerate(item_clips):
                video[row, slot], mask[row, slot] = clip, True
        video, mask = video.to(device), mask.to(device)
    tokens = recommender.tokenizer(
        [item.text or "" for item in items], padding="max_length", truncation=True,
        max_length=recommender.preprocessing.max_text_length, return_tensors="pt",
    )  # fmt: skip
    has_text = torch.tensor([bool(item.text) for item in items], device=device)
    no_id = torch.full((len(items),), PAD_ID, dtype=torch.long, device=device)
    return recommender.model.item_tower(
        video, mask, tokens["input_ids"].long().to(device),
        tokens["attention_mask"].long().to(device), has_text, item_ids=no_id,
        id_mask=no_id.bool(),
    )  # fmt: skip


def _staged_embeddings(
    recommender: ExportedRecommender, items: Sequence[NewItem], staging: Path, batch_size: int
) -> tuple[torch.Tensor, int]:
    """Embeddings of ``items`` (B, D), chunk by chunk; chunks a killed run wrote are reused."""
    staging.mkdir(exist_ok=True)
    parts, reused = [], 0
    for number, start in enumerate(range(0, len(items), batch_size)):
        chunk = staging / f"chunk-{number:06d}.safetensors"
        if chunk.is_file():
            parts.append(load_file(str(chunk))["embeddings"])
            reused += 1
            continue
        embeddings = embed_items(recommender, items[start : start + batch_size]).cpu()
        temporary = chunk.with_name(f".{chunk.name}.tmp")
        save_file({"embeddings": embeddings.contiguous()}, str(temporary))
        temporary.replace(chunk)
        parts.append(embeddings)
    return torch.cat(parts), reused


# ============================================================================= committing


@contextmanager
def _locked(export: Path) -> Iterator[None]:
    """One update of an export at a time (the lock goes with the process, even a killed one)."""
    with open(export / LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _referenced(info: dict) -> set[str]:
    items = info["components"][ITEMS]
    return {
        items["file"],
        items.get("config", {}).get("catalogue_file", CATALOGUE_FILE),
        info.get(INDEX_KEY, {}).get("file", INDEX_FILE),
    }


def collect_garbage(export: Path) -> list[str]:
    """Delete generation files ``export_info.json`` does not name (left by a killed update or
    replaced by a finished one); returns their names."""
    referenced = _referenced(read_info(export))
    stale = []
    for path in [*export.iterdir(), *(export / COMPONENTS_DIR).iterdir()]:
        name = str(path.relative_to(export))
        generation_file = bool(GENERATED.match(path.name)) or path.name in (
            CATALOGUE_FILE, INDEX_FILE, f"{ITEMS}.safetensors",
        )  # fmt: skip
        half_written = path.name.startswith(".") and path.name.endswith(".tmp")
        if (generation_file and name not in referenced) or half_written:
            path.unlink()
            stale.append(name)
    return stale


def _commit(
    export: Path,
    recommender: ExportedRecommender,
    table: torch.Tensor,
    item_ids: list[str],
    flags: dict[str, torch.Tensor],
    index,
) -> int:
    """Write the next generation of the table, catalogue and index, then ``export_info.json``."""
    info = read_info(export)
    generation = int(info.get(INDEX_KEY, {}).get("generation", 0)) + 1
    items_entry = dict(info["components"][ITEMS])
    config = dict(items_entry["config"])

    catalogue_name = f"catalogue-g{generation}.json"
    catalogue_json = json.dumps({"item_ids": item_ids}).encode()
    atomic_write_bytes(export / catalogue_name, catalogue_json)

    tensors = {"item_embeddings": table.contiguous()}
    tensors |= {name: flag.to(torch.uint8).contiguous() for name, flag in flags.items()}
    table_name = f"{COMPONENTS_DIR}/{ITEMS}-g{generation}.safetensors"
    temporary = export / COMPONENTS_DIR / f".{ITEMS}-g{generation}.safetensors.tmp"
    save_file(tensors, str(temporary), metadata={"component": ITEMS})
    temporary.replace(export / table_name)

    index_name = f"item_index-g{generation}.faiss"
    index.write(export / index_name)

    config.setdefault("trained_items", config["num_items"])
    config |= {
        "num_items": len(item_ids),
        "catalogue_file": catalogue_name,
        "catalogue_sha256": hashlib.sha256(catalogue_json).hexdigest(),
        "added_items": len(item_ids) - config["trained_items"],
        "removed_items": int(flags["removed"].sum()),
    }
    items_entry |= {
        "file": table_name,
        "sha256": file_sha256(export / table_name),
        "shapes": {name: list(tensor.shape) for name, tensor in tensors.items()},
        "config": config,
    }
    info["components"][ITEMS] = items_entry
    dim = table.shape[1]
    info[INDEX_KEY] = index.entry(index_name, export / index_name, len(item_ids), dim, generation)
    atomic_write_text(export / INFO_FILE, json.dumps(info, indent=2))  # the commit
    return generation


def _flags(recommender: ExportedRecommender, added: int) -> dict[str, torch.Tensor]:
    def grown(flag: torch.Tensor, value: bool) -> torch.Tensor:
        return torch.cat([flag.cpu().bool(), torch.full((added,), value)])

    return {
        "warm": grown(recommender.warm, False),
        "cold": grown(recommender.cold, True),  # served from content, like cold-start items
        "removed": grown(recommender.removed, False),
    }


def _index_with(recommender: ExportedRecommender, table, flags, new_rows: torch.Tensor):
    """The export's index plus ``new_rows`` of ``table``; rebuilt when the catalogue's size
    now calls for another kind of index (e.g. past ``exact_below``)."""
    index, head = recommender.index, recommender.model.head
    live = int((~flags["removed"][1:]).sum())
    if index is None or index.settings.factory_for(live) != index.factory:
        settings = index.settings if index is not None else IndexSettings()
        return build_index(head, table, flags["removed"], settings)
    index.add(head_item_vectors(head, table[new_rows], new_rows), new_rows.numpy())
    return index


def _append(
    export: Path, recommender: ExportedRecommender, item_ids: list[str], embeddings, report
) -> None:
    """Append (lock held) new rows to the table, catalogue and index, and commit them."""
    started = time.perf_counter()
    old = len(recommender.item_embeddings)
    table = torch.cat([recommender.item_embeddings.cpu(), embeddings.float().cpu()])
    new_rows = torch.arange(old, len(table))
    flags = _flags(recommender, len(item_ids))
    index = _index_with(recommender, table, flags, new_rows)
    report.seconds["index"] = time.perf_counter() - started
    started = time.perf_counter()
    catalogue = [*recommender.item_ids, *item_ids]
    report.generation = _commit(export, recommender, table, catalogue, flags, index)
    report.seconds["commit"] = time.perf_counter() - started
    report.added = list(item_ids)
    collect_garbage(export)
    log.info("added %d items to %s (generation %d)", len(item_ids), export, report.generation)


def _split_known(recommender: ExportedRecommender, item_ids: Sequence[str], report) -> list[int]:
    """Positions of the ids to add: new to the export and first in ``item_ids``."""
    fresh, seen = [], set()
    for position, item_id in enumerate(item_ids):
        if item_id in recommender.item_index or item_id in seen:
            report.skipped.append(item_id)
        else:
            fresh.append(position)
            seen.add(item_id)
    return fresh


def add_items(
    export_dir: str | Path, items: Sequence[NewItem], *, batch_size: int = 32
) -> UpdateReport:
    """Embed ``items`` and add them to the export (see the module docstring); ids the export
    already has are skipped, so a rerun after a finished add changes nothing."""
    export = Path(export_dir)
    report = UpdateReport()
    with _locked(export):
        collect_garbage(export)
        recommender = load_recommender(export)
        # the same request stages in the same place, so a rerun finds what a killed run left
        digest = hashlib.sha256(
            json.dumps([read_info(export)["model_id"], [i.fingerprint() for i in items]]).encode()
        ).hexdigest()[:16]
        staging = export / f"{STAGING_PREFIX}{digest}"
        fresh = [items[i] for i in _split_known(recommender, [i.item_id for i in items], report)]
        if fresh:
            started = time.perf_counter()
            embeddings, report.reused_chunks = _staged_embeddings(
                recommender, fresh, staging, batch_size
            )
            report.seconds["embed"] = time.perf_counter() - started
            _append(export, recommender, [item.item_id for item in fresh], embeddings, report)
        shutil.rmtree(staging, ignore_errors=True)
    return report


def add_embedded_items(
    export_dir: str | Path, item_ids: Sequence[str], embeddings: torch.Tensor
) -> UpdateReport:
    """Add items embedded elsewhere (``embeddings`` (B, D), row i for ``item_ids[i]``: e.g. the
    item tower run in batch on other machines); ids the export already has are skipped."""
    export = Path(export_dir)
    if embeddings.ndim != 2 or len(embeddings) != len(item_ids):
        raise ValueError(f"{len(item_ids)} item ids, embeddings of shape {tuple(embeddings.shape)}")
    report = UpdateReport()
    with _locked(export):
        collect_garbage(export)
        recommender = load_recommender(export)
        if embeddings.shape[1] != recommender.item_embeddings.shape[1]:
            raise ValueError(
                f"embeddings of dim {embeddings.shape[1]}, the export's items have "
                f"{recommender.item_embeddings.shape[1]}"
            )
        fresh = _split_known(recommender, item_ids, report)
        if fresh:
            ids = [item_ids[i] for i in fresh]
            _append(export, recommender, ids, embeddings[torch.as_tensor(fresh)], report)
    return report


def remove_items(export_dir: str | Path, item_ids: Sequence[str]) -> UpdateReport:
    """Mark ``item_ids`` removed and drop them from the index; unknown ids are refused (a
    ``KeyError`` naming them), ids already removed skipped."""
    export = Path(export_dir)
    report = UpdateReport()
    with _locked(export):
        collect_garbage(export)
        recommender = load_recommender(export)
        rows = recommender.rows(list(item_ids))  # KeyError naming unknown ids
        flags = _flags(recommender, 0)
        target = []
        for item_id, row in zip(item_ids, rows, strict=True):
            if flags["removed"][row]:
                report.skipped.append(item_id)
            else:
                flags["removed"][row] = True
                target.append(row)
                report.removed.append(item_id)
        if not target:
            return report
        table = recommender.item_embeddings.cpu()
        index = recommender.index
        live = int((~flags["removed"][1:]).sum())
        if index is None or index.settings.factory_for(live) != index.factory:
            index = _index_with(recommender, table, flags, torch.zeros(0, dtype=torch.long))
        else:
            index.remove(np.asarray(target))
        report.generation = _commit(export, recommender, table, recommender.item_ids, flags, index)
        collect_garbage(export)
    return report
