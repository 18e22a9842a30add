"""Retrieval evaluation: hand-computed ranks, ties, groups, chunking, a tiny model over shards."""

from __future__ import annotations

import pytest
import torch
from shard_factory import write_shards
from torch import nn

from data_shards.reader import ReaderConfig, build_loader
from data_shards.text import load_tokenizer
from pretrain.evaluate import (
    evaluate_retrieval,
    format_retrieval,
    merge_gathered,
    retrieval_metrics,
)
from pretrain.model import VideoTextConfig, VideoTextModel

# ------------------------------------------------------------------ retrieval_metrics

# Rows are captions, columns videos; the diagonal holds the matching pairs.
#   t2v: 0.9 is top (rank 1); 0.5 < 0.8 (rank 2); 0.4 < 0.6, 0.7 (rank 3); 0.1 last (rank 4).
#   v2t (columns): 0.9 top (1); 0.5 < 0.6 (2); 0.4 < 0.95 (2); 0.1 < 0.2, 0.7 and tied with
#   caption 1's 0.1 (pessimistic: 4).
SIMILARITY = torch.tensor(
    [
        [0.9, 0.1, 0.3, 0.2],
        [0.8, 0.5, 0.2, 0.1],
        [0.1, 0.6, 0.4, 0.7],
        [0.3, 0.2, 0.95, 0.1],
    ]
)


