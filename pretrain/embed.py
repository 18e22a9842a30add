"""Batch inference with an export: clip embeddings of a shard set, text embeddings of queries.

Clips. Every process reads its share of the shards with the reader in eval mode (each sample
exactly once over all processes, centre crops, uniform frames: the preprocessing the export
records). Rank and process count come from the launcher's ``RANK`` / ``WORLD_SIZE`` (torchrun,
deepspeed, SLURM through ``srun`` with them exported) or default to one process; processes do
not talk to each other, so no process group is started. Output, one directory::

    part-r00000-of-00002-c000000.parquet   rank 0 of 2, chunk 0: key, item_id, embedding, model_id
    _progress/rank00000-of-00002.json      rank 0's reader position after its last written chunk

A chunk is ``chunk_batches`` batches. Its part file is written atomically (temporary file, then
rename), then the rank's progress file; a rerun of the same command starts each rank after its
last recorded chunk (the eval reader skips consumed samples before decoding them), and a rank
that had finished does nothing. A crash between the two writes only repeats that chunk, under
the same file name. Readers ignore ``_progress`` (pyarrow skips ``_`` and ``.`` names).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_shards.atomic import atomic_write_bytes, atomic_write_text, make_output_dir
from data_shards.reader import ReaderConfig, build_loader
from data_shards.shard_set import read_index
from data_shards.sources import resolve_shards
from pretrain.export import ExportedModel, load_export

log = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
_PART = re.compile(r"part-r(\d{5})-of-(\d{5})-c(\d{6})\.parquet")


@dataclass
class EmbedResult:
    """What one process did in one call."""

    rank: int
    world_size: int
    clips: int
    """Clips embedded in this call (not those of chunks done before a resume)."""
    seconds: float
    """Wall time of reading, decoding and the model, from the first batch requested."""
    parts_written: int
    resumed_from_chunk: int
    """Chunks this rank had written before this call."""
    total_clips: int
    """Clips in all of this rank's part files."""

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else float("nan")


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) without one."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world_size}")
    return rank, world_size


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _embedding_schema(model_id: str, dim: int):
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("item_id", pa.string()),
            ("embedding", pa.list_(pa.float32())),
            ("model_id", pa.string()),
        ],
        metadata={"model_id": model_id, "embedding_dim": str(dim)},
    )


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _write_chunk(
    path: Path, keys: list[str], item_ids: list[str | None], embeddings: torch.Tensor, model_id: str
) -> None:
    import pyarrow as pa

    schema = _embedding_schema(model_id, embeddings.shape[1])
    table = pa.table(
        {
            "key": keys,
            "item_id": item_ids,
            "embedding": embeddings.float().cpu().numpy().tolist(),
            "model_id": [model_id] * len(keys),
        },
        schema=schema,
    )
    atomic_write_bytes(path, _parquet_bytes(table))


def _check_layout(out_dir: Path, world_size: int) -> None:
    """Part files of another process count in the same directory would double some rows."""
    for path in out_dir.glob("part-*.parquet"):
        match = _PART.fullmatch(path.name)
        if match and int(match.group(2)) != world_size:
            raise ValueError(
                f"{out_dir} holds {path.name}, written by {int(match.group(2))} processes; this "
                f"run has {world_size}: resume with the same count or use a new directory"
            )


