"""Users' history windows and the micro-batches of next-item training.

A window is the last W items of a user's history, right-padded with ``PAD_ID``; training,
evaluation and serving all cut them with ``history_windows``, so a user state means the same
thing everywhere. Shapes: B users, W window, S uniform negatives, R next-item rows, P labelled
rows, K distinct items a step embeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from finetune.config import LossSettings
from finetune.interactions import InteractionData, Sequences
from finetune.item_source import ItemSource
from finetune.model import PAD_ID, centred_log_popularity, mixed_sampling_log_q
from finetune.objective import NextItemBatch
from pretrain.checkpoint import TrainState
from pretrain.distributed import World


@dataclass
class Windows:
    """Padded item windows of some users: right-padded with ``PAD_ID``."""

    items: torch.Tensor  # (B, W) long
    time_gaps: torch.Tensor  # (B, W) float seconds since the previous item, -1 unknown
    times: torch.Tensor  # (B, W) float64 timestamps, +inf at padding and where unknown
    values: torch.Tensor | None = None  # (B, W) float: a per-item value (0 at padding)


def history_windows(
    histories: Sequence[Sequence[int]],
    times: Sequence[Sequence[float] | None] | None,
    width: int,
    values: Sequence[Sequence[float]] | None = None,
) -> Windows:
    """The last ``width`` items of each history (oldest first) and their time gaps; ``times``
    (seconds, one per item, or None for a history whose times are unknown) may be None;
    ``values`` (one per item) are windowed alike."""
    items = np.zeros((len(histories), width), dtype=np.int64)
    stamps = np.full((len(histories), width), np.inf)
    windowed = np.zeros((len(histories), width), dtype=np.float32) if values is not None else None
    for row, history in enumerate(histories):
        window = np.asarray(history, dtype=np.int64)[-width:]
        items[row, : len(window)] = window
        if windowed is not None:
            windowed[row, : len(window)] = np.asarray(values[row])[-width:]
        stamp = times[row] if times is not None else None
        if stamp is not None and len(stamp):
            if len(stamp) != len(history):
                raise ValueError(f"history {row}: {len(history)} items, {len(stamp)} times")
            stamps[row, : len(window)] = np.asarray(stamp, dtype=np.float64)[-width:]
    gaps = np.full_like(stamps, -1.0)
    with np.errstate(invalid="ignore"):  # inf - inf between padding slots
        gaps[:, 1:] = stamps[:, 1:] - stamps[:, :-1]
    gaps[~np.isfinite(gaps)] = -1.0  # unknown: the first slot, padding, missing times
    return Windows(
        torch.from_numpy(items),
        torch.from_numpy(gaps).float(),
        torch.from_numpy(stamps),
        None if windowed is None else torch.from_numpy(windowed),
    )


def user_windows(
    sequences: Sequences,
    times: np.ndarray,
    users: np.ndarray,
    width: int,
    values: np.ndarray | None = None,
) -> Windows:
    """``history_windows`` of ``users``' sequences (``times``, ``values``: (total,) per
    sequence item)."""
    spans = [(sequences.offsets[user], sequences.offsets[user + 1]) for user in users]
    return history_windows(
        [sequences.items[start:stop] for start, stop in spans],
        [times[start:stop] for start, stop in spans],
        width,
        None if values is None else [values[start:stop] for start, stop in spans],
    )


def target_counts(sequences: Sequences, max_history_length: int, num_items: int) -> np.ndarray:
    """(N + 1,) how often each item is a next-item target of training, summed over the users
    with >= 2 items: a user's targets are the last min(n - 1, L) items of its sequence, the
    window of L + 1 items without its first (older items and single-item users never are)."""
    lengths = sequences.lengths()
    position = np.arange(len(sequences.items)) - np.repeat(sequences.offsets[:-1], lengths)
    first_target = np.repeat(np.maximum(1, lengths - max_history_length), lengths)
    targets = sequences.items[position >= first_target]
    return np.bincount(targets, minlength=num_items + 1).astype(np.float64)


@dataclass
class SamplerState(TrainState):
    """The shared loop's state plus the user sampler's position."""

    epoch: int = 0
    position: int = 0
    """Users of this epoch's permutation consumed (all ranks)."""


class UserSampler:
    """Batches of training users: a seeded permutation per epoch, the same on every rank, cut
    into global batches of which rank r takes slice r. The position is two integers in the
    trainer state, so a resumed job continues exactly where the checkpoint left off."""

    def __init__(self, users: np.ndarray, batch_per_rank: int, world: World, seed: int):
        self.users, self.batch, self.world, self.seed = users, batch_per_rank, world, seed
        self.global_batch = batch_per_rank * world.world_size
        if len(users) < self.global_batch:
            raise ValueError(
                f"{len(users)} users with >= 2 training items, fewer than one global batch "
                f"({self.global_batch}): lower parallel.micro_batch_size"
            )

    def next(self, state: SamplerState) -> np.ndarray:
        if state.position + self.global_batch > len(self.users):
            state.epoch, state.position = state.epoch + 1, 0
        order = np.random.default_rng([self.seed, state.epoch]).permutation(self.users)
        chunk = order[state.position : state.position + self.global_batch]
        state.position += self.global_batch
        return chunk[self.world.rank * self.batch : (self.world.rank + 1) * self.batch]