def pair_with_similarity(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, text) embeddings with text_i · video_j == similarity[i, j] exactly."""
    text = torch.eye(similarity.shape[0])  # products with 0 and 1 are exact
    return similarity.T.contiguous(), text


def test_hand_computed_four_by_four():
    video, text = pair_with_similarity(SIMILARITY)
    metrics = retrieval_metrics(video, text, ks=(1, 2, 5))
    assert metrics == {
        "t2v_r1": 25.0,
        "t2v_r2": 50.0,
        "t2v_r5": 100.0,
        "t2v_median_rank": 2.5,
        "t2v_mean_rank": 2.5,
        "v2t_r1": 25.0,
        "v2t_r2": 75.0,
        "v2t_r5": 100.0,
        "v2t_median_rank": 2.0,
        "v2t_mean_rank": 2.25,
        "num_samples": 4,
    }


def test_identical_embeddings_are_perfect():
    generator = torch.Generator().manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    metrics = retrieval_metrics(embeds, embeds.clone())
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_r1"] == 100.0
        assert metrics[f"{direction}_median_rank"] == 1.0
        assert metrics[f"{direction}_mean_rank"] == 1.0


def test_shifted_pairing_puts_every_positive_second():
    # caption i points mostly at video i + 1 (0.8) and a little at its own video (0.6)
    size = 6
    video = torch.eye(size)
    text = 0.8 * torch.roll(video, shifts=-1, dims=0) + 0.6 * video
    metrics = retrieval_metrics(video, text, ks=(1, 2))
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_r1"] == 0.0
        assert metrics[f"{direction}_r2"] == 100.0
        assert metrics[f"{direction}_median_rank"] == 2.0
        assert metrics[f"{direction}_mean_rank"] == 2.0


def test_random_embeddings_are_near_chance():
    generator = torch.Generator().manual_seed(7)
    size = 200
    video = torch.nn.functional.normalize(torch.randn(size, 64, generator=generator), dim=1)
    text = torch.nn.functional.normalize(torch.randn(size, 64, generator=generator), dim=1)
    metrics = retrieval_metrics(video, text)
    for direction in ("t2v", "v2t"):
        # chance: R@k = 100 k / N (0.5, 2.5, 5 %), ranks uniform on 1..N (mean 100.5)
        assert metrics[f"{direction}_r1"] <= 3 * 100 / size
        assert metrics[f"{direction}_r10"] <= 3 * 10 * 100 / size
        assert 80 < metrics[f"{direction}_mean_rank"] < 121
        assert 70 < metrics[f"{direction}_median_rank"] < 131


def test_chunked_equals_unchunked():
    generator = torch.Generator().manual_seed(3)
    video = torch.randn(53, 16, generator=generator)
    text = video + 1.5 * torch.randn(53, 16, generator=generator)  # noisy pairs: mixed ranks
    groups = torch.randint(0, 30, (53,), generator=generator)
    for group_arg in (None, groups):
        whole = retrieval_metrics(video, text, ks=(1, 3, 10), chunk_size=4096, groups=group_arg)
        chunked = retrieval_metrics(video, text, ks=(1, 3, 10), chunk_size=7, groups=group_arg)
        assert chunked == whole
        assert 0 < whole["t2v_r1"] < 100  # the data is neither trivial nor hopeless


def test_ties_are_counted_against_the_positive():
    size = 9
    embeds = torch.full((size, 4), 0.5)  # every similarity is exactly 1.0
    metrics = retrieval_metrics(embeds, embeds.clone())
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_r1"] == 0.0
        assert metrics[f"{direction}_r5"] == 0.0
        assert metrics[f"{direction}_median_rank"] == size
        assert metrics[f"{direction}_mean_rank"] == size


def test_groups_make_clips_of_one_item_positives():
    # clips 0 and 1 are two clips of item "a"; caption 0 matches clip 1 better than its own
    video = torch.eye(4)
    text = torch.stack(
        [
            0.4 * video[0] + 0.6 * video[1] + 0.5 * video[2],  # own 0.4 < 0.5 (c) < 0.6 (a)
            video[1],
            video[2],
            video[3],
        ]
    )
    plain = retrieval_metrics(video, text, ks=(1,))
    grouped = retrieval_metrics(video, text, ks=(1,), groups=["a", "a", "c", "d"])
    assert plain["t2v_r1"] == 75.0  # caption 0 ranks its own clip third
    assert plain["t2v_mean_rank"] == (3 + 1 + 1 + 1) / 4
    assert grouped["t2v_r1"] == 100.0  # clip 1 (0.6) beats every other item's clip
    # v2t: caption 0 gives clip 2 0.5, caption 2 gives it 1.0: unchanged, group or not
    assert grouped["v2t_r1"] == plain["v2t_r1"] == 100.0

    # a negative above both positives still counts, once: the best positive (0.5) decides
    text[0] = 0.4 * video[0] + 0.6 * video[2] + 0.5 * video[1]
    grouped = retrieval_metrics(video, text, ks=(1,), groups=["a", "a", "c", "d"])
    assert grouped["t2v_r1"] == 75.0 and grouped["t2v_mean_rank"] == (2 + 1 + 1 + 1) / 4


def test_tied_positives_do_not_push_each_other_down():
    # two identical clips (and captions) of one item: a tie without groups, no tie with them
    video = torch.eye(4)[[0, 0, 2, 3]]
    text = video.clone()
    plain = retrieval_metrics(video, text, ks=(1,))
    grouped = retrieval_metrics(video, text, ks=(1,), groups=[10, 10, 11, 12])
    assert plain["t2v_r1"] == plain["v2t_r1"] == 50.0
    assert plain["t2v_mean_rank"] == (2 + 2 + 1 + 1) / 4
    assert grouped["t2v_r1"] == grouped["v2t_r1"] == 100.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no samples"):
        retrieval_metrics(torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="groups"):
        retrieval_metrics(torch.eye(3), torch.eye(3), groups=[0, 1])


def test_merge_gathered_drops_repeats_and_sorts_by_key():
    def part(keys, offset):
        rows = torch.arange(len(keys), dtype=torch.float32)[:, None] + offset
        return {
            "key": keys,
            "group": keys,
            "video_embeds": rows,
            "text_embeds": -rows,
        }

    empty = {"key": [], "group": [], "video_embeds": None, "text_embeds": None}
    merged = merge_gathered([part(["c", "a"], 0), empty, part(["b", "a"], 10)])
    assert merged["key"] == ["a", "b", "c"]
    assert merged["group"] == ["a", "b", "c"]
    assert merged["video_embeds"][:, 0].tolist() == [1.0, 10.0, 0.0]  # first "a" kept
    assert merged["text_embeds"][:, 0].tolist() == [-1.0, -10.0, -0.0]
    with pytest.raises(ValueError, match="no rank"):
        merge_gathered([empty, empty])


def test_format_retrieval():
    video, text = pair_with_similarity(SIMILARITY)
    line = format_retrieval(retrieval_metrics(video, text, ks=(1, 5)))
    assert line == (
        "t2v R@1 25.0 R@5 100.0 MdR 2.5 MnR 2.5 | v2t R@1 25.0 R@5 100.0 MdR 2 MnR 2.2 | N 4"
    )


# ------------------------------------------------------------------ evaluate_retrieval

SIZE, FRAMES = 32, 4  # VideoTextConfig.tiny: 4 frames of 32 px


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 3 shards × 5; every 4th sample broken, so the readable count differs from the written one
    return write_shards(tmp_path_factory.mktemp("eval_shards"), 3, 5, corrupt_every=4)


@pytest.fixture(scope="module")
def batches(shards, tokenizer):
    config = ReaderConfig(
        shards=str(shards.directory),
        mode="eval",
        num_frames=FRAMES,
        size=SIZE,
        batch_size=4,
        num_workers=0,
        max_text_length=16,
    )
    return list(build_loader(config, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def model(tokenizer):
    base = VideoTextConfig.tiny()
    # the reader tokenizes with MiniLM's vocabulary, so the tiny text tower needs its size
    text_config = base.text_config.to_dict() | {"vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    return VideoTextModel(VideoTextConfig.tiny(text_config=text_config))


def reference_metrics(model, batches) -> dict[str, float]:
    """Embeddings straight from the encoders, sorted by key, scored in one process."""
    rows = []
    with torch.no_grad():
        for batch in batches:
            _, video = model.encode_video(batch["video"])
            _, text = model.encode_text(batch["input_ids"], batch["attention_mask"])
            rows.extend(zip(batch["key"], batch["item_id"], video, text, strict=True))
    rows.sort(key=lambda row: row[0])
    return retrieval_metrics(
        torch.stack([row[2] for row in rows]),
        torch.stack([row[3] for row in rows]),
        groups=[row[1] for row in rows],
    )


def test_evaluate_retrieval_on_tiny_model(model, batches, shards):
    model.train()
    metrics = evaluate_retrieval(model, batches, device="cpu")
    assert model.training and all(module.training for module in model.modules())
    assert metrics["num_samples"] == len(shards.keys) == 12
    for direction in ("t2v", "v2t"):
        for k in (1, 5, 10):
            assert 0.0 <= metrics[f"{direction}_r{k}"] <= 100.0
        for rank in ("median_rank", "mean_rank"):
            assert 1.0 <= metrics[f"{direction}_{rank}"] <= metrics["num_samples"]
    # unmasked encoders in eval mode, nothing else: the same as encoding by hand
    model.eval()
    assert metrics == reference_metrics(model, batches)
    evaluate_retrieval(model, batches, device="cpu")
    assert not model.training  # eval stays eval


def test_two_simulated_ranks_match_one_process(model, batches):
    single = evaluate_retrieval(model, batches, device="cpu")
    half = len(batches) // 2
    rank_batches = [batches[:half], batches[half:]]
    local_dicts = []

    def record(local):
        local_dicts.append(local)
        return [local]

    evaluate_retrieval(model, rank_batches[1], device="cpu", gather=record)
    rank1 = local_dicts[0]
    # rank 0's gather returns both ranks' dicts; rank order must not matter either
    for order in ("forward", "reversed"):

        def gather(local, order=order):
            parts = [local, rank1]
            return parts if order == "forward" else parts[::-1]

        assert evaluate_retrieval(model, rank_batches[0], device="cpu", gather=gather) == single
    # a sample delivered twice (e.g. by two ranks) is counted once
    twice = evaluate_retrieval(model, batches, device="cpu", gather=lambda local: [local, local])
    assert twice == single


def test_engine_wrapper_max_batches_and_autocast(model, batches):
    class Engine(nn.Module):
        """Stands in for a DeepSpeed engine: the model is ``.module``, no encode_* of its own."""

        def __init__(self, module):
            super().__init__()
            self.module = module

    engine = Engine(model)
    engine.train()
    metrics = evaluate_retrieval(engine, batches, device="cpu", max_batches=2)
    assert engine.training and model.training
    assert metrics["num_samples"] == sum(len(batch["key"]) for batch in batches[:2])
    assert metrics == evaluate_retrieval(model, batches[:2], device="cpu")

    autocast = evaluate_retrieval(engine, batches, device="cpu", dtype=torch.bfloat16)
    assert autocast["num_samples"] == 12
    assert all(0.0 <= autocast[f"{d}_r1"] <= 100.0 for d in ("t2v", "v2t"))
