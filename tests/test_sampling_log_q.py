"""The logQ correction against the candidates the next-item batcher really draws: the in-batch
targets of uniformly drawn users (the windows' items after the first, not the training counts)
plus uniform negatives over the warm items."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_finetune_data import write_csv, write_jsonl

from finetune.batches import NextItemBatcher, SamplerState, UserSampler, target_counts
from finetune.catalogue import read_catalogue
from finetune.config import LossSettings
from finetune.interactions import load_interactions
from finetune.item_source import ItemSource
from finetune.model import PAD_ID
from pretrain.distributed import World

WINDOW = 2
"""L: a training window holds L + 1 items, its targets are the last L."""


@pytest.fixture
def data(tmp_path):
    """Training sequences (the last two items of each user are held out): u1 i1 i2 i3 i4, u2
    i1 i2, u3 i5 (one item: never a target), u4 i4 i1 i2. Items i1..i7 are rows 1..7."""
    items = [{"item_id": f"i{n}", "title": f"item {n}"} for n in range(1, 8)]
    catalogue = read_catalogue(write_jsonl(tmp_path / "items.jsonl", items))
    sequences = {"u1": [1, 2, 3, 4], "u2": [1, 2], "u3": [5], "u4": [4, 1, 2]}
    rows = [
        (user, f"i{item}", time, 1, 1.0)
        for user, train in sequences.items()
        for time, item in enumerate([*train, 6, 7])
    ]
    return load_interactions(write_csv(tmp_path / "x.csv", rows), catalogue)


def batcher_of(data, negatives: int) -> NextItemBatcher:
    return NextItemBatcher(data, LossSettings(uniform_negatives=negatives), WINDOW)


def candidates(batch) -> torch.Tensor:
    """The batch's candidate ids in the loss's order: the targets row-major, the negatives."""
    ids = batch.items.item_ids
    targets = ids[batch.window_rows][:, 1:]
    return torch.cat([targets[targets != PAD_ID], ids[batch.negative_rows]])


def test_targets_are_the_windows_items_after_the_first(data):
    sequences = data.train_sequences()
    # L = 2: u1 targets i3 i4, u2 i2, u4 i1 i2; i5 (u3's only item) and u1's i1, i2 never
    assert target_counts(sequences, 2, 7).tolist() == [0, 1, 2, 1, 1, 0, 0, 0]
    # L = 3: u1's i2 enters its window's targets
    assert target_counts(sequences, 3, 7).tolist() == [0, 1, 3, 1, 1, 0, 0, 0]
    assert data.popularity().tolist() == [0, 3, 3, 1, 2, 1, 0, 0]  # what logQ used before


def test_log_q_of_a_batch_of_every_user_is_its_candidate_counts(data):
    """Every trainable user in one batch: the targets are certain, so an item's expected count
    is its target count plus S / N = 10 / 5 uniform draws (by hand: i1 1 + 2, i2 2 + 2, i3
    1 + 2, i4 1 + 2, i5 0 + 2)."""
    batcher = batcher_of(data, negatives=10)
    users = batcher.trainable_users()
    assert users.tolist() == [0, 1, 3]
    generator = torch.Generator().manual_seed(0)
    items = ItemSource(torch.from_numpy(batcher.popularity > 0))
    batch = batcher.batch(users, items, generator, torch.device("cpu"), torch.zeros(0).long())
    ids = candidates(batch)
    assert ids[:5].tolist() == [3, 4, 2, 1, 2]
    by_hand = torch.tensor([float("nan"), 3, 4, 3, 3, 2], dtype=torch.float64)
    torch.testing.assert_close(batch.log_q.double().exp(), by_hand[ids], atol=1e-5, rtol=0)


def test_log_q_matches_the_candidate_frequencies_the_sampler_draws(data):
    """2 of the 3 trainable users per step, 5 uniform negatives over the 5 warm items: the mean
    count of each item in the candidate set over many steps is exp(log q) (4 standard errors),
    and it is not the training-count mixture R·p_pop + S / N the correction used before."""
    batcher = batcher_of(data, negatives=5)
    sampler = UserSampler(batcher.trainable_users(), 2, World(0, 1, 0, torch.device("cpu")), 0)
    state, generator = SamplerState(), torch.Generator().manual_seed(0)
    items = ItemSource(torch.from_numpy(batcher.popularity > 0))
    no_anchors = torch.zeros(0, dtype=torch.long)
    steps, counts, log_q = 3000, [], torch.full((8,), float("nan"), dtype=torch.float64)
    pop = torch.from_numpy(batcher.popularity / batcher.popularity.sum())
    before = []  # the old correction's expected counts, per step
    for _ in range(steps):
        users = sampler.next(state)
        batch = batcher.batch(users, items, generator, torch.device("cpu"), no_anchors)
        ids = candidates(batch)
        counts.append(torch.bincount(ids, minlength=8))
        log_q[ids] = batch.log_q.double()  # one value per item, whatever the step
        rows = len(ids) - 5
        before.append(rows * pop + 5 / 5)
    counts = torch.stack(counts).double()  # (steps, 8)
    observed, error = counts.mean(0)[1:6], counts.std(0)[1:6] / steps**0.5
    expected = log_q[1:6].exp()
    # by hand: 2 users of 3, each with i1 1/3, i2 2/3, i3 1/3, i4 1/3, i5 0 targets, + 1
    torch.testing.assert_close(expected, torch.tensor([5 / 3, 7 / 3, 5 / 3, 5 / 3, 1.0]).double())
    assert ((observed - expected).abs() < 4 * error).all(), (observed, expected, error)
    share = expected / expected.sum()  # exp(log q) normalised: the candidates' distribution
    torch.testing.assert_close(observed / observed.sum(), share, atol=0.01, rtol=0)
    old = torch.stack(before).mean(0)[1:6]
    assert ((observed - old).abs() > 10 * error).any(), (observed, old)
    assert np.isclose(float(observed.sum()), 2 * 5 / 3 + 5, atol=0.05)  # R + S on average
