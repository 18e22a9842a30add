"""The next-item training objective as a module, so that a DeepSpeed engine runs all of it.

Under ZeRO-3 the recommender's weights are partitioned over the ranks and exist whole only
inside the engine's forward: every parameter the loss reads (item tower, user tower, ranking
head) must be read there. ``NextItemObjective.forward`` therefore takes a ``NextItemBatch`` of
plain tensors prepared outside it (``finetune.batches``) and returns the losses; the trainer
calls ``engine(batch)``.

``NextItemObjective`` *is* a ``Recommender`` (a subclass that only adds the training
forward), so its parameter names and state-dict keys are the recommender's: checkpoints and
``finetune/export.py`` see no wrapper prefix, and evaluation uses it as a recommender.

Shapes: B users, L history window, D embedding size, S uniform negatives, R next-item rows
(real targets of the batch), P labelled (BCE) rows, K distinct items the step embeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.item_source import ItemInputs, embed_items
from finetune.model import PAD_ID, Recommender, pointwise_bce_loss, sampled_softmax_loss


@dataclass
class NextItemBatch:
    """One micro-batch of next-item training, every tensor on the engine's device. Item
    positions are rows of ``items.item_ids``, so each item is embedded once per step."""

    items: ItemInputs
    window_rows: torch.Tensor  # (B, L + 1) long: the users' windows, right-padded
    time_gaps: torch.Tensor  # (B, L + 1) float seconds, -1 unknown
    negative_rows: torch.Tensor  # (S,) long: the uniform negatives
    log_q: torch.Tensor | None = None  # (R + S,) logQ of [positives, negatives]
    weights: torch.Tensor | None = None  # (B, L + 1) float: each window item's row weight
    bce_user: torch.Tensor | None = None  # (P,) long: batch row of each labelled row
    bce_position: torch.Tensor | None = None  # (P,) long: window slot of the state scoring it
    bce_item_rows: torch.Tensor | None = None  # (P,) long: the labelled item
    bce_labels: torch.Tensor | None = None  # (P,) float in [0, 1]
    prior_targets: torch.Tensor | None = None  # (K,) centred log counts, NaN if never trained


class NextItemObjective(Recommender):
    """A ``Recommender`` whose ``forward`` is the training loss: sampled softmax over in-batch
    + uniform negatives at every window position (history items masked as negatives), plus
    ``bce_weight`` × BCE on labelled rows when ``bce_weight`` > 0, plus the predicted
    popularity prior's regression (``finetune.popularity``) when the head has one: the scores
    see its values detached, with this step's ID mask.

    Every rank makes the same module calls whatever its batch holds (the BCE term is computed
    on a dummy row and zeroed when a rank has no labelled rows), because ZeRO-3 gathers a
    module's weights with a collective on first use."""

    def __init__(self, item_tower, user_tower, head, bce_weight: float = 0.0):
        super().__init__(item_tower, user_tower, head)
        self.bce_weight = bce_weight

    def forward(self, batch: NextItemBatch) -> dict[str, torch.Tensor]:
        predictor = self.head.prior_predictor
        prior = None
        if predictor is None:
            items = embed_items(self.item_tower, batch.items)  # (K, D)
        else:
            items, content = embed_items(self.item_tower, batch.items, with_content=True)
            id_mask = batch.items.id_mask
            prior_loss = predictor.regression_loss(
                content, batch.items.item_ids, id_mask, batch.prior_targets
            )
            prior = predictor(content.detach(), batch.items.item_ids, id_mask).detach()  # (K,)
        window_ids = batch.items.item_ids[batch.window_rows]  # (B, L + 1)
        windows = items[batch.window_rows]  # (B, L + 1, D)
        inputs, targets = window_ids[:, :-1], window_ids[:, 1:]  # (B, L)
        states = self.user_tower(
            windows[:, :-1], inputs != PAD_ID, batch.time_gaps[:, :-1]
        )  # (B, L, D)
        rows = (targets != PAD_ID).flatten()  # (B·L,)
        length = inputs.shape[1]
        users = torch.arange(len(window_ids), device=rows.device)
        softmax = sampled_softmax_loss(
            states.flatten(0, 1)[rows],
            targets.flatten()[rows],
            windows[:, 1:].flatten(0, 1)[rows],
            batch.items.item_ids[batch.negative_rows],
            items[batch.negative_rows],
            self.head,
            candidate_log_q=batch.log_q,
            history_ids=window_ids,
            history_index=users.repeat_interleave(length)[rows],
            row_weights=None if batch.weights is None else batch.weights[:, 1:].flatten()[rows],
            candidate_prior=None
            if prior is None
            else torch.cat([prior[batch.window_rows[:, 1:]].flatten()[rows],
                            prior[batch.negative_rows]]),
        )  # fmt: skip
        losses = {"loss_softmax": softmax, "loss": softmax}
        if self.bce_weight > 0:
            losses["loss_bce"] = bce = self._bce(batch, states, items, prior)
            losses["loss"] = losses["loss"] + self.bce_weight * bce
        if prior is not None:
            losses["loss_prior"] = prior_loss
            losses["loss"] = losses["loss"] + prior_loss
        return losses

    def _bce(self, batch: NextItemBatch, states: torch.Tensor, items: torch.Tensor,
             prior: torch.Tensor | None):  # fmt: skip
        item_ids = batch.items.item_ids
        if batch.bce_labels is None or len(batch.bce_labels) == 0:
            # same head calls as a rank with rows (ZeRO-3), zero loss still in the graph
            dummy = pointwise_bce_loss(
                states[:1, 0], items[:1], states.new_zeros(1), self.head, item_ids[:1],
                None if prior is None else prior[:1],
            )  # fmt: skip
            return dummy * 0
        return pointwise_bce_loss(
            states[batch.bce_user, batch.bce_position],
            items[batch.bce_item_rows],
            batch.bce_labels,
            self.head,
            item_ids[batch.bce_item_rows],
            None if prior is None else prior[batch.bce_item_rows],
        )
