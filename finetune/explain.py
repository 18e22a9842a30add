"""Why an item was recommended: each history item's share of its score (Shapley values).

A player is one item of the user's history window (the last L items: older ones do not reach
the score). The value of a set of them is the item's score for a user whose history is just
that set, kept in time order with its timestamps. The empty set is the user with no history,
whose state is zero: its score is the ``base`` (the popularity prior's part, 0 without one).

Shapley values are estimated from sampled permutations, each with its reverse (antithetic
pairs). Along one permutation the marginal gains telescope to score(all) − score(none), so
their mean over permutations does too: ``base + Σ contributions = score`` holds exactly (to
float rounding) whatever the number of permutations; more permutations only make each item's
share closer to the exact Shapley value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_PERMUTATIONS = 16


@dataclass
class Explanation:
    """One recommended item's score split over the user's history items."""

    base: float
    """The item's score for a user with no history."""
    contributions: dict[int, float]
    """History item row → its share (an item seen twice: both occurrences summed)."""

    def top(self, count: int) -> list[tuple[int, float]]:
        """The ``count`` largest contributions, largest first."""
        return sorted(self.contributions.items(), key=lambda pair: -pair[1])[:count]


def _subsets(window: Sequence[int], times: Sequence[float] | None, orders: np.ndarray):
    """Every prefix of every order, as histories kept in time order: (M · (W + 1)) lists."""
    histories, stamps = [], []
    for order in orders:
        for size in range(len(order) + 1):
            chosen = np.sort(order[:size])
            histories.append([window[i] for i in chosen])
            stamps.append(None if times is None else [times[i] for i in chosen])
    return histories, stamps


@torch.no_grad()
def explain_scores(
    recommender,
    history: Sequence[int],
    timestamps: Sequence[float] | None,
    item_rows: Sequence[int],
    *,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> list[Explanation]:
    """Explanations of ``item_rows``' scores for one user (``history``: table rows, oldest
    first; ``timestamps`` one per item or None). ``recommender``: an ``ExportedRecommender``."""
    width = recommender.max_history_length
    window = list(history)[-width:]
    times = None if not timestamps else list(timestamps)[-width:]
    count = len(window)
    rng = np.random.default_rng(seed)
    half = max(1, permutations // 2)
    drawn = [rng.permutation(count) for _ in range(half)]
    orders = np.array(drawn + [order[::-1] for order in drawn]).reshape(2 * half, count)
    subsets, stamps = _subsets(window, times, orders)
    states = recommender.user_states(subsets, stamps)  # (M · (W + 1), D)
    rows = torch.as_tensor(list(item_rows), device=recommender.device)
    scores = recommender.model.head.score_all(
        states, recommender.item_embeddings[rows], rows
    )  # (M · (W + 1), K)
    scores = scores.double().reshape(len(orders), count + 1, len(rows))  # (M, W + 1, K)
    gains = scores[:, 1:] - scores[:, :-1]  # (M, W, K): gain of order[m][t]
    shares = torch.zeros(count, len(rows), dtype=torch.float64, device=scores.device)
    for m, order in enumerate(orders):
        shares[torch.as_tensor(order.copy(), device=scores.device)] += gains[m]
    shares /= len(orders)  # (W, K) Shapley estimate per window position
    explanations = []
    for k in range(len(rows)):
        by_item: dict[int, float] = {}
        for position, row in enumerate(window):
            by_item[row] = by_item.get(row, 0.0) + float(shares[position, k])
        explanations.append(Explanation(float(scores[0, 0, k]), by_item))
    return explanations
