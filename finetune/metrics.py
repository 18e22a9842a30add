"""Ranking metrics over the full catalogue, in bounded memory; AUC for pointwise labels.

Full ranking. Every evaluation example (one user state, one target item) is ranked against
every catalogue item, not against sampled negatives, whose metrics are biased. The items the
user has in its history are excluded from the ranking (they could not be recommended again),
except the target itself; so is the padding index (0 in ``finetune.catalogue``).

Memory. Scores are never materialized for all examples × all items: examples go in chunks of
``user_chunk`` and, within a chunk, items in chunks of ``item_chunk``, so at most a
(user_chunk, item_chunk) block exists at a time (64 MB at the defaults in float32), which is
what makes 1M-item catalogues fit. Per block, the only thing kept is how many items score at
least as high as the target.

Ranks are 1-based and **pessimistic on ties**: an item that scores exactly the target's score
counts as ranked above it, so a constant model gets the worst rank, not the best. The target's
score comes from the same scoring call as the other items' (a (u, u) block whose diagonal is
kept), so identical item embeddings tie. Near-ties that differ by float rounding between two
matrix products of different shapes are not treated as ties. A NaN score on the target ranks it
last; a NaN score on another item never ranks it above the target.

Metrics, each the mean over examples: ``hr@K`` (target in the top K), ``ndcg@K``
(``1 / log2(rank + 1)`` inside the top K, 0 outside; one relevant item, so no normalizer),
``mrr`` (``1 / rank``, untruncated). Subsets (cold-start vs warm targets) are reported under
``<name>/`` prefixes from boolean masks over the examples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from finetune.catalogue import PADDING_INDEX

logger = logging.getLogger(__name__)

KS = (10, 20, 50)

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_fn(examples (u,), items (n,)) -> (u, n)`` scores of examples (positions in the
targets tensor) against items (catalogue indices); higher is better."""

Histories = Any
"""Items to exclude per example: an object with CSR ``offsets`` (E + 1,) and ``items`` arrays
(``finetune.interactions.Sequences``), or a sequence of E integer sequences."""


