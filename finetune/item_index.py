"""The item index of a recommender export: faiss over the retrieval vectors of its items.

Below ``IndexSettings.exact_below`` items the index is exact (``IDMap,Flat``: every item
scored); above it an approximate faiss index named by a factory string (``IVF1024,Flat``,
``HNSW32``, ...). faiss ids are the items' table rows, so a search answers in rows and rows map
to catalogue ids through ``catalogue.json``. The index only proposes candidates: serving
re-ranks them with the full ranking head (``finetune.serving``).

Retrieval vectors make the head's score an inner product where it is one: with the dot head an
item is ``[normalize(i), w · prior(i)]`` and a user ``[normalize(u), 1]``, so the inner product
is the head's logit divided by its logit scale, popularity prior included. The mlp head is not
an inner product; its candidates are the items nearest by cosine.

The index file is faiss's own binary format (``faiss.write_index``), never a pickle; its
sha256 is recorded in ``export_info.json`` under ``item_index`` and checked before it is read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from data_shards.atomic import file_sha256
from finetune.popularity import new_item_prior
from pretrain.export import ExportError

log = logging.getLogger(__name__)

INDEX_KEY = "item_index"
"""Key of the index entry in ``export_info.json``."""
INDEX_FORMAT = 1
EXACT_FACTORY = "Flat"


@dataclass
class IndexSettings:
    """How an export's item index is built and searched (recorded in ``export_info.json``)."""

    exact_below: int = 50_000
    """Catalogues with fewer items get the exact index."""
    factory: str = "auto"
    """faiss factory string of the approximate index; ``auto``: ``IVF<n>,Flat`` with n about
    the square root of the item count (a power of two)."""
    nprobe: int = 16
    """IVF lists searched per query (an IVF index). 16 of ``auto``'s 1,024 lists at 1 M items:
    recall@10 0.999 against exact at 14× its users/s (BENCHMARKS.md, "Serving")."""
    ef_search: int = 128
    """HNSW search breadth (an HNSW index)."""
    candidates: int = 100
    """Items the index proposes per user (plus the user's seen items) for the exact re-rank."""
    train_sample: int = 64
    """IVF k-means trains on at most this many points per list."""
    seed: int = 0

    def __post_init__(self):
        for name in ("exact_below", "nprobe", "ef_search", "candidates", "train_sample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"index.{name}: a positive integer, got {value!r}")
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ValueError(f"index.factory: a faiss factory string or 'auto': {self.factory!r}")

    def factory_for(self, num_items: int) -> str:
        """The factory string this catalogue size gets."""
        if num_items < self.exact_below:
            return EXACT_FACTORY
        if self.factory != "auto":
            return self.factory
        lists = 2 ** round(math.log2(max(16.0, math.sqrt(num_items))))
        return f"IVF{lists},Flat"

    @classmethod
    def from_json(cls, values: Mapping[str, Any], where: str) -> IndexSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown index setting(s) {', '.join(unknown)}")
        return cls(**values)


# ============================================================================= vector spaces


def item_vectors(
    embeddings: torch.Tensor,  # (N, D)
    normalize: bool,
    prior_bias: torch.Tensor | None = None,  # (N,) w · prior, in cosine units
) -> np.ndarray:
    """(N, D + 1) float32 retrieval vectors of items: the head's item side, prior last."""
    items = F.normalize(embeddings.float(), dim=-1) if normalize else embeddings.float()
    bias = torch.zeros(len(items)) if prior_bias is None else prior_bias.float().cpu()
    return torch.cat([items.cpu(), bias[:, None]], dim=1).contiguous().numpy()


def query_vectors(states: torch.Tensor, normalize: bool) -> np.ndarray:
    """(U, D + 1) float32 retrieval vectors of user states (the prior column's weight 1)."""
    users = F.normalize(states.float(), dim=-1) if normalize else states.float()
    return torch.cat([users.cpu(), torch.ones(len(users), 1)], dim=1).contiguous().numpy()


# ============================================================================= the index


class ItemIndex:
    """A faiss inner-product index whose ids are item table rows."""

    def __init__(self, index: faiss.Index, factory: str, settings: IndexSettings):
        self.index, self.factory, self.settings = index, factory, settings
        self._apply_search_settings()

    @classmethod
    def build(cls, vectors: np.ndarray, rows: np.ndarray, settings: IndexSettings) -> ItemIndex:
        """An index over ``vectors`` (N, Dv) float32 whose ids are ``rows`` (N,) int64."""
        factory = settings.factory_for(len(vectors))
        # IVF indexes store ids themselves; the others need an id map around them.
        wrapped = factory if factory.startswith(("IVF", "IDMap")) else f"IDMap,{factory}"
        try:
            index = faiss.index_factory(vectors.shape[1], wrapped, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"index factory {factory!r}: {err}") from err
        if not index.is_trained:
            index.train(cls._training_sample(vectors, index, settings))
        built = cls(index, factory, settings)
        built.add(vectors, rows)
        return built

    @staticmethod
    def _training_sample(vectors, index, settings: IndexSettings) -> np.ndarray:
        """``train_sample`` points per IVF list; other trained kinds (PQ, ...) 100,000."""
        try:
            size = settings.train_sample * faiss.extract_index_ivf(index).nlist
        except RuntimeError:  # not an IVF index
            size = 100_000
        size = min(len(vectors), size)
        if size == len(vectors):
            return vectors
        rng = np.random.default_rng(settings.seed)
        return vectors[np.sort(rng.choice(len(vectors), size, replace=False))]

    def _apply_search_settings(self) -> None:
        space = faiss.ParameterSpace()
        settings = self.settings
        for name, value in (("nprobe", settings.nprobe), ("efSearch", settings.ef_search)):
            # an index without such a parameter (nprobe of a flat index) ignores it
            with contextlib.suppress(RuntimeError):
                space.set_index_parameter(self.index, name, value)

    def tune(self, **changes) -> None:
        """Other search settings (``nprobe``, ``ef_search``, ``candidates``) from now on."""
        self.settings = replace(self.settings, **changes)
        self._apply_search_settings()

    @property
    def exact(self) -> bool:
        return self.factory == EXACT_FACTORY

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        self.index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(rows, dtype=np.int64)
        )

    def remove(self, rows: np.ndarray) -> int:
        """Remove ``rows``; returns how many the index held. Indexes that cannot remove
        (HNSW) keep them and serving filters them out by the catalogue's removed flags."""
        selector = faiss.IDSelectorBatch(np.asarray(rows, dtype=np.int64))
        try:
            return int(self.index.remove_ids(selector))
        except RuntimeError:
            log.info("%s cannot remove ids: removed rows stay, filtered at search", self.factory)
            return 0

    def search(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(U, count) scores and rows, best first; row -1 where fewer items were found."""
        count = max(1, min(count, self.size))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), count)
        return scores, rows

    # ------------------------------------------------------------------ files

    def write(self, path: str | Path) -> None:
        """Atomically: a reader sees the previous file or this one (see ``data_shards.atomic``)."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        faiss.write_index(self.index, str(temporary))
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def entry(self, file: str, path: Path, num_items: int, dim: int, generation: int) -> dict:
        """The ``export_info.json`` entry that describes (and hashes) the written file."""
        return {
            "format": INDEX_FORMAT,
            "file": file,
            "sha256": file_sha256(path),
            "factory": self.factory,
            "metric": "inner_product",
            "size": self.size,
            "num_items": num_items,
            "dim": dim,
            "generation": generation,
            "settings": asdict(self.settings),
        }

    @classmethod
    def read(cls, directory: Path, entry: Mapping[str, Any]) -> ItemIndex:
        """The index an export's entry names, after checking its sha256 (an error names the
        file)."""
        path = directory / entry["file"]
        if not path.is_file():
            raise IndexFileError(f"{path} is missing: the item index of the export")
        if file_sha256(path) != entry.get("sha256"):
            raise IndexFileError(f"{path}: content differs from the export (sha256 mismatch)")
        try:
            settings = IndexSettings.from_json(entry.get("settings", {}), str(path))
            index = faiss.read_index(str(path))
        except (RuntimeError, ValueError, TypeError) as err:
            raise IndexFileError(f"{path}: not a readable faiss index ({err})") from err
        if index.ntotal != entry.get("size"):
            raise IndexFileError(
                f"{path}: {index.ntotal} vectors, export_info.json says {entry.get('size')}"
            )
        return cls(index, entry["factory"], settings)


class IndexFileError(ExportError):
    """A damaged or missing index file (the message names it)."""


# ============================================================================= an export's index


def head_item_vectors(head, embeddings: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """Retrieval vectors (N, D + 1) of table ``rows`` for a ``RankingHead``: its dot product
    with the prior as the last column, or plain cosine for the mlp head."""
    if head.kind != "dot":
        return item_vectors(embeddings, normalize=True)
    bias = None
    if head.popularity_prior is not None:
        prior = head.popularity_prior.cpu()
        bias = prior[rows.clamp(max=len(prior) - 1)].clone()
        added = rows >= len(prior)  # rows past the table, being added: a new item's prior
        if added.any():
            bias[added] = new_item_prior(head, embeddings[added].to(prior.device)).cpu()
        bias = bias * head.popularity_weight.detach().cpu()
    return item_vectors(embeddings, head.normalize, bias)


def head_query_vectors(head, states: torch.Tensor) -> np.ndarray:
    return query_vectors(states, normalize=head.normalize or head.kind != "dot")


def build_index(
    head, table: torch.Tensor, removed: torch.Tensor, settings: IndexSettings
) -> ItemIndex:
    """The index of every non-removed row of the (N + 1, D) ``table`` (row 0 is padding)."""
    rows = torch.nonzero(~removed[1:]).flatten() + 1
    started = time.perf_counter()
    index = ItemIndex.build(head_item_vectors(head, table[rows], rows), rows.numpy(), settings)
    log.info(
        "item index %s over %d items built in %.1f s",
        index.factory, index.size, time.perf_counter() - started,
    )  # fmt: skip
    return index
