"""Full-ranking metrics against rankings worked out by hand, chunking, exclusion, ties, AUC;
the content-kNN baseline on a hand-made catalogue."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.catalogue import read_catalogue
from finetune.evaluate import RankingEvaluation
from finetune.interactions import load_interactions
from finetune.metrics import (
    auc,
    embedding_score_fn,
    evaluate_popularity,
    evaluate_ranking,
    rank_targets,
    ranking_metrics,
)
from finetune.model import ContentEmbeddings
from pretrain.distributed import World

# Five items with one-dimensional embeddings; a user state of [1] scores each item by its value.
# Scores by item: 0 → 5, 1 → 3, 2 → 4, 3 → 1, 4 → 2, so the order is 0, 2, 1, 4, 3.
ITEMS_5 = torch.tensor([[5.0], [3.0], [4.0], [1.0], [2.0]])


def ranks_of(targets, histories=None, items=ITEMS_5, states=None, **kwargs):
    states = torch.ones(len(targets), 1) if states is None else states
    return rank_targets(
        embedding_score_fn(states, items),
        len(items),
        torch.tensor(targets),
        histories,
        padding_index=kwargs.pop("padding_index", None),
        **kwargs,
    ).tolist()


def test_ranks_and_metrics_match_a_hand_computed_ranking():
    # Item 3 scores 1: four items score higher, rank 5. Item 2 scores 4: only item 0, rank 2.
    # Item 0 scores 5: rank 1.
    ranks = ranks_of([3, 2, 0])
    assert ranks == [5, 2, 1]
    metrics = ranking_metrics(torch.tensor(ranks), ks=(1, 2, 10))
    assert metrics["count"] == 3
    assert metrics["hr@1"] == pytest.approx(1 / 3)
    assert metrics["hr@2"] == pytest.approx(2 / 3)
    assert metrics["hr@10"] == pytest.approx(1.0)
    # NDCG of one relevant item = 1 / log2(rank + 1) inside the cut-off, 0 outside.
    assert metrics["ndcg@2"] == pytest.approx((0 + 1 / math.log2(3) + 1) / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 / math.log2(6) + 1 / math.log2(3) + 1) / 3)
    assert metrics["mrr"] == pytest.approx((1 / 5 + 1 / 2 + 1) / 3)


def test_history_items_are_excluded_but_the_target_is_not():
    # Target 3 (score 1) with history {0, 2, 3}: 0 and 2 leave the ranking; 3 is the target
    # itself (a re-watch) and still ranked; above it remain 1 and 4 → rank 3.
    assert ranks_of([3], [[0, 2, 3]]) == [3]
    # Histories differ per user: the second user's history does not touch the first's ranking.
    assert ranks_of([3, 3], [[0, 2], []]) == [3, 5]


def test_ties_are_pessimistic():
    # Scores 2, 2, 2, 1: target item 1 ties with items 0 and 2, which count as above it.
    items = torch.tensor([[2.0], [2.0], [2.0], [1.0]])
    assert ranks_of([1, 3], items=items) == [3, 4]
    # A constant model ranks every target last, never first.
    flat = torch.zeros(6, 1)
    assert ranks_of([0, 5], items=flat) == [6, 6]


def test_padding_item_never_ranks():
    items = torch.cat([torch.tensor([[100.0]]), ITEMS_5])  # row 0: padding, items shift by one
    assert ranks_of([4, 1], items=items, padding_index=0) == [5, 1]
    with pytest.raises(ValueError, match="padding"):
        ranks_of([0], items=items, padding_index=0)


def test_nan_scores():
    items = torch.tensor([[float("nan")], [3.0], [4.0]])
    # A NaN target ranks last among the candidates; a NaN item never beats the target.
    assert ranks_of([0, 1], items=items) == [3, 2]


def brute_force_ranks(states, items, targets, histories, padding_index):
    """One full (E, N) score matrix, the definition written out with Python loops."""
    scores = states @ items.T
    ranks = []
    for example, target in enumerate(targets.tolist()):
        excluded = set(histories[example]) | {target}
        if padding_index is not None:
            excluded.add(padding_index)
        target_score = scores[example, target]
        above = sum(
            1
            for item in range(len(items))
            if item not in excluded and scores[example, item] >= target_score
        )
        ranks.append(above + 1)
    return ranks


@pytest.mark.parametrize(("user_chunk", "item_chunk"), [(1, 7), (5, 64), (16, 1000), (100, 999)])
def test_chunked_ranking_equals_the_full_matrix(user_chunk, item_chunk):
    generator = torch.Generator().manual_seed(0)
    num_examples, num_items, dim = 37, 1000, 8
    states = torch.randn(num_examples, dim, generator=generator)
    items = torch.randn(num_items, dim, generator=generator)
    targets = torch.randint(1, num_items, (num_examples,), generator=generator)
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, num_items, size=rng.integers(0, 30)).tolist() for _ in targets]
    expected = brute_force_ranks(states, items, targets, histories, padding_index=0)
    score_fn = embedding_score_fn(states, items)
    ranks = rank_targets(
        score_fn, num_items, targets, histories, user_chunk=user_chunk, item_chunk=item_chunk
    )
    assert ranks.tolist() == expected
    # The CSR form of the histories gives the same ranks.
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    csr = type("Csr", (), {"offsets": offsets, "items": np.concatenate(histories)})()
    assert rank_targets(score_fn, num_items, targets, csr, item_chunk=item_chunk).tolist() == (
        expected
    )


def test_exact_ties_survive_chunking():
    # Integer-valued embeddings: every product is exact, and items 1..9 repeat in 10..18.
    items = torch.cat([torch.zeros(1, 2), torch.arange(18).remainder(9).view(-1, 1).repeat(1, 2)])
    items = items.float()
    states = torch.tensor([[1.0, 2.0], [-1.0, 1.0], [0.0, 3.0]])
    targets = torch.tensor([5, 14, 1])
    histories = [[], [3, 12], [2]]
    expected = brute_force_ranks(states, items, targets, histories, padding_index=0)
    for user_chunk, item_chunk in ((1, 1), (2, 4), (3, 100)):
        ranks = rank_targets(
            embedding_score_fn(states, items),
            len(items),
            targets,
            histories,
            user_chunk=user_chunk,
            item_chunk=item_chunk,
        )
        assert ranks.tolist() == expected


def test_evaluate_ranking_groups_and_score_function():
    states = torch.ones(3, 1)
    items = torch.cat([torch.zeros(1, 1), ITEMS_5])  # padding row 0; items 1..5
    targets = torch.tensor([4, 3, 1])  # ranks 5, 2, 1 (see ITEMS_5)
    cold = torch.tensor([True, False, False])
    metrics = evaluate_ranking(
        targets,
        user_states=states,
        item_embeddings=items,
        groups={"cold": cold, "warm": ~cold, "none": torch.zeros(3, dtype=torch.bool)},
        item_chunk=2,
    )
    assert metrics["mrr"] == pytest.approx((1 / 5 + 1 / 2 + 1) / 3)
    assert metrics["cold/count"] == 1
    assert metrics["cold/mrr"] == pytest.approx(1 / 5)
    assert metrics["warm/ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert metrics["none/count"] == 0 and math.isnan(metrics["none/hr@10"])
    assert set(metrics) >= {f"{m}@{k}" for m in ("hr", "ndcg") for k in (10, 20, 50)}
    assert all(isinstance(value, float) for value in metrics.values())

    def score_fn(examples, item_index):
        return states[examples] @ items[item_index].T

    assert evaluate_ranking(targets, score_fn=score_fn, num_items=6, groups={"cold": cold}) == (
        evaluate_ranking(targets, user_states=states, item_embeddings=items, groups={"cold": cold})
    )


def test_popularity_baseline():
    counts = np.array([0, 10, 5, 5, 0])  # padding, then items 1..4
    # Target 2 (count 5) with item 1 in the history: item 3 ties at 5 → rank 2.
    # Target 4, never seen in training (count 0, like a cold item): 1, 2, 3 above → rank 4.
    metrics = evaluate_popularity(counts, torch.tensor([2, 4]), [[1], []], ks=(1, 2))
    assert metrics["hr@2"] == pytest.approx(0.5)
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert counts.tolist() == [0, 10, 5, 5, 0]  # the score view was never written to


def test_auc_matches_hand_computed_values():
    # Positives 0.35 and 0.8, negatives 0.1 and 0.4: 3 of 4 pairs ordered right.
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # A tied positive/negative pair counts one half: (0.5 vs 0.5) = 1/2, (0.5 vs 0.2) = 1.
    assert auc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 0])) == pytest.approx(0.75)
    assert auc(np.ones(6), np.array([1, 0, 1, 0, 0, 1])) == pytest.approx(0.5)
    assert auc(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == pytest.approx(1.0)
    assert math.isnan(auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_auc_agrees_with_the_pairwise_definition():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    labels = rng.integers(0, 2, size=200)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    pairs = (positives[:, None] > negatives[None, :]) + 0.5 * (
        positives[:, None] == negatives[None, :]
    )
    assert auc(scores, labels) == pytest.approx(pairs.mean())


# Six items with two-dimensional pretrained content (row 0 padding): i1 (1, 0), i2 (0, 1) and
# i5 (0.8, -0.6), i6 (-1, 0) have a clip; i3 a clip (1, 0) and a text (0, 1), so its joint
# embedding is (1, 1)/√2; i4 a text (0.6, 0.8) only, and is a cold-start item.
KNN_VIDEO = [[0, 0], [1, 0], [0, 1], [1, 0], [0, 0], [0.8, -0.6], [-1, 0]]
KNN_TEXT = [[0, 0], [0, 0], [0, 0], [0, 1], [0.6, 0.8], [0, 0], [0, 0]]
# u1: i1, i2 (valid), i4 (test, cold). u2: i6, i5, i1 (valid), i3 (test, warm).
KNN_LOG = [("u1", "i1", 1), ("u1", "i2", 2), ("u1", "i4", 3),
           ("u2", "i6", 1), ("u2", "i5", 2), ("u2", "i1", 3), ("u2", "i3", 4)]  # fmt: skip


def knn_test_split(tmp_path, window: int) -> dict:
    catalogue = tmp_path / "items.jsonl"
    catalogue.write_text("".join(f'{{"item_id": "i{i}"}}\n' for i in range(1, 7)))
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in KNN_LOG))
    data = load_interactions(log, read_catalogue(catalogue), cold_items={"i4"})
    times_by_row = np.zeros(int(data.row.max()) + 1)
    times_by_row[data.row] = data.timestamp
    video, text = torch.tensor(KNN_VIDEO), torch.tensor(KNN_TEXT)
    content = ContentEmbeddings(video, text, video.norm(dim=1) > 0, text.norm(dim=1) > 0)
    one_rank = World(0, 1, 0, torch.device("cpu"))
    evaluation = RankingEvaluation(data, times_by_row, window, 256, one_rank)
    return evaluation.content_knn(content)["test"]


def test_content_knn_ranks_by_the_cosine_to_the_mean_of_the_history_window(tmp_path):
    # Test split, window of 2 (the history's last two items; the whole history is excluded):
    # u1 saw i1, i2: mean direction (1, 1)/√2. Left to rank: i3 1.0, i4 0.990, i5 0.141,
    #   i6 -0.707, so the cold target i4 is 2nd.
    # u2 saw i6, i5, i1, window i5, i1: (1.8, -0.6) → (0.949, -0.316). Left: i3 0.447,
    #   i4 0.316, i2 -0.316, so the warm target i3 is 1st.
    test = knn_test_split(tmp_path, window=2)
    assert test["cold"]["count"] == 1 and test["warm"]["count"] == 1
    assert test["cold"]["mrr"] == pytest.approx(1 / 2)
    assert test["cold"]["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert test["warm"]["mrr"] == pytest.approx(1.0) and test["warm"]["ndcg@10"] == 1.0
    assert test["all"]["hr@10"] == 1.0
    assert math.isnan(test["auc"])  # every logged row is engaged
    # a window of 1: u1 is i2 alone, (0, 1): i4 0.8 beats i3 0.707, the cold target is 1st
    assert knn_test_split(tmp_path, window=1)["cold"]["mrr"] == pytest.approx(1.0)
