"""The faiss item index on its own: which kind a catalogue size gets, recall of the approximate
index on clustered vectors against exact search, the written file read back, removal, and the
retrieval vectors that make the dot head's score (prior included) an inner product."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.item_index import (
    IndexFileError,
    IndexSettings,
    ItemIndex,
    head_item_vectors,
    head_query_vectors,
)
from finetune.model import RankingHead


def clustered(count: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres (not uniform noise, which no index can partition)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    points = centres[rng.integers(0, 50, count)] + 0.4 * rng.standard_normal((count, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_settings_pick_the_exact_index_below_the_threshold_and_validate():
    settings = IndexSettings(exact_below=1000)
    assert settings.factory_for(999) == "Flat"
    assert settings.factory_for(1000) == "IVF32,Flat"  # about sqrt(1000), a power of two
    assert settings.factory_for(1_000_000) == "IVF1024,Flat"
    assert IndexSettings(exact_below=10, factory="HNSW16").factory_for(10) == "HNSW16"
    with pytest.raises(ValueError, match="index.nprobe"):
        IndexSettings(nprobe=0)
    with pytest.raises(ValueError, match="unknown index setting"):
        IndexSettings.from_json({"nlist": 4}, "export_info.json")


def test_ivf_recall_against_exact_and_the_file_round_trip(tmp_path):
    vectors, queries = clustered(20_000, 32), clustered(200, 32, seed=1)
    rows = np.arange(1, len(vectors) + 1)  # table rows: 0 is padding
    exact = ItemIndex.build(vectors, rows, IndexSettings())
    assert exact.exact and exact.size == len(vectors)
    approximate = ItemIndex.build(vectors, rows, IndexSettings(exact_below=100, nprobe=16))
    assert approximate.factory == "IVF128,Flat"
    _, truth = exact.search(queries, 10)
    assert (
        truth.min() >= 1 and (truth == (queries @ vectors.T).argsort(1)[:, ::-1][:, :10] + 1).all()
    )
    _, found = approximate.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.95, recall

    path = tmp_path / "item_index.faiss"
    approximate.write(path)
    entry = approximate.entry(path.name, path, len(vectors), 31, generation=0)
    again = ItemIndex.read(tmp_path, entry)
    assert again.factory == "IVF128,Flat" and again.settings.nprobe == 16
    assert np.array_equal(again.search(queries, 10)[1], found)
    path.write_bytes(path.read_bytes()[:-8] + b"tampered")
    with pytest.raises(IndexFileError, match="item_index.faiss: content differs"):
        ItemIndex.read(tmp_path, entry)


def test_removed_rows_leave_the_ivf_index_and_hnsw_keeps_them():
    vectors = clustered(3000, 16)
    rows = np.arange(1, 3001)
    ivf = ItemIndex.build(vectors, rows, IndexSettings(exact_below=100, nprobe=64))
    _, top = ivf.search(vectors[:1], 1)
    assert top[0, 0] == 1
    assert ivf.remove(np.array([1])) == 1 and ivf.size == 2999
    assert 1 not in ivf.search(vectors[:1], 50)[1]
    hnsw = ItemIndex.build(vectors, rows, IndexSettings(exact_below=100, factory="HNSW16"))
    assert hnsw.remove(np.array([1])) == 0 and hnsw.size == 3000  # filtered at search instead


def test_retrieval_vectors_give_the_dot_heads_score_with_its_prior():
    torch.manual_seed(0)
    head = RankingHead(8, num_prior_items=5)
    with torch.no_grad():
        head.popularity_prior.copy_(torch.tensor([0.0, 0.5, -0.2, 0.1, 0.0, -0.4]))
        head.popularity_weight.fill_(0.7)
    items, states = torch.randn(7, 8), torch.randn(3, 8)
    rows = torch.arange(7)  # rows 6: added after training, the mean prior 0
    inner = head_query_vectors(head, states) @ head_item_vectors(head, items, rows).T
    expected = head.score_all(states, items, torch.tensor([0, 1, 2, 3, 4, 5, 0]))
    scale = float(head.logit_scale.detach())
    np.testing.assert_allclose(scale * inner, expected.detach().numpy(), atol=1e-4, rtol=0)
