"""What the item tower reads about each item: tokenized texts, clips from the shards, and the
two ways of serving them to training.

- Frozen encoders (``encoder.mode: frozen``): ``load_or_compute_content`` runs the encoders
  once over the catalogue into a ``ContentEmbeddings`` cache, ``output_dir/item_content.
  safetensors``, reused on a rerun while the fingerprint (encoder weights, catalogue, clip
  keys, clip size, text length) matches. Every rank reads its slice of the clips (the eval-mode
  reader splits the samples by rank) and of the texts, then the embeddings are all-gathered, so
  every rank holds the whole cache; rank 0 writes the file. An item's video embedding is the
  normalized sum of its clips' normalized embeddings, exactly what ``ItemTower.encode_content``
  computes live.
- Encoders that train (``top_k`` / ``full``): the clip store, one decoded clip per item (the
  first clip of the first shard directory that has the item) in a uint8 numpy memmap,
  ``output_dir/item_clips.npy``, built once from the shards so that each training step can
  re-encode its items end to end without decoding video. Its size is (N + 1)·T·C·H·W bytes:
  240 items of 8×3×112×112 take 72 MB, but 1M items of 16×3×224×224 would take 2.4 TB, so this
  is the small-catalogue path; a large catalogue trains with frozen encoders (or would need a
  streaming item sampler, not written). Each rank writes the rows of the clips it read into
  the shared file, so ``output_dir`` must be on a filesystem all ranks see.

Clip keys are unique within one shard directory only (see ``clip_keys_from_shards``), so
clips are located by (directory, key).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm import tqdm

from data_shards.atomic import atomic_write_bytes, atomic_write_text
from data_shards.reader import ReaderConfig, build_loader
from finetune.catalogue import ItemCatalogue, clip_keys_from_shards
from finetune.model import ContentEmbeddings
from pretrain.distributed import World, all_gather_objects, barrier, broadcast_object
from pretrain.model import VideoTextModel

log = logging.getLogger(__name__)

CACHE_FILE = "item_content.safetensors"
CLIP_STORE_FILE = "item_clips.npy"
CLIP_STORE_META = "item_clips.json"


# ============================================================================= item texts


@dataclass
class ItemTexts:
    """Every catalogue item's text, tokenized once; row ``PAD_ID`` (0) is an empty text."""

    input_ids: torch.Tensor
    """(N + 1, Lt) long."""
    attention_mask: torch.Tensor
    """(N + 1, Lt) long."""
    text_mask: torch.Tensor
    """(N + 1,) bool, True where the item has text."""


def tokenize_catalogue(catalogue: ItemCatalogue, tokenizer, max_length: int) -> ItemTexts:
    texts = [""] + [catalogue.text(index) for index in range(1, len(catalogue) + 1)]
    tokens = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return ItemTexts(
        tokens["input_ids"].long(),
        tokens["attention_mask"].long(),
        torch.from_numpy(catalogue.has_text()),
    )


# ============================================================================= clip sources


@dataclass
class ClipSources:
    """Where each item's clips are: per shard directory, sample key → item index."""

    directories: list[str]
    keys: list[dict[str, int]]
    """One map per directory: clip key → item index (1..N); clips of unknown items left out."""
    primary: dict[tuple[int, str], int]
    """(directory index, key) of each item's first clip → item index: the clip store's rows."""

    @property
    def num_clips(self) -> int:
        return sum(len(keys) for keys in self.keys)

    def fingerprint(self) -> str:
        text = json.dumps([self.directories, [sorted(k.items()) for k in self.keys]])
        return hashlib.sha256(text.encode()).hexdigest()


def locate_clips(catalogue: ItemCatalogue, shard_dirs: Sequence[str]) -> ClipSources:
    """Map the clips of ``shard_dirs`` to catalogue items (only JSON members are read)."""
    directories = [str(Path(d).resolve()) for d in shard_dirs]
    keys: list[dict[str, int]] = []
    primary: dict[tuple[int, str], int] = {}
    seen: set[int] = set()
    unknown = 0
    for directory_index, directory in enumerate(directories):
        mapping: dict[str, int] = {}
        for item_id, item_keys in clip_keys_from_shards(directory).items():
            index = catalogue.index.get(item_id)
            if index is None:
                unknown += 1
                continue
            for key in item_keys:
                mapping[key] = index
            if index not in seen:
                seen.add(index)
                primary[(directory_index, item_keys[0])] = index
        keys.append(mapping)
    if unknown:
        log.warning("%d items with clips in the shards are not in the catalogue; ignored", unknown)
    log.info(
        "clips: %d clips of %d / %d catalogue items in %d shard directories",
        sum(len(k) for k in keys),
        len(seen),
        len(catalogue),
        len(directories),
    )
    return ClipSources(directories, keys, primary)


@dataclass
class ClipReading:
    """How the ranks read the items' clips from the shards, together (each its share)."""

    num_frames: int
    size: int
    batch_size: int
    """Clips or texts per encoder forward."""
    workers: int
    """DataLoader workers per rank."""
    world: World
    tokenizer: Any


