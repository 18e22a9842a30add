"""The popularity prior predicted from content (``model.predicted_prior``): a new video has no
training count, but its content predicts one (PDA's predicted popularity, added at inference).

Pure torch, like ``finetune.model``: the ranking head owns a ``PopularityPredictor`` and adds
w · its output to every score; the trainer fits it to the centred log training counts
(``regression_loss``) and writes its value for every catalogue item into the head's prior
table before evaluation and export (``finetune.item_source.refresh_predicted_prior``).

Shapes: (...) any item shape, D item embedding size.
"""

from __future__ import annotations

import torch
from torch import nn


class PopularityPredictor(nn.Module):
    """Prior of an item = ``content_head``(its content-only embedding) + m · ``id_correction``
    [its id], m the item's ID mask: 1 for a warm item whose ID is kept this step, 0 for a
    dropped ID (``model.id_dropout``), a cold-start item and every new item.

    The head is a small MLP (D → D → 1) whose last layer starts at zero, the correction a
    zero-initialised (N + 1, 1) table: at init every prior is 0, the old cold items' value.
    Both fit the centred log(1 + training count) and nothing else (``regression_loss``; the
    content it reads and the prior the scores see are detached), so the prior keeps its
    meaning and the ranking loss learns only how much it counts (the head's weight w).
    """

    def __init__(self, dim: int, num_items: int):
        """``num_items`` N: the correction table has N + 1 rows (row 0 padding, fixed at 0)."""
        super().__init__()
        self.content_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.content_head[-1].weight)
        nn.init.zeros_(self.content_head[-1].bias)
        self.id_correction = nn.Embedding(num_items + 1, 1, padding_idx=0)
        nn.init.zeros_(self.id_correction.weight)

    def from_content(self, content: torch.Tensor) -> torch.Tensor:
        """(..., D) content-only item embeddings → (...) the predicted prior (no ID)."""
        return self.content_head(content).squeeze(-1)

    def correction(self, item_ids: torch.Tensor, id_mask: torch.Tensor) -> torch.Tensor:
        """(...) the learned per-ID correction, 0 where ``id_mask`` is False (ids beyond the
        table allowed there)."""
        rows = self.id_correction(torch.where(id_mask, item_ids, 0)).squeeze(-1)
        return rows * id_mask

    def forward(
        self,
        content: torch.Tensor,  # (..., D) content-only embeddings
        item_ids: torch.Tensor,  # (...)
        id_mask: torch.Tensor,  # (...) bool
    ) -> torch.Tensor:
        """(...) each item's prior: predicted from content, plus the correction of a kept ID."""
        return self.from_content(content) + self.correction(item_ids, id_mask)

    def regression_loss(
        self,
        content: torch.Tensor,  # (K, D) content-only embeddings (detached here)
        item_ids: torch.Tensor,  # (K,)
        id_mask: torch.Tensor,  # (K,) bool, this step's ID mask
        targets: torch.Tensor,  # (K,) centred log counts, NaN without training interactions
    ) -> torch.Tensor:
        """Mean squared error of the content head on every item with a count, plus that of
        (the head's prediction, fixed) + correction on those whose ID is kept: the correction
        learns what content misses of a warm item's count, and drops out with the ID."""
        counted = ~targets.isnan()
        kept = counted & id_mask
        target = targets.nan_to_num()
        predicted = self.from_content(content.detach())
        # every module call on every rank whatever the batch holds (ZeRO-3 gathers on use)
        corrected = predicted.detach() + self.correction(item_ids, id_mask)

        def mean_squared_error(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return ((values - target).square() * rows).sum() / rows.sum().clamp(min=1)

        return mean_squared_error(predicted, counted) + mean_squared_error(corrected, kept)


def new_item_prior(head: nn.Module, content: torch.Tensor) -> torch.Tensor:
    """(N,) the prior of items added after training (``vidrec index add``), from their (N, D)
    content-only embeddings: the one it predicts with a predicted prior, else 0, the mean of
    the warm items (as ``recommend --item`` scores a new item)."""
    if head.prior_predictor is None:
        return content.new_zeros(len(content))
    return head.prior_predictor.from_content(content).to(content.dtype)