def _csr(histories: Histories, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    if histories is None:
        return np.zeros(num_examples + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if hasattr(histories, "offsets") and hasattr(histories, "items"):
        offsets = np.asarray(histories.offsets, dtype=np.int64)
        items = np.asarray(histories.items, dtype=np.int64)
    else:
        lists = [np.asarray(torch.as_tensor(h).cpu(), dtype=np.int64).ravel() for h in histories]
        offsets = np.concatenate([[0], np.cumsum([len(h) for h in lists])]).astype(np.int64)
        items = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    if len(offsets) != num_examples + 1:
        raise ValueError(f"histories cover {len(offsets) - 1} examples, targets {num_examples}")
    return offsets, items


def rank_targets(
    score_fn: ScoreFn,
    num_items: int,
    targets: torch.Tensor,
    histories: Histories = None,
    *,
    padding_index: int | None = PADDING_INDEX,
    user_chunk: int = 256,
    item_chunk: int = 65_536,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(E,) int64 1-based pessimistic rank of each target among ``num_items`` items.

    ``num_items`` counts the rows of the item table, padding included when there is one
    (``padding_index=None`` when there is none).
    """
    targets = torch.as_tensor(targets, dtype=torch.long).cpu()
    num_examples = len(targets)
    if num_examples and not (int(targets.min()) >= 0 and int(targets.max()) < num_items):
        raise ValueError(f"targets must lie in [0, {num_items})")
    if padding_index is not None and bool((targets == padding_index).any()):
        raise ValueError(f"a target is the padding index {padding_index}")
    offsets, history_items = _csr(histories, num_examples)
    ranks = torch.empty(num_examples, dtype=torch.long)
    for start in range(0, num_examples, user_chunk):
        stop = min(start + user_chunk, num_examples)
        examples = torch.arange(start, stop, device=device)
        chunk_targets = targets[start:stop].to(device)
        # The target's score from a scoring call like the blocks' (see the module docstring).
        target_scores = score_fn(examples, chunk_targets).diagonal()  # (u,)
        target_scores = torch.nan_to_num(target_scores, nan=-math.inf)
        # Excluded (example, item) pairs of this chunk: history items, flattened.
        lengths = np.diff(offsets[start : stop + 1])
        excluded_rows = torch.from_numpy(np.repeat(np.arange(stop - start), lengths)).to(device)
        excluded_items = torch.from_numpy(history_items[offsets[start] : offsets[stop]]).to(device)
        above = torch.zeros(stop - start, dtype=torch.long, device=device)
        for lo in range(0, num_items, item_chunk):
            hi = min(lo + item_chunk, num_items)
            scores = score_fn(examples, torch.arange(lo, hi, device=device))  # (u, n)
            # Excluded pairs are masked, not overwritten: score_fn may return a view.
            excluded = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            in_block = (excluded_items >= lo) & (excluded_items < hi)
            excluded[excluded_rows[in_block], excluded_items[in_block] - lo] = True
            own = (chunk_targets >= lo) & (chunk_targets < hi)
            excluded[own.nonzero().squeeze(1), chunk_targets[own] - lo] = True
            if padding_index is not None and lo <= padding_index < hi:
                excluded[:, padding_index - lo] = True
            # NaN scores compare False, so they never rank above the target.
            above += ((scores >= target_scores[:, None]) & ~excluded).sum(dim=1)
        ranks[start:stop] = (above + 1).cpu()
    return ranks


def embedding_score_fn(user_states: torch.Tensor, item_embeddings: torch.Tensor) -> ScoreFn:
    """Dot-product scores of (E, D) example states against (N, D) item embeddings."""

    def score(examples: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        lo = int(items[0]) if len(items) else 0
        if torch.equal(items, torch.arange(lo, lo + len(items), device=items.device)):
            # The ranking blocks are contiguous ranges: slice (a view) instead of gathering.
            block = item_embeddings[lo : lo + len(items)]
        else:
            block = item_embeddings[items]
        return user_states[examples] @ block.T  # (u, D) @ (D, n) -> (u, n)

    return score


def ranking_metrics(
    ranks: torch.Tensor, ks: Sequence[int] = KS, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of 1-based ranks (over ``mask``'s examples); NaN when empty."""
    ranks = torch.as_tensor(ranks).double().cpu()
    if mask is not None:
        ranks = ranks[torch.as_tensor(mask, dtype=torch.bool).cpu()]
    metrics: dict[str, float] = {"count": float(len(ranks))}
    if len(ranks) == 0:
        metrics.update({f"{name}@{k}": math.nan for k in ks for name in ("hr", "ndcg")})
        metrics["mrr"] = math.nan
        return metrics
    gain = 1.0 / torch.log2(ranks + 1.0)
    for k in ks:
        hit = ranks <= k
        metrics[f"hr@{k}"] = hit.double().mean().item()
        metrics[f"ndcg@{k}"] = torch.where(hit, gain, 0.0).mean().item()
    metrics["mrr"] = (1.0 / ranks).mean().item()
    return metrics


def evaluate_ranking(
    targets: torch.Tensor,
    *,
    user_states: torch.Tensor | None = None,
    item_embeddings: torch.Tensor | None = None,
    score_fn: ScoreFn | None = None,
    num_items: int | None = None,
    histories: Histories = None,
    groups: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    ks: Sequence[int] = KS,
    padding_index: int | None = PADDING_INDEX,
    user_chunk: int = 256,
    item_chunk: int = 65_536,
) -> dict[str, float]:
    """Full-ranking metrics from embeddings or a score function, overall and per group.

    ``groups`` maps a name to an (E,) bool mask over the examples (e.g. ``{"cold": is_cold,
    "warm": ~is_cold}``); its metrics come back as ``"<name>/hr@10"`` and so on.
    """
    if score_fn is None:
        if user_states is None or item_embeddings is None:
            raise ValueError("pass user_states and item_embeddings, or score_fn and num_items")
        score_fn = embedding_score_fn(user_states, item_embeddings)
        num_items = len(item_embeddings)
        device = item_embeddings.device
    else:
        if num_items is None:
            raise ValueError("score_fn needs num_items")
        device = None
    with torch.no_grad():
        ranks = rank_targets(
            score_fn,
            num_items,
            targets,
            histories,
            padding_index=padding_index,
            user_chunk=user_chunk,
            item_chunk=item_chunk,
            device=device,
        )
    metrics = ranking_metrics(ranks, ks)
    for name, mask in (groups or {}).items():
        for key, value in ranking_metrics(ranks, ks, torch.as_tensor(mask)).items():
            metrics[f"{name}/{key}"] = value
    return metrics


def popularity_score_fn(counts: torch.Tensor | np.ndarray) -> ScoreFn:
    """The popularity baseline: every example scores item ``i`` by its training count."""
    popularity = torch.as_tensor(np.asarray(counts), dtype=torch.float64)  # (N,)

    def score(examples: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return popularity[items.cpu()].expand(len(examples), -1)

    return score


def evaluate_popularity(
    counts: torch.Tensor | np.ndarray,
    targets: torch.Tensor,
    histories: Histories = None,
    **kwargs: Any,
) -> dict[str, float]:
    """``evaluate_ranking`` of the popularity baseline (``counts``: (N,) per item, padding
    included); items never seen in training, cold-start ones among them, tie at the bottom."""
    return evaluate_ranking(
        targets,
        score_fn=popularity_score_fn(counts),
        num_items=len(counts),
        histories=histories,
        **kwargs,
    )


def auc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic with average ranks for ties (a tied
    positive/negative pair counts one half); NaN when a class is missing."""
    scores = np.asarray(torch.as_tensor(scores).detach().double().cpu()).ravel()
    positive = np.asarray(torch.as_tensor(labels).cpu()).ravel().astype(bool)
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores but {len(positive)} labels")
    num_positive = int(positive.sum())
    num_negative = len(positive) - num_positive
    if num_positive == 0 or num_negative == 0:
        return math.nan
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    # Tie groups in sorted order; each member gets the group's average 1-based rank.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(average, ends - starts)
    u_statistic = ranks[positive].sum() - num_positive * (num_positive + 1) / 2.0
    return float(u_statistic / (num_positive * num_negative))
