"""Top-K items for users from an exported recommender: candidates from the item index, then an
exact re-rank with the full ranking head; seen and removed items never recommended.

Shared by ``vidrec recommend``, the MLflow recommendation model (``finetune.serving_pyfunc``)
and benchmarks. Without an index (an export older than it) or with the exact one (a catalogue
under ``IndexSettings.exact_below``), every item is scored by the head.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from finetune.explain import DEFAULT_PERMUTATIONS, explain_scores
from finetune.export import ExportedRecommender
from finetune.item_index import head_query_vectors

log = logging.getLogger(__name__)


@dataclass
class UserHistory:
    """One user's engaged items, oldest first."""

    user_id: str
    items: list[int]
    """Table rows (1..N) of the catalogue items."""
    timestamps: list[float] | None = None
    """Seconds, one per item; None: unknown (inline histories)."""


@dataclass
class Reason:
    """A history item and its share of a recommended item's score (``finetune.explain``)."""

    item_id: str
    contribution: float


@dataclass
class Recommendation:
    """One output row: ``rank`` 1 is the best ``item_id`` for ``user_id`` (or the best user
    for the item)."""

    user_id: str
    item_id: str
    rank: int
    score: float
    cold_start: bool
    """The item is cold-start (catalogue flag) or new (not in the catalogue)."""
    reasons: list[Reason] | None = None
    """With explanations: the history items that added most to ``score``, largest first."""
    base: float | None = None
    """With explanations: the score for a user without history (the prior's part)."""
    other: float | None = None
    """With explanations: the summed shares of the history items not in ``reasons``, so that
    ``base + Σ reasons + other == score``."""


@dataclass
class ResolvedHistories:
    histories: list[UserHistory]
    unknown: dict[str, int] = field(default_factory=dict)
    """Item ids not in the catalogue → how many times they were skipped."""

    def report(self) -> str:
        """One line for a person ('' when every id was known)."""
        if not self.unknown:
            return ""
        examples = ", ".join(list(self.unknown)[:5])
        return (
            f"{sum(self.unknown.values())} history entries name {len(self.unknown)} item id(s) "
            f"not in the catalogue (e.g. {examples}); skipped"
        )


def resolve_histories(
    recommender: ExportedRecommender,
    users: Iterable[tuple[str, Sequence[str], Sequence[float] | None]],
) -> ResolvedHistories:
    """(user id, item ids oldest first, timestamps or None) → table-row histories; ids the
    catalogue does not know are skipped and counted, never fatal."""
    resolved = ResolvedHistories([])
    for user_id, item_ids, times in users:
        if times is not None and len(times) != len(item_ids):
            raise ValueError(f"user {user_id}: {len(item_ids)} items but {len(times)} timestamps")
        rows, stamps = [], []
        for position, item_id in enumerate(item_ids):
            row = recommender.item_index.get(str(item_id))
            if row is None:
                resolved.unknown[str(item_id)] = resolved.unknown.get(str(item_id), 0) + 1
                continue
            rows.append(row)
            if times is not None:
                stamps.append(float(times[position]))
        resolved.histories.append(UserHistory(user_id, rows, stamps if times is not None else None))
    return resolved


def user_states(
    recommender: ExportedRecommender, histories: Sequence[UserHistory], chunk: int = 256
) -> torch.Tensor:
    """(U, D) current state of each user."""
    parts = []
    for start in range(0, len(histories), chunk):
        batch = histories[start : start + chunk]
        parts.append(
            recommender.user_states([h.items for h in batch], [h.timestamps for h in batch])
        )
    return torch.cat(parts) if parts else torch.zeros(0, recommender.item_embeddings.shape[1])


# ============================================================================= ranking


def _exhaustive(recommender: ExportedRecommender) -> bool:
    # The exact index holds the vectors every item is scored with: scoring them all with the
    # head is the same search, exact for the mlp head too, and what the evaluation computes.
    index = recommender.index
    return index is None or index.exact


