"""Zero-shot video↔text retrieval: recall@k and ranks over a whole eval set.

``retrieval_metrics`` scores paired embeddings (row i of both is one sample) in chunks of rows,
so the N × N similarity matrix is never held at once. ``evaluate_retrieval`` encodes the eval
batches of this rank and merges all ranks' embeddings through a ``gather`` callable the caller
provides; nothing here calls ``torch.distributed``.

Ranks are 1-based. A candidate whose similarity *equals* the best positive's is counted as
ranked above it (pessimistic): a collapsed model whose embeddings are all the same gets rank N,
not rank 1. With ``groups``, every candidate of the query's group is a positive (several clips
of one item, several captions of one video); the rank is that of the best-scoring positive
among the negatives only, i.e. 1 + the number of negatives scoring at least as high as it, so
positives never push each other down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import nullcontext
from itertools import islice
from typing import Any

import torch

logger = logging.getLogger(__name__)

GatherFn = Callable[[dict[str, Any]], list[dict[str, Any]]]
"""All-gathers one picklable dict per rank and returns them all, in rank order."""


def retrieval_metrics(
    video_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """Text→video (``t2v_*``) and video→text (``v2t_*``) recall@k in %, median and mean rank.

    video_embeds and text_embeds (N, E): row i of each is the same sample; similarity is the
    dot product (cosine for the model's L2-normalized embeddings). ``groups`` (N labels, e.g.
    item ids) makes every sample of a query's group a positive. At most chunk_size × N
    similarities exist at a time. The median of an even count is the mean of the middle two.
    """
    if video_embeds.ndim != 2 or video_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"need two (N, E) tensors of one shape, got {tuple(video_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    num_samples = video_embeds.shape[0]
    if num_samples == 0:
        raise ValueError("no samples to evaluate")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    group_ids = _group_ids(groups, num_samples, video_embeds.device)  # (N,)
    # half precision would turn near-equal similarities into ties
    video_embeds, text_embeds = _at_least_float32(video_embeds), _at_least_float32(text_embeds)
    text_embeds = text_embeds.to(video_embeds.device)

    metrics: dict[str, float] = {}
    for direction, queries, candidates in (
        ("t2v", text_embeds, video_embeds),
        ("v2t", video_embeds, text_embeds),
    ):
        ranks = _ranks(queries, candidates, group_ids, chunk_size)  # (N,)
        for k in ks:
            metrics[f"{direction}_r{k}"] = 100.0 * (ranks <= k).double().mean().item()
        ordered = ranks.sort().values
        middle = (ordered[(num_samples - 1) // 2] + ordered[num_samples // 2]).item()
        metrics[f"{direction}_median_rank"] = middle / 2
        metrics[f"{direction}_mean_rank"] = ranks.double().mean().item()
    metrics["num_samples"] = num_samples
    return metrics


def _at_least_float32(embeds: torch.Tensor) -> torch.Tensor:
    if embeds.dtype in (torch.float32, torch.float64):
        return embeds
    return embeds.float()


def _group_ids(
    groups: Sequence[Hashable] | None, num_samples: int, device: torch.device
) -> torch.Tensor:
    """(N,) int64 group index of each sample; without groups every sample is its own."""
    if groups is None:
        return torch.arange(num_samples, device=device)
    if isinstance(groups, torch.Tensor):
        groups = groups.tolist()
    if len(groups) != num_samples:
        raise ValueError(f"{len(groups)} groups for {num_samples} samples")
    index: dict[Hashable, int] = {}
    ids = [index.setdefault(group, len(index)) for group in groups]
    return torch.tensor(ids, device=device)


def _ranks(
    queries: torch.Tensor,  # (N, E)
    candidates: torch.Tensor,  # (N, E)
    group_ids: torch.Tensor,  # (N,)
    chunk_size: int,
) -> torch.Tensor:
    """(N,) 1-based rank of each query's best positive among the negatives, ties counted above."""
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        stop = start + chunk_size
        scores = queries[start:stop] @ candidates.T  # (c, N)
        positive = group_ids[start:stop, None] == group_ids[None, :]  # (c, N)
        # read the positive's score from this very matrix: a separately computed dot product
        # can differ in the last bit and break or invent ties
        best_positive = scores.masked_fill(~positive, float("-inf")).amax(dim=1)  # (c,)
        beaten_by = (scores >= best_positive[:, None]) & ~positive  # (c, N)
        ranks.append(1 + beaten_by.sum(dim=1))
    return torch.cat(ranks)


