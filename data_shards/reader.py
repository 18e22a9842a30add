"""Streaming reader: WebDataset shards of clips and captions → batches of uint8 video and tokens.

The pipeline, one stage a line in ``build_pipeline``::

    train  per source: shards drawn with replacement (seeded per slot) → tar to samples
           → one seeded weighted choice of source per sample → shuffle the still-encoded
           samples → number them, skip those consumed before a resume
           → decode T frames by segments, draw k crop boxes and flips → batch + tokenize
    eval   SimpleShardList → split by rank and worker → tar to samples
           → decode, T frames uniformly, centre crop → batch + tokenize

Batches are dicts: ``video`` uint8 (B, T, C, H, W) RGB, not normalized (that is cheaper on
the accelerator); ``input_ids`` and ``attention_mask`` long (B, L); ``text``, ``key``,
``item_id`` (str or None) and ``meta`` (the sample's json, {} without one) as lists.
Eval batches are ready: B clips, centre-cropped to ``size``. Train batches hold B clips at the
shards' resolution and ``crops`` (B, k, 5), the crop box and flip of each of the clip's k
training samples (``samples_per_clip``): ``data_shards.augment.expand_crops`` turns them into
the B·k samples on the accelerator, where cropping is cheap and a clip crosses the process
boundary once however many samples it gives.

How the data is split. Every DataLoader worker of every rank is one *slot*,
``slot = rank * num_workers + worker`` out of ``slots = world_size * num_workers`` (a loader
without workers is one slot per rank). Rank and world size are constructor arguments; nothing
in the pipeline reads torch.distributed or the environment, which is why webdataset's
``split_by_node`` (it reads both) is not used. The worker id comes from
``torch.utils.data.get_worker_info()`` inside the worker.

- eval, at least as many shards as slots: slot s reads shards s, s + slots, s + 2·slots, …
- eval, fewer shards than slots: splitting shards would leave slots (whole ranks, maybe) with
  nothing, so every slot reads every shard and keeps the samples whose running index i (in
  tar order, counted before decoding) has ``i % slots == s``. Each sample is still decoded
  and delivered exactly once; the tars are read ``slots`` times over, which is fine for the
  small sets where this happens.
- train: every slot draws shards with replacement from each source's whole list from its
  own seed, so no slot runs dry whatever the shard count, and picks each sample's source with
  the sources' weights, so the mix follows the weights whatever the shard counts and sizes.
  A pass is ``ceil(epoch_size / (batch_size · world_size))`` batches on every rank (the
  same count everywhere, so no rank waits on another in a collective), or endless without
  ``epoch_size``.
- eval: ranks can get different numbers of batches; gather results after the loop, not in it.

Corrupt data. A sample whose mp4 does not decode, whose json does not parse, or that has no
mp4 is dropped and counted; a tar that cannot be read (truncated, missing, HTTP error) is
logged and counted (one damaged tar can count twice), and the stream goes on with the next
shard. A tar cut off exactly between two members just ends early: tar has no error to give.
The counts travel inside the batches from the workers and add up in ``loader.skipped``
and ``loader.delivered`` (per source name), ``loader.skipped_samples`` and
``loader.shard_errors``.
In train mode a worker that meets ``STALL_LIMIT`` failures in a row without one good sample
raises instead of spinning forever on unreadable data.

Position. ``loader.state_dict()`` (plain JSON) holds the seed, the layout, the sources and
their weights, the pass index (``epoch``), the batches taken in that pass, and for each of
the rank's workers how many samples (good or corrupt, counted before decoding) it had produced
up to the last batch the main process took: prefetched batches do not count. Every random
stream of a slot (shard draws, source choices, shuffle buffer) is seeded from (seed, epoch,
slot), and a sample's frames, crop and flip from (seed, epoch, slot, its position). So after
``load_state_dict`` each slot passes over the samples it had produced, without decoding
them, and the rank yields exactly the batches an uninterrupted pass would have, in the same
order (see ``Slots`` for the worker rotation that keeps the round-robin order). A state saved
with another world size, worker count, mode, seed or mix is refused, naming the field.

Workers are not persistent: each pass builds its pipeline with that pass's seeds and resume
offsets in it, which a persistent worker would never see.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from data_shards.augment import random_crop_box
from data_shards.collate import Collate
from data_shards.frames import ClipCropper, segment_frame_indices, uniform_frame_indices
from data_shards.sources import DEFAULT_SOURCE, ShardSource, check_sources, resolve_sources
from data_shards.text import load_tokenizer
from data_shards.video import VideoError, decode_clip, decode_frames

logger = logging.getLogger(__name__)

STALL_LIMIT = 1000
"""Failures in a row (bad samples or unreadable shards) after which a train worker gives up."""

_STATE_VERSION = 2
# What a saved position depends on besides the sources: another value replays or drops samples.
_LAYOUT_FIELDS = ("mode", "seed", "rank", "world_size", "num_workers", "samples_per_clip")
# Purposes mixed into derived seeds so that the streams of one slot are independent.
_SHARDS, _SHUFFLE, _AUGMENT, _MIX = 0, 1, 2, 3


@dataclass
class ReaderConfig:
    shards: str | list[str] | list[ShardSource]
    """Glob or brace pattern (``dir/{00000..00009}.tar``, ``dir/*.tar``), a directory (its
    ``index.json`` shard list, else its ``*.tar``), ``http(s)://`` URLs, ``pipe:`` commands,
    or a list of any of these; ``::`` separates several in one string. Train mode also takes
    a list of ``ShardSource``: a weighted mix."""
    mode: Literal["train", "eval"] = "train"
    """train: resampled shards, shuffling, random crops; eval: each sample once, centre crops."""
    num_frames: int = 16
    """T, frames per clip."""
    size: int = 224
    """Output height and width."""
    batch_size: int = 32
    """Per rank."""
    num_workers: int = 4
    """DataLoader workers per rank (0 reads in the main process)."""
    shuffle_buffer: int = 1000
    """Encoded samples each train worker shuffles among."""
    seed: int = 0
    tokenizer_dir: str | None = None
    """A local transformers tokenizer directory; None for the packaged all-MiniLM-L6-v2."""
    max_text_length: int = 64
    """L: captions are padded and truncated to this many tokens."""
    epoch_size: int | None = None
    """Train: samples per pass over all ranks (None: one endless pass). Ignored in eval."""
    crop_scale: tuple[float, float] = (0.4, 1.0)
    """Train: area of the random crop as a fraction of the frame."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Train: width / height of the random crop."""
    flip_prob: float = 0.5
    """Train: probability of a horizontal flip (the whole clip)."""
    text_fields: tuple[str, ...] = ("caption",)
    """Train: the texts a clip is paired with, one drawn at random per clip: "caption" is its
    caption (the ``.txt`` member, else the json's ``caption``), any other name a field of its
    json (a list, such as tags, joined with ", "). A field a clip lacks or leaves empty is not
    drawn. Eval always pairs the caption."""
    samples_per_clip: int = 1
    """Train: training samples cut from each decoded clip, each with its own random crop and
    flip (and, in the model, its own tube mask): VideoMAE v2's repeated sampling, which
    divides the decode cost per training sample by about this factor. ``batch_size`` counts
    training samples and must be a multiple of it."""

    def __post_init__(self):
        if self.mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {self.mode!r}")
        for name in ("num_frames", "size", "batch_size", "shuffle_buffer", "max_text_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ValueError(f"epoch_size must be None or at least 1, got {self.epoch_size}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.samples_per_clip < 1:
            raise ValueError(f"samples_per_clip must be at least 1, got {self.samples_per_clip}")
        self.text_fields = tuple(self.text_fields)
        if not self.text_fields or not all(isinstance(f, str) and f for f in self.text_fields):
            raise ValueError(f"text_fields must name at least one field, got {self.text_fields!r}")
        if self.mode == "train" and self.batch_size % self.samples_per_clip:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of samples_per_clip "
                f"{self.samples_per_clip}: a batch holds every copy of its clips"
            )
        if self.is_mix():
            check_sources(self.shards)
            if self.mode == "eval":
                raise ValueError("eval reads one source at a time, not a mix")

    def clips_per_batch(self) -> int:
        """Decoded clips in a batch (train: ``batch_size / samples_per_clip``)."""
        return self.batch_size // self.samples_per_clip if self.mode == "train" else self.batch_size

    def is_mix(self) -> bool:
        return bool(self.shards) and isinstance(self.shards[0], ShardSource)

    def sources(self) -> list[ShardSource]:
        """The weighted sources; a plain spec is one source, ``DEFAULT_SOURCE``."""
        return list(self.shards) if self.is_mix() else [ShardSource(DEFAULT_SOURCE, self.shards)]


def pick_text(caption: str, meta: dict[str, Any], fields: tuple[str, ...], rng) -> str:
    """One of a clip's ``fields`` at random (see ``ReaderConfig.text_fields``); the caption
    when none of them has text."""
    texts = []
    for name in fields:
        value = caption if name == "caption" else meta.get(name)
        if isinstance(value, list):
            value = ", ".join(str(part) for part in value)
        if value:
            texts.append(str(value))
    return texts[rng.randrange(len(texts))] if texts else caption


# ---------------------------------------------------------------------------------------------
# Pipeline stages. They run inside DataLoader workers; each finds its slot there.


@dataclass(frozen=True)
class Slots:
    """Where a worker sits among all readers: ``rank`` of ``world_size``, and by how many
    places this pass rotates the rank's workers.

    DataLoader worker k plays worker ``(k + rotation) % num_workers``: a pass resumed after b
    batches starts at worker b mod num_workers, whose batch would have come next, so the
    round-robin order of an uninterrupted pass is kept.
    """

    rank: int
    world_size: int
    rotation: int = 0

    def here(self) -> tuple[int, int]:
        """(this worker's slot, number of slots) over all ranks; call inside the worker."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.rotation) % num_workers
        return self.rank * num_workers + worker, self.world_size * num_workers

    def index(self) -> int:
        return self.here()[0]

    def worker(self) -> int:
        """This worker's place among its rank's workers (after rotation)."""
        slot, slots = self.here()
        return slot - self.rank * (slots // self.world_size)


def _derive_seed(*parts: int) -> int:
    # SeedSequence mixes well and, unlike hash(), never depends on PYTHONHASHSEED.
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _Tally:
    """Failures one worker has met and not yet reported in a batch."""

    def __init__(self, stall_limit: int | None, num_sources: int = 1):
        self.stall_limit = stall_limit
        self.skipped_samples = [0] * num_sources
        """Per source."""
        self.shard_errors = 0
        self.failures_in_a_row = 0

    def failure(self):
        self.failures_in_a_row += 1
        if self.stall_limit is not None and self.failures_in_a_row >= self.stall_limit:
            raise RuntimeError(
                f"{self.failures_in_a_row} unreadable shards or samples in a row: "
                "check the shard spec and the data"
            )

    def take(self) -> tuple[list[int], int]:
        counts = self.skipped_samples, self.shard_errors
        self.skipped_samples = [0] * len(self.skipped_samples)
        self.shard_errors = 0
        return counts


class _ShardErrorHandler:
    """webdataset handler: log and count a tar that cannot be read, then go on."""

    def __init__(self, tally: _Tally):
        self.tally = tally

    def __call__(self, exn: Exception) -> bool:
        logger.warning("skipping unreadable shard data: %r", exn)
        self.tally.shard_errors += 1
        self.tally.failure()
        return True


def _split_by_slot(shards: Iterator[dict], slots: Slots):
    """Every slots-th shard for this slot, or all shards when there are fewer than slots."""
    slot, count = slots.here()
    shards = list(shards)
    if len(shards) >= count:
        yield from shards[slot::count]
    else:
        yield from shards


def _resampled_shards(urls: Sequence[str], seed: int) -> Iterator[dict[str, str]]:
    """Shards drawn with replacement, for ever, from a seeded stream."""
    rng = random.Random(seed)
    while True:
        yield {"url": rng.choice(urls)}


def mixed_samples(
    source_shards: Sequence[Sequence[str]],
    weights: Sequence[float],
    seed: int,
    slots: Slots,
    handler,
) -> Iterator[dict]:
    """Still-encoded samples of several sources, each drawn with its weight (``__source__``).

    Per slot, every source is its own resampled shard stream and one seeded choice per
    sample picks the source: the same (seed, slot) gives the same stream, whatever the shard
    counts and sizes.
    """
    slot = slots.index()
    streams = [
        iter(
            wds.tarfile_to_samples(handler=handler)(
                _resampled_shards(urls, _derive_seed(seed, slot, _SHARDS, source))
            )
        )
        for source, urls in enumerate(source_shards)
    ]
    rng = random.Random(_derive_seed(seed, slot, _MIX))
    choices = range(len(streams))
    while True:
        source = rng.choices(choices, weights=weights)[0]
        sample = next(streams[source])
        sample["__source__"] = source
        yield sample


def _number_samples(
    samples: Iterator[dict], slots: Slots, resume: Sequence[int], stride_by_slot: bool
):
    """Number this slot's samples (``__position__``), striding and resuming before decoding.

    With ``stride_by_slot`` (eval with fewer shards than slots: every slot sees every
    sample) keep every slots-th. Samples before the slot's resume position were delivered
    before the checkpoint: they are passed over here, read but never decoded.
    """
    slot, count = slots.here()
    stride = count if stride_by_slot else 1
    worker = slots.worker()
    start = resume[worker] if worker < len(resume) else 0
    for index, sample in enumerate(samples):
        if index % stride != slot % stride:
            continue
        position = index // stride
        if position < start:
            continue
        sample["__position__"] = position
        yield sample


def _shuffle_in_slot(samples: Iterator[dict], bufsize: int, seed: int, slots: Slots):
    """webdataset's shuffle with a buffer RNG seeded for this slot."""
    rng = random.Random(_derive_seed(seed, slots.index(), _SHUFFLE))
    yield from wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(samples)


class _ClipDecoder:
    """Sample → {text, key, item_id, meta} with, in train mode, ``frames`` (T × (H, W, 3) at
    the shards' resolution) and ``crops`` (k rows of ``CROP_FIELDS``), in eval mode ``video``
    (T, C, size, size) centre-cropped; or None if corrupt."""

    def __init__(self, config: ReaderConfig, seed: int, slots: Slots, tally: _Tally):
        self.config, self.seed, self.slots = config, seed, slots
        self.train = config.mode == "train"
        self.tally = tally
        self.slot: int | None = None
        self.end_position = 0
        """One past the position of the last sample seen, good or not."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        if self.slot is None:
            # First call, inside the worker: only now is the slot known.
            self.slot = self.slots.index()
        position = sample.get("__position__")
        source = sample.get("__source__", 0)
        if position is not None:
            self.end_position = position + 1
        # Seeded by the sample's place in the slot's stream, not by a running generator: a
        # resumed pass that skips to a position draws the same frames, crop and flip.
        rng = random.Random(_derive_seed(self.seed, self.slot, _AUGMENT, position or 0))
        try:
            decoded = self._decode(sample, rng)
        except (VideoError, ValueError, KeyError, TypeError) as err:
            logger.warning(
                "skipping sample %s (%s): %s", sample.get("__key__"), sample.get("__url__"), err
            )
            self.tally.skipped_samples[source] += 1
            self.tally.failure()
            return None
        self.tally.failures_in_a_row = 0
        decoded["__slot__"] = self.slot
        decoded["__position__"] = position
        decoded["__source__"] = source
        decoded["__tally__"] = self.tally.take()
        return decoded

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        config = self.config
        if "mp4" not in sample:
            raise KeyError("no mp4")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if not isinstance(meta, dict):
            raise ValueError(f"json is a {type(meta).__name__}, not an object")
        if "txt" in sample:
            # A caption with a bad byte still labels a good clip: keep it, replaced.
            text = sample["txt"].decode("utf-8", errors="replace")
        else:
            text = str(meta.get("caption") or "")
        if self.train and config.text_fields != ("caption",):
            text = pick_text(text, meta, config.text_fields, rng)
        item_id = meta.get("item_id")
        decoded = {
            "text": text,
            "key": sample["__key__"],
            "item_id": None if item_id is None else str(item_id),
            "meta": meta,
        }
        if self.train:
            select = functools.partial(segment_frame_indices, num_frames=config.num_frames, rng=rng)
            # Frames at the shards' resolution; the crops are cut where the batch goes.
            frames = decode_frames(sample["mp4"], select=select)  # T × (H, W, 3)
            height, width = frames[0].shape[:2]
            crops = [self._draw_crop(height, width, rng) for _ in range(config.samples_per_clip)]
            return decoded | {"frames": frames, "crops": crops}
        select = functools.partial(uniform_frame_indices, num_frames=config.num_frames)
        cropper = ClipCropper(config.size)
        clip = decode_clip(sample["mp4"], select=select, convert=cropper)
        return decoded | {"video": torch.from_numpy(clip)}  # (T, C, H, W)

    def _draw_crop(self, height: int, width: int, rng: random.Random) -> list[int]:
        """One training sample's row of ``CROP_FIELDS``: a random box and a flip."""
        config = self.config
        box = random_crop_box(height, width, config.crop_scale, config.crop_ratio, rng)
        return [*box, int(rng.random() < config.flip_prob)]


def _report_leftovers(batches: Iterator[dict], decoder: _ClipDecoder, tally: _Tally):
    """Pass batches on, then report failures met after the last batch in a video-less batch."""
    yield from batches
    skipped, shard_errors = tally.take()
    if any(skipped) or shard_errors:
        yield {
            "_reader": {
                "slot": decoder.slot,
                "end_position": decoder.end_position,
                "sources": [],
                "skipped": skipped,
                "shard_errors": shard_errors,
            }
        }


# Curried stages: ``split_by_slot(slots)`` is a pipeline stage, as in webdataset.
split_by_slot = wds.pipelinefilter(_split_by_slot)
number_samples = wds.pipelinefilter(_number_samples)
shuffle_in_slot = wds.pipelinefilter(_shuffle_in_slot)
report_leftovers = wds.pipelinefilter(_report_leftovers)


def build_pipeline(
    config: ReaderConfig,
    source_shards: Sequence[Sequence[str]],
    tokenizer,
    *,
    slots: Slots,
    epoch: int = 0,
    resume: Sequence[int] = (),
    batches_per_worker: int | None = None,
) -> wds.DataPipeline:
    """The per-worker pipeline for one pass, yielding collated batches.

    ``source_shards`` holds the shard list of each of ``config.sources()`` (eval: one).
    ``resume[w]`` is how many samples worker w of this rank already consumed in this pass.
    Batches also carry a ``_reader`` dict of bookkeeping that ``VideoTextLoader`` removes.
    """
    train = config.mode == "train"
    seed = _derive_seed(config.seed, epoch)
    tally = _Tally(STALL_LIMIT if train else None, len(source_shards))
    handler = _ShardErrorHandler(tally)
    decoder = _ClipDecoder(config, seed, slots, tally)
    collate = Collate(tokenizer, config.max_text_length)
    if train:
        weights = [source.weight for source in config.sources()]
        stages = [
            functools.partial(mixed_samples, source_shards, weights, seed, slots, handler),
            shuffle_in_slot(config.shuffle_buffer, seed, slots),
            number_samples(slots, list(resume), stride_by_slot=False),
        ]
    else:
        (shards,) = source_shards
        slots_total = slots.world_size * max(1, config.num_workers)
        stages = [
            wds.SimpleShardList(shards),
            split_by_slot(slots),
            wds.tarfile_to_samples(handler=handler),
            number_samples(slots, list(resume), stride_by_slot=len(shards) < slots_total),
        ]
    stages += [
        wds.map(decoder),
        wds.batched(config.clips_per_batch(), collation_fn=collate, partial=not train),
        report_leftovers(decoder, tally),
    ]
    pipeline = wds.DataPipeline(*stages)
    if batches_per_worker is not None:
        pipeline = pipeline.with_epoch(batches_per_worker)
    return pipeline


# ---------------------------------------------------------------------------------------------
# Loader


class VideoTextLoader:
    """Iterates batches for one rank, a pass at a time; counts samples; saves its position."""

    def __init__(self, config: ReaderConfig, rank: int = 0, world_size: int = 1, tokenizer=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.sources = config.sources()
        self.source_shards = resolve_sources(self.sources)
        self.tokenizer = (
            tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer_dir)
        )
        self.train = config.mode == "train"
        self.workers_per_rank = max(1, config.num_workers)
        self.num_batches: int | None = None
        """Batches per pass on this rank; None for an endless train pass or an eval pass."""
        if self.train and config.epoch_size is not None:
            self.num_batches = math.ceil(config.epoch_size / (config.batch_size * world_size))
        self.epoch = 0
        """Index of the pass under way, or next to start."""
        self.batches_in_epoch = 0
        self.positions = [0] * self.workers_per_rank
        """Samples (good or corrupt, counted before decoding) each worker of this rank has
        consumed in the current pass, up to the last batch this process took."""
        self.delivered = dict.fromkeys((source.name for source in self.sources), 0)
        """Training samples delivered in batches, per source name (``samples_per_clip`` a clip)."""
        self.skipped = dict.fromkeys((source.name for source in self.sources), 0)
        """Corrupt samples passed over, per source name."""
        self.shard_errors = 0
        logger.info(
            "reader rank %d/%d: %s, mode %s, %d workers",
            rank,
            world_size,
            ", ".join(
                f"{source.name} ({len(shards)} shards, weight {source.weight:g})"
                for source, shards in zip(self.sources, self.source_shards, strict=True)
            ),
            config.mode,
            config.num_workers,
        )

    @property
    def shards(self) -> list[str]:
        """Every shard of every source."""
        return [url for shards in self.source_shards for url in shards]

    @property
    def skipped_samples(self) -> int:
        return sum(self.skipped.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        config = self.config
        remaining = None
        batches_per_worker = None
        if self.num_batches is not None:
            remaining = self.num_batches - self.batches_in_epoch
            batches_per_worker = math.ceil(remaining / self.workers_per_rank)
        slots = Slots(self.rank, self.world_size, self.batches_in_epoch % self.workers_per_rank)
        dataset = build_pipeline(
            config,
            self.source_shards,
            self.tokenizer,
            slots=slots,
            epoch=self.epoch,
            resume=self.positions,
            batches_per_worker=batches_per_worker,
        )
        loader = wds.WebLoader(
            dataset, batch_size=None, num_workers=config.num_workers, persistent_workers=False
        )
        names = [source.name for source in self.sources]
        copies = config.samples_per_clip if self.train else 1
        delivered = 0
        if remaining is None or remaining > 0:
            for batch in loader:
                bookkeeping = batch.pop("_reader")
                for name, skipped in zip(names, bookkeeping["skipped"], strict=True):
                    self.skipped[name] += skipped
                for source in bookkeeping["sources"]:
                    self.delivered[names[source]] += copies
                self.shard_errors += bookkeeping["shard_errors"]
                if bookkeeping["end_position"] is not None:
                    worker = bookkeeping["slot"] - self.rank * self.workers_per_rank
                    self.positions[worker] = bookkeeping["end_position"]
                if "video" not in batch:
                    continue
                self.batches_in_epoch += 1
                delivered += 1
                yield batch
                if remaining is not None and delivered >= remaining:
                    break
        logger.info(
            "reader rank %d: pass %d done, %d batches, %d samples skipped, %d shard errors",
            self.rank,
            self.epoch,
            self.batches_in_epoch,
            self.skipped_samples,
            self.shard_errors,
        )
        self.epoch += 1
        self.batches_in_epoch = 0
        self.positions = [0] * self.workers_per_rank

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, lists and dicts (JSON and torch.save both take it); one per rank."""
        return {
            "version": _STATE_VERSION,
            "mode": self.config.mode,
            "seed": self.config.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.config.num_workers,
            "samples_per_clip": self.config.samples_per_clip,
            "sources": {source.name: source.weight for source in self.sources},
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "positions": list(self.positions),
            "delivered": dict(self.delivered),
            "skipped": dict(self.skipped),
            "skipped_samples": self.skipped_samples,
            "shard_errors": self.shard_errors,
        }

    def _upgrade(self, state: dict[str, Any]) -> dict[str, Any]:
        """A version-1 state (saved before exact resume, one source) in this version's terms.

        Its training streams cannot be replayed: a train state goes on with the next pass.
        Eval positions meant then what they mean now."""
        first = self.sources[0]
        upgraded = state | {
            "version": _STATE_VERSION,
            # a mix cannot take a one-source state: the comparison then names the field
            "sources": {first.name: first.weight} if len(self.sources) == 1 else {},
            "delivered": {first.name: 0},
            "skipped": {first.name: state["skipped_samples"]},
        }
        if state["mode"] == "train":
            logger.warning(
                "reader state of version 1 (before exact resume): pass %d cannot be replayed, "
                "going on with pass %d",
                state["epoch"],
                state["epoch"] + 1,
            )
            upgraded |= {
                "epoch": state["epoch"] + 1,
                "batches_in_epoch": 0,
                "positions": [0] * self.workers_per_rank,
            }
        return upgraded

    def load_state_dict(self, state: dict[str, Any]):
        """Continue from ``state``; refuses one saved with another layout, naming the field.

        The positions are per slot (rank × worker), so another world size or worker count
        would replay or drop samples; other sources or weights another stream.
        """
        if state.get("version") == 1:
            state = self._upgrade(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"unknown reader state version {state.get('version')}; this reader writes "
                f"version {_STATE_VERSION}"
            )
        here = self.state_dict()
        # a state saved before repeated sampling: one sample per clip
        state = {"samples_per_clip": 1} | state
        for field_name in (*_LAYOUT_FIELDS, "sources"):
            if state[field_name] != here[field_name]:
                raise ValueError(
                    f"reader state field {field_name!r} was {state[field_name]!r} when saved, "
                    f"this reader has {here[field_name]!r}: resuming needs the same"
                )
        self.epoch = state["epoch"]
        self.batches_in_epoch = state["batches_in_epoch"]
        self.positions = list(state["positions"])
        self.delivered = dict(state["delivered"])
        self.skipped = dict(state["skipped"])
        self.shard_errors = state["shard_errors"]


def build_loader(
    config: ReaderConfig, rank: int = 0, world_size: int = 1, tokenizer=None
) -> VideoTextLoader:
    """The loader for one rank; rank and world size come from the caller, never from globals.

    ``tokenizer`` defaults to the one in ``config.tokenizer_dir``.
    """
    return VideoTextLoader(config, rank=rank, world_size=world_size, tokenizer=tokenizer)