@dataclass
class NextItemBatcher:
    """Turns a rank's users into a ``NextItemBatch``: their windows of the training sequences,
    the step's uniform negatives (warm items), their logQ, the labelled rows when
    ``loss.bce_weight`` > 0, the ID mask of the step's items (ID dropout) and their
    popularity prior's regression targets."""

    data: InteractionData
    loss: LossSettings
    max_history_length: int
    id_dropout: float = 0.0
    """p of ``model.id_dropout``: each item of a step keeps its ID with probability 1 - p
    (drawn from the step's generator, so a rerun draws the same masks)."""
    times_by_row: np.ndarray = field(init=False)
    """(rows,) timestamp of each interaction row."""

    def __post_init__(self):
        data = self.data
        self.times_by_row = np.zeros(int(data.row.max()) + 1)
        self.times_by_row[data.row] = data.timestamp
        self.sequences = data.train_sequences()
        # per item of the training sequences, once: a step cuts windows out of it
        self.sequence_times = self.times_by_row[self.sequences.rows]
        self.sequence_weights = None
        if self.loss.row_weights:
            weights_by_row = np.ones(len(self.times_by_row), dtype=np.float32)
            weights_by_row[data.row] = data.weight
            self.sequence_weights = weights_by_row[self.sequences.rows]
        self.popularity = popularity = data.popularity()  # (N + 1,) training counts
        self.targets_per_user = torch.from_numpy(
            target_counts(self.sequences, self.max_history_length, data.num_items)
            / max(1, len(self.trainable_users()))
        )  # (N + 1,): what the logQ correction's in-batch part draws, per user
        self.warm_ids = torch.nonzero(torch.from_numpy(popularity > 0)).squeeze(1)
        prior = centred_log_popularity(torch.from_numpy(popularity))
        self.prior_targets = torch.where(torch.from_numpy(popularity > 0), prior, torch.nan)
        self.pointwise = data.pointwise("train")

    def trainable_users(self) -> np.ndarray:
        """Users with a next item to predict (>= 2 training items)."""
        return np.flatnonzero(self.sequences.lengths() >= 2)

    def batch(
        self,
        users: np.ndarray,
        items: ItemSource,
        generator: torch.Generator,
        device: torch.device,
        anchors: torch.Tensor,
    ) -> NextItemBatch:
        """``anchors``: item ids embedded with every batch (``ItemSource.anchors``)."""
        loss = self.loss
        window = user_windows(
            self.sequences,
            self.sequence_times,
            users,
            self.max_history_length + 1,
            self.sequence_weights,
        )  # (B, L + 1)
        num_negatives = loss.uniform_negatives
        draws = torch.randint(len(self.warm_ids), (num_negatives,), generator=generator)
        negatives = self.warm_ids[draws]  # (S,)
        bce = self._bce_rows(users, window) if loss.bce_weight > 0 else None
        bce_items = bce[2] if bce is not None else torch.zeros(0, dtype=torch.long)
        ids, inverse = torch.unique(
            torch.cat([window.items.flatten(), negatives, bce_items, anchors]),
            return_inverse=True,
        )  # (K,), every item embedded once
        count = window.items.numel()
        inputs = items.inputs(ids, device)
        if self.id_dropout > 0 and inputs.id_mask is not None:  # never the ID-only baseline
            kept = torch.rand(len(ids), generator=generator) >= self.id_dropout  # (K,)
            inputs.id_mask &= kept.to(device)
        batch = NextItemBatch(
            items=inputs,
            window_rows=inverse[:count].view(window.items.shape).to(device),
            time_gaps=window.time_gaps.to(device),
            negative_rows=inverse[count : count + num_negatives].to(device),
            weights=None if window.values is None else window.values.to(device),
            prior_targets=self.prior_targets[ids].to(device),
        )
        if loss.logq:
            targets = window.items[:, 1:]
            positive_ids = targets[targets != PAD_ID]  # (R,), row-major like the loss rows
            batch.log_q = mixed_sampling_log_q(
                torch.cat([positive_ids, negatives]),
                self.targets_per_user,
                batch_users=len(users),
                num_uniform=num_negatives,
                num_items=len(self.warm_ids),
            ).to(device)
        if bce is not None:
            user, position, _, labels = bce
            start = count + num_negatives
            batch.bce_user, batch.bce_position = user.to(device), position.to(device)
            batch.bce_item_rows = inverse[start : start + len(bce_items)].to(device)
            batch.bce_labels = labels.to(device)
        return batch

    def _bce_rows(self, users: np.ndarray, window: Windows):
        """The labelled training rows of the batch users, each scored with the state after the
        window items strictly before it (rows older than the window are left out): batch row
        (P,), window slot (P,), item id (P,), label (P,)."""
        pointwise = self.pointwise
        rows = np.flatnonzero(np.isin(pointwise["user"], users))
        slot = {int(user): index for index, user in enumerate(users)}
        batch_index = np.array([slot[int(u)] for u in pointwise["user"][rows]], dtype=int)
        row_times = self.times_by_row[pointwise["row"][rows]]
        before = (window.times.numpy()[batch_index, :-1] < row_times[:, None]).sum(axis=1)
        keep = before >= 1  # a state exists: at least one window item precedes the row
        return (
            torch.from_numpy(batch_index[keep]).long(),
            torch.from_numpy(before[keep] - 1).long(),
            torch.from_numpy(pointwise["item"][rows][keep]).long(),
            torch.from_numpy(pointwise["label"][rows][keep]).float(),
        )