def embed_clips(
    export: str | Path | ExportedModel,
    shards: str | list[str],
    out_dir: str | Path,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    batch_size: int = 32,
    num_workers: int = 2,
    chunk_batches: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed this process's share of ``shards`` into part files under ``out_dir``."""
    from tqdm import tqdm

    if rank is None or world_size is None:
        rank, world_size = process_rank()
    if chunk_batches < 1:
        raise ValueError("chunk_batches must be >= 1")
    exported = (
        export
        if isinstance(export, ExportedModel)
        else load_export(export, device=device or default_device())
    )
    out = Path(out_dir)
    make_output_dir(out)
    _check_layout(out, world_size)
    prefix = f"r{rank:05d}-of-{world_size:05d}"
    progress_path = out / PROGRESS_DIR / f"rank{rank:05d}-of-{world_size:05d}.json"
    shard_list = resolve_shards(shards)
    settings = {
        "model_id": exported.model_id,
        "shards": shard_list,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "chunk_batches": chunk_batches,
    }
    state: dict[str, Any] = {"settings": settings, "chunks": 0, "clips": 0, "done": False}
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text())
        changed = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
        if changed:
            raise ValueError(
                f"{out} holds embeddings made with other {', '.join(changed)}; "
                "rerun with the same settings or use a new directory"
            )
        state = saved
    resumed_from = state["chunks"]
    if state["done"]:
        log.info("embed rank %d/%d: already complete (%d clips)", rank, world_size, state["clips"])
        return EmbedResult(rank, world_size, 0, 0.0, 0, resumed_from, state["clips"])

    preprocessing = exported.preprocessing
    loader = build_loader(
        ReaderConfig(
            shards=shard_list,
            mode="eval",
            num_frames=preprocessing.num_frames,
            size=preprocessing.image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            max_text_length=preprocessing.max_text_length,
        ),
        rank=rank,
        world_size=world_size,
        tokenizer=exported.tokenizer,
    )
    if "reader" in state:
        loader.load_state_dict(state["reader"])
    bar = tqdm(
        total=_expected_clips(shard_list, world_size),
        initial=state["clips"],
        unit="clip",
        desc=f"embed {rank}/{world_size}",
        disable=not progress or rank != 0,
    )
    keys: list[str] = []
    item_ids: list[str | None] = []
    embeddings: list[torch.Tensor] = []
    batches_in_chunk = parts = clips = 0

    def flush() -> None:
        nonlocal keys, item_ids, embeddings, batches_in_chunk, parts
        path = out / f"part-{prefix}-c{state['chunks']:06d}.parquet"
        _write_chunk(path, keys, item_ids, torch.cat(embeddings), exported.model_id)
        state["chunks"] += 1
        state["clips"] += len(keys)
        state["reader"] = loader.state_dict()
        atomic_write_text(progress_path, json.dumps(state))
        keys, item_ids, embeddings, batches_in_chunk = [], [], [], 0
        parts += 1

    started = time.perf_counter()
    for batch in loader:
        embeddings.append(exported.embed_video(batch["video"]).cpu())  # (B, E)
        keys += batch["key"]
        item_ids += batch["item_id"]
        batches_in_chunk += 1
        clips += len(batch["key"])
        bar.update(len(batch["key"]))
        if batches_in_chunk == chunk_batches:
            flush()
    if keys:
        flush()
    seconds = time.perf_counter() - started
    bar.close()
    state["done"] = True
    state.pop("reader", None)  # a finished pass has no position to resume from
    atomic_write_text(progress_path, json.dumps(state))
    if loader.skipped_samples or loader.shard_errors:
        log.warning(
            "embed rank %d: %d samples skipped, %d shard errors (see the reader's warnings)",
            rank,
            loader.skipped_samples,
            loader.shard_errors,
        )
    result = EmbedResult(rank, world_size, clips, seconds, parts, resumed_from, state["clips"])
    log.info(
        "embed rank %d/%d: %d clips in %.1f s (%.1f clips/s), %d part files",
        rank,
        world_size,
        clips,
        seconds,
        result.clips_per_second,
        parts,
    )
    return result


def _expected_clips(shards: list[str], world_size: int) -> int | None:
    """This rank's approximate share of the samples, from the shard set's index, for the bar."""
    directories = {Path(shard).parent for shard in shards if "://" not in shard}
    if len(directories) != 1:
        return None
    total = (read_index(next(iter(directories))) or {}).get("total_samples")
    return math.ceil(total / world_size) if isinstance(total, int) else None


def read_texts(texts: Iterable[str] = (), text_file: str | Path | None = None) -> list[str]:
    """Queries from arguments and from a file of one query a line (blank lines skipped)."""
    queries = list(texts)
    if text_file is not None:
        lines = Path(text_file).read_text(encoding="utf-8").splitlines()
        queries += [line.strip() for line in lines if line.strip()]
    return queries


def embed_texts(
    export: str | Path | ExportedModel,
    texts: list[str],
    out_path: str | Path,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> int:
    """Embed queries into one Parquet file (query_id, text, embedding, model_id); rows written."""
    import pyarrow as pa

    if not texts:
        raise ValueError("no texts to embed")
    exported = (
        export
        if isinstance(export, ExportedModel)
        else load_export(export, device=device or default_device())
    )
    embeddings = torch.cat(
        [
            exported.embed_text(texts[start : start + batch_size]).cpu()
            for start in range(0, len(texts), batch_size)
        ]
    )  # (N, E)
    schema = pa.schema(
        [
            ("query_id", pa.int64()),
            ("text", pa.string()),
            ("embedding", pa.list_(pa.float32())),
            ("model_id", pa.string()),
        ],
        metadata={"model_id": exported.model_id, "embedding_dim": str(embeddings.shape[1])},
    )
    table = pa.table(
        {
            "query_id": list(range(len(texts))),
            "text": list(texts),
            "embedding": embeddings.numpy().tolist(),
            "model_id": [exported.model_id] * len(texts),
        },
        schema=schema,
    )
    atomic_write_bytes(Path(out_path), _parquet_bytes(table))
    log.info("embedded %d texts into %s", len(texts), out_path)
    return len(texts)