@torch.no_grad()
def candidate_rows(
    recommender: ExportedRecommender, states: torch.Tensor, extra: int
) -> torch.Tensor:
    """(U, C) table rows the index proposes (0 where it found fewer); ``extra``: how many more
    than ``IndexSettings.candidates`` to ask for (the seen items that will be dropped)."""
    index = recommender.index
    live = recommender.num_items - int(recommender.removed[1:].sum())
    stale = max(0, index.size - live)  # removed rows an HNSW index still holds
    count = index.settings.candidates + extra + stale
    _, rows = index.search(head_query_vectors(recommender.model.head, states), count)
    return torch.from_numpy(np.where(rows < 0, 0, rows)).to(recommender.device)


@torch.no_grad()
def score_candidates(
    recommender: ExportedRecommender, states: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """(U, C) exact head scores of each user's candidate rows (padding row 0: -inf)."""
    head = recommender.model.head
    items = recommender.item_embeddings[rows]  # (U, C, D)
    scores = head.score_pairs(states[:, None, :].expand_as(items), items, rows)
    return scores.masked_fill(rows == 0, -torch.inf)


@torch.no_grad()
def top_items(
    recommender: ExportedRecommender,
    histories: Sequence[UserHistory],
    k: int,
    *,
    exclude_seen: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, k) scores and rows of each user's best items, best first; -inf / 0 past the items
    a user can still be recommended."""
    states = user_states(recommender, histories)
    if _exhaustive(recommender):
        rows = torch.arange(len(recommender.item_embeddings), device=recommender.device)
        rows = rows.expand(len(histories), -1)
        scores = recommender.score_items(states)  # (U, N + 1)
        scores[:, 0] = -torch.inf
    else:
        extra = max((len(set(h.items)) for h in histories), default=0) if exclude_seen else 0
        rows = candidate_rows(recommender, states, extra)
        scores = score_candidates(recommender, states, rows)
    scores = scores.masked_fill(recommender.removed[rows], -torch.inf)
    if exclude_seen:
        for user, history in enumerate(histories):
            if history.items:
                seen = torch.as_tensor(history.items, device=rows.device)
                scores[user, torch.isin(rows[user], seen)] = -torch.inf
    count = min(k, scores.shape[1])
    top_scores, positions = scores.topk(count, dim=1)  # (U, k), sorted
    return top_scores, rows.gather(1, positions).masked_fill(top_scores == -torch.inf, 0)


def recommend_items(
    recommender: ExportedRecommender,
    histories: Sequence[UserHistory],
    k: int = 10,
    *,
    exclude_seen: bool = True,
    user_chunk: int = 256,
    explain: int = 0,
    permutations: int = DEFAULT_PERMUTATIONS,
) -> list[Recommendation]:
    """The top-``k`` items for each user, best first; padding, removed items and (by default)
    the user's history are never recommended. ``explain`` > 0: each row carries its
    ``explain`` strongest reasons (``finetune.explain``)."""
    rows: list[Recommendation] = []
    for start in range(0, len(histories), user_chunk):
        batch = histories[start : start + user_chunk]
        top_scores, top_rows = top_items(recommender, batch, k, exclude_seen=exclude_seen)
        for history, item_scores, item_rows in zip(batch, top_scores, top_rows, strict=True):
            pairs = zip(item_scores.tolist(), item_rows.tolist(), strict=True)
            ranked = [(score, row) for score, row in pairs if row]  # row 0: nothing left
            user_rows = [
                Recommendation(
                    history.user_id,
                    recommender.item_ids[row - 1],
                    rank,
                    score,
                    bool(recommender.cold[row]),
                )  # fmt: skip
                for rank, (score, row) in enumerate(ranked, start=1)
            ]
            if explain and user_rows:
                _attach_reasons(recommender, history, user_rows, explain, permutations)
            rows.extend(user_rows)
    return rows


def _attach_reasons(recommender, history, user_rows, count: int, permutations: int) -> None:
    item_rows = [recommender.item_index[row.item_id] for row in user_rows]
    explanations = explain_scores(
        recommender, history.items, history.timestamps, item_rows, permutations=permutations
    )
    for row, explanation in zip(user_rows, explanations, strict=True):
        top = explanation.top(count)
        row.reasons = [Reason(recommender.item_ids[item - 1], share) for item, share in top]
        row.base = explanation.base
        row.other = sum(explanation.contributions.values()) - sum(share for _, share in top)