def _clip_batches(sources: ClipSources, reading: ClipReading, description: str):
    """This rank's share of all clips: yields (directory index, keys, item indices (B,),
    video (B, T, C, H, W) uint8) for the clips of catalogue items."""
    world, batch_size = reading.world, reading.batch_size
    per_step = world.world_size * batch_size
    total = sum(-(-len(keys) // per_step) for keys in sources.keys)
    with tqdm(total=total, desc=description, disable=not world.is_main, unit="batch") as bar:
        for directory_index, directory in enumerate(sources.directories):
            loader = build_loader(
                ReaderConfig(
                    shards=directory,
                    mode="eval",
                    num_frames=reading.num_frames,
                    size=reading.size,
                    batch_size=batch_size,
                    num_workers=reading.workers,
                    max_text_length=8,  # the captions of the shards are not used here
                ),
                rank=world.rank,
                world_size=world.world_size,
                tokenizer=reading.tokenizer,
            )
            mapping = sources.keys[directory_index]
            for batch in loader:
                bar.update(1)
                if "video" not in batch:
                    continue
                keys = [Path(key).name for key in batch["key"]]
                rows = [i for i, key in enumerate(keys) if key in mapping]
                if not rows:
                    continue
                items = torch.tensor([mapping[keys[i]] for i in rows], dtype=torch.long)
                yield directory_index, [keys[i] for i in rows], items, batch["video"][rows]


# ============================================================================= content cache


def content_fingerprint(
    encoder: VideoTextModel,
    texts: ItemTexts,
    sources: ClipSources,
    num_frames: int,
    size: int,
    pooled_text: bool = False,
) -> str:
    """Hash of everything the cached content depends on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    for tensor in (texts.input_ids, texts.attention_mask, texts.text_mask):
        digest.update(tensor.numpy().tobytes())
    digest.update(f"{sources.fingerprint()}:{num_frames}:{size}".encode())
    if pooled_text:  # another text field; caches written before the option keep their hash
        digest.update(b"pooled text")
    return digest.hexdigest()


@torch.no_grad()
def compute_content(
    encoder: VideoTextModel,
    texts: ItemTexts,
    sources: ClipSources,
    reading: ClipReading,
    pooled_text: bool = False,
) -> ContentEmbeddings:
    """Every item's content (fields (N + 1, E); the text (N + 1, Dt) pooled features with
    ``pooled_text``), encoded in slices across ranks, on every rank."""
    world, batch_size = reading.world, reading.batch_size
    was_training = encoder.training
    encoder.eval()  # no dropout: the cache must equal a frozen encoder's live output
    device = next(encoder.parameters()).device
    num_rows = len(texts.text_mask)
    embed_dim = encoder.config.embed_dim
    text_dim = encoder.config.text_config.hidden_size if pooled_text else embed_dim

    clip_items, clip_embeddings = [], []
    for _, _, items, video in _clip_batches(sources, reading, "item clips"):
        _, embedding = encoder.encode_video(video.to(device))  # (B, E), normalized
        clip_items.append(items)
        clip_embeddings.append(embedding.float().cpu())

    text_items = torch.nonzero(texts.text_mask).squeeze(1)[world.rank :: world.world_size]
    text_embeddings = []
    for start in range(0, len(text_items), batch_size):
        rows = text_items[start : start + batch_size]
        ids, mask = texts.input_ids[rows].to(device), texts.attention_mask[rows].to(device)
        if pooled_text:
            embedding = encoder.text_features(ids, mask)  # (B, Dt)
        else:
            _, embedding = encoder.encode_text(ids, mask)  # (B, E), normalized
        text_embeddings.append(embedding.float().cpu())
    encoder.train(was_training)

    def rows(tensors: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors) if tensors else empty

    no_items, no_embeddings = torch.zeros(0, dtype=torch.long), torch.zeros(0, embed_dim)
    clip_parts = all_gather_objects(
        (rows(clip_items, no_items), rows(clip_embeddings, no_embeddings))
    )
    no_texts = torch.zeros(0, text_dim)
    text_parts = all_gather_objects((text_items, rows(text_embeddings, no_texts)))

    content = ContentEmbeddings.empty(num_rows, embed_dim)
    content.text = torch.zeros(num_rows, text_dim)
    video_sum = torch.zeros(num_rows, embed_dim)
    clip_count = torch.zeros(num_rows, dtype=torch.long)
    for items, embeddings in clip_parts:
        video_sum.index_add_(0, items, embeddings)
        clip_count.index_add_(0, items, torch.ones_like(items))
    content.video = F.normalize(video_sum, dim=-1)  # zero rows stay zero
    content.video_mask = clip_count > 0
    for items, embeddings in text_parts:
        content.text[items] = embeddings
    content.text_mask = texts.text_mask.clone()
    return content


def read_content_cache(path: str | Path) -> ContentEmbeddings:
    """The content cache written by ``load_or_compute_content`` (no fingerprint check)."""
    tensors = load_file(str(path))
    return ContentEmbeddings(
        tensors["video"], tensors["text"], tensors["video_mask"].bool(), tensors["text_mask"].bool()
    )


def load_or_compute_content(
    path: str | Path,
    encoder: VideoTextModel,
    texts: ItemTexts,
    sources: ClipSources,
    reading: ClipReading,
    pooled_text: bool = False,
) -> ContentEmbeddings:
    """The cache at ``path`` when its fingerprint matches, else computed and written there
    (``pooled_text``: the text field holds pooled features, ``compute_content``)."""
    path, world = Path(path), reading.world
    fingerprint = content_fingerprint(
        encoder, texts, sources, reading.num_frames, reading.size, pooled_text
    )
    reuse = False
    if world.is_main and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            reuse = (handle.metadata() or {}).get("fingerprint") == fingerprint
        if not reuse:
            log.info("content cache %s is stale (encoder or catalogue changed)", path)
    if broadcast_object(reuse):
        log.info("content cache %s reused", path)
        return read_content_cache(path)
    content = compute_content(encoder, texts, sources, reading, pooled_text)
    if world.is_main:
        tensors = {
            "video": content.video.contiguous(),
            "text": content.text.contiguous(),
            "video_mask": content.video_mask.to(torch.uint8),
            "text_mask": content.text_mask.to(torch.uint8),
        }
        atomic_write_bytes(path, save(tensors, metadata={"fingerprint": fingerprint}))
        log.info(
            "content cache %s written: %d items, %d with clips, %d with text",
            path,
            len(content.video) - 1,
            int(content.video_mask.sum()),
            int(content.text_mask.sum()),
        )
    barrier()
    return content


# ============================================================================= clip store


class ClipStore:
    """One uint8 clip per item, memory-mapped (see the module docstring for the cost)."""

    def __init__(self, path: str | Path, has_clip: np.ndarray):
        self.clips = np.load(path, mmap_mode="r")  # (N + 1, T, C, H, W) uint8
        self.has_clip = torch.from_numpy(has_clip)  # (N + 1,) bool

    def get(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) ids → clips (B, 1, T, C, H, W) uint8 and clip_mask (B, 1) bool."""
        ids = item_ids.cpu().numpy()
        clips = torch.from_numpy(np.ascontiguousarray(self.clips[ids]))
        return clips[:, None], self.has_clip[item_ids.cpu()][:, None]


def read_clip_store(output_dir: str | Path) -> ClipStore:
    """The clip store ``build_clip_store`` left under ``output_dir``; FileNotFoundError naming
    the missing file."""
    path, meta_path = Path(output_dir) / CLIP_STORE_FILE, Path(output_dir) / CLIP_STORE_META
    for required in (path, meta_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} is missing: the clip store of the run")
    return ClipStore(path, np.asarray(json.loads(meta_path.read_text())["has_clip"], dtype=bool))


def build_clip_store(
    output_dir: str | Path,
    sources: ClipSources,
    num_items: int,
    reading: ClipReading,
) -> ClipStore:
    """The clip store under ``output_dir``, built from the shards unless an up-to-date one is
    there. Each rank writes the rows of the primary clips it reads (every row once)."""
    output_dir, world = Path(output_dir), reading.world
    num_frames, size = reading.num_frames, reading.size
    path, meta_path = output_dir / CLIP_STORE_FILE, output_dir / CLIP_STORE_META
    fingerprint = hashlib.sha256(
        f"{sources.fingerprint()}:{num_items}:{num_frames}:{size}".encode()
    ).hexdigest()
    meta = None
    if world.is_main and meta_path.is_file() and path.is_file():
        saved = json.loads(meta_path.read_text())
        meta = saved if saved.get("fingerprint") == fingerprint else None
    meta = broadcast_object(meta)
    if meta is not None:
        log.info("clip store %s reused", path)
        return ClipStore(path, np.asarray(meta["has_clip"], dtype=bool))

    shape = (num_items + 1, num_frames, 3, size, size)
    partial = output_dir / f".{CLIP_STORE_FILE}.partial"
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape).flush()
        log.info("clip store: %.1f MB for %d items", np.prod(shape) / 2**20, num_items)
    barrier()
    store = np.load(partial, mmap_mode="r+")
    written = []
    for directory_index, keys, items, video in _clip_batches(sources, reading, "clip store"):
        for key, item, clip in zip(keys, items.tolist(), video, strict=True):
            if sources.primary.get((directory_index, key)) == item:
                store[item] = clip.numpy()
                written.append(item)
    store.flush()
    del store
    has_clip = np.zeros(num_items + 1, dtype=bool)
    for rows in all_gather_objects(written):
        has_clip[rows] = True
    if world.is_main:
        os.replace(partial, path)
        saved = {"fingerprint": fingerprint, "shape": list(shape), "has_clip": has_clip.tolist()}
        atomic_write_text(meta_path, json.dumps(saved))
    barrier()
    return ClipStore(path, has_clip)