def merge_gathered(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the dicts of all ranks, drop repeated keys (first kept), sort by key.

    Each part: ``key`` list[str], ``group`` list, ``video_embeds`` and ``text_embeds`` (n, E).
    Sorting makes the result, and so the metrics, independent of the number of ranks.
    """
    keys: list[str] = []
    groups: list[Hashable] = []
    video, text = [], []
    for part in parts:
        if not part["key"]:  # a rank that had no batches
            continue
        keys.extend(part["key"])
        groups.extend(part["group"])
        video.append(part["video_embeds"])
        text.append(part["text_embeds"])
    if not keys:
        raise ValueError("no rank delivered any eval sample")
    first_row: dict[str, int] = {}
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    if len(first_row) < len(keys):
        logger.warning("eval: %d repeated keys dropped", len(keys) - len(first_row))
    order = [first_row[key] for key in sorted(first_row)]
    rows = torch.tensor(order)
    return {
        "key": [keys[row] for row in order],
        "group": [groups[row] for row in order],
        "video_embeds": torch.cat(video)[rows],  # (N, E)
        "text_embeds": torch.cat(text)[rows],  # (N, E)
    }


@torch.no_grad()
def evaluate_retrieval(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    gather: GatherFn | None = None,
    max_batches: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
    group_by_item: bool = True,
) -> dict[str, float]:
    """Retrieval metrics of ``model`` over this rank's eval ``batches`` and everyone else's.

    ``model`` is a ``VideoTextModel`` or a wrapper (DeepSpeed engine) holding it as
    ``.module``. Clips are encoded whole (no tube mask). ``dtype`` runs the encoders under
    autocast. ``gather`` is called once, by every rank, with this rank's embeddings on the CPU
    and returns all ranks' (default: this process only). ``max_batches`` caps this rank's
    batches. With ``group_by_item`` samples sharing an ``item_id`` are each other's positives
    (samples without one stand alone). Every rank returns the same metrics.
    """
    encoder = getattr(model, "module", model)
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    keys: list[str] = []
    groups: list[Hashable] = []
    video_parts, text_parts = [], []
    try:
        for batch in islice(batches, max_batches):
            video = batch["video"].to(device, non_blocking=True)  # (B, T, C, H, W) uint8
            input_ids = batch["input_ids"].to(device, non_blocking=True)  # (B, L)
            attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, L)
            with autocast:
                _, video_embeds = encoder.encode_video(video)  # (B, E)
                _, text_embeds = encoder.encode_text(input_ids, attention_mask)  # (B, E)
            # CPU float32: small, and any gather (pickled objects) can carry it
            video_parts.append(video_embeds.float().cpu())
            text_parts.append(text_embeds.float().cpu())
            keys.extend(batch["key"])
            if group_by_item:
                items = batch.get("item_id") or [None] * len(batch["key"])
                # keys and item ids live in separate namespaces: tag them apart
                groups.extend(
                    ("key", key) if item is None else ("item", item)
                    for key, item in zip(batch["key"], items, strict=True)
                )
            else:
                groups.extend(("key", key) for key in batch["key"])
    finally:
        model.train(was_training)

    local = {
        "key": keys,
        "group": groups,
        "video_embeds": torch.cat(video_parts) if video_parts else None,  # (n, E)
        "text_embeds": torch.cat(text_parts) if text_parts else None,  # (n, E)
    }
    parts = gather(local) if gather is not None else [local]
    merged = merge_gathered(parts)
    logger.info("eval: %d local samples, %d in all", len(keys), len(merged["key"]))
    return retrieval_metrics(
        merged["video_embeds"].to(device),
        merged["text_embeds"].to(device),
        ks=ks,
        chunk_size=chunk_size,
        groups=merged["group"],
    )


def format_retrieval(metrics: dict[str, float]) -> str:
    """One line, e.g. ``t2v R@1 12.5 R@5 40.0 MdR 8 MnR 20.3 | v2t ... | N 1000``."""
    pieces = []
    for direction in ("t2v", "v2t"):
        prefix = f"{direction}_r"
        recalls = sorted(
            (int(name[len(prefix) :]), value)
            for name, value in metrics.items()
            if name.startswith(prefix) and name[len(prefix) :].isdigit()
        )
        if not recalls:
            continue
        words = [direction] + [f"R@{k} {value:.1f}" for k, value in recalls]
        words.append(f"MdR {metrics[f'{direction}_median_rank']:g}")
        words.append(f"MnR {metrics[f'{direction}_mean_rank']:.1f}")
        pieces.append(" ".join(words))
    if "num_samples" in metrics:
        pieces.append(f"N {int(metrics['num_samples'])}")
    return " | ".join(pieces)
