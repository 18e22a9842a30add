"""Objectives against hand computations, and the 2-rank contrastive loss against 1 process."""

import functools
import math
import os
import socket
import statistics
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.objectives import (
    IGNORE_INDEX,
    ClipLoss,
    ObjectiveWeights,
    PretrainObjectives,
    clip_loss,
    mask_tokens,
    masked_language_loss,
    masked_video_loss,
    norm_pix_targets,
    patchify,
    sample_hard_negatives,
    tube_mask,
    weighted_total,
)

# ----------------------------------------------------------------------------- contrastive


def reference_clip_loss(video, text, scale):
    """Symmetric InfoNCE written out with Python loops over rows and columns."""
    n = len(video)
    sim = [[scale * sum(a * b for a, b in zip(v, t, strict=True)) for t in text] for v in video]

    def cross_entropy(rows):
        return -sum(row[i] - math.log(sum(math.exp(x) for x in row)) for i, row in enumerate(rows))

    columns = [[sim[i][j] for i in range(n)] for j in range(n)]
    return (cross_entropy(sim) / n + cross_entropy(columns) / n) / 2


def test_clip_loss_matches_hand_written_reference():
    generator = torch.Generator().manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(4, 5, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 5, generator=generator), dim=-1)
    scale = torch.tensor(3.0)
    expected = reference_clip_loss(video.tolist(), text.tolist(), 3.0)
    assert ClipLoss()(video, text, scale).item() == pytest.approx(expected, rel=1e-5)
    # the loss is asymmetric in its arguments row-wise; swapping them keeps the symmetric mean
    assert clip_loss(text, video, scale).item() == pytest.approx(expected, rel=1e-5)


def test_clip_loss_low_for_aligned_pairs_high_for_shuffled():
    embeds = torch.eye(6)  # orthonormal: pair i only matches itself
    scale = torch.tensor(100.0)
    assert clip_loss(embeds, embeds, scale).item() < 1e-6
    shuffled = embeds[torch.tensor([1, 2, 3, 4, 5, 0])]
    assert clip_loss(embeds, shuffled, scale).item() > 50


def reference_copies_clip_loss(video, text, scale, groups):
    """``clip_loss`` with ``groups`` written out with loops: for row i of clip g, g's other
    copies are left out, each copy of another clip h adds exp(logit) / (copies of h) to the
    denominator, row i weighs 1 / (copies of g), the sum is divided by the number of clips."""
    n = len(video)
    sim = [[scale * sum(a * b for a, b in zip(v, t, strict=True)) for t in text] for v in video]
    copies = [groups.count(g) for g in groups]

    def cross_entropy(rows):
        total = 0.0
        for i, row in enumerate(rows):
            denominator = math.exp(row[i])
            for j, x in enumerate(row):
                if groups[j] != groups[i]:
                    denominator += math.exp(x) / copies[j]
            total += -(row[i] - math.log(denominator)) / copies[i]
        return total / len(set(groups))

    columns = [[sim[i][j] for i in range(n)] for j in range(n)]
    return (cross_entropy(sim) + cross_entropy(columns)) / 2


def unit_rows(rows, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, 5, generator=generator), dim=-1)


def test_clip_loss_with_copies_matches_hand_written_reference():
    # different embeddings for the copies, unequal and interleaved groups: pins the weighting
    video, text, scale = unit_rows(6, 10), unit_rows(6, 11), 3.0
    groups = [4, 1, 4, 0, 1, 1]  # ids are labels: clip 4 twice, clip 1 three times, clip 0 once
    expected = reference_copies_clip_loss(video.tolist(), text.tolist(), scale, groups)
    loss = clip_loss(video, text, torch.tensor(scale), torch.tensor(groups))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # singleton groups are the plain loss
    singletons = reference_copies_clip_loss(video.tolist(), text.tolist(), scale, list(range(6)))
    assert singletons == pytest.approx(reference_clip_loss(video.tolist(), text.tolist(), scale))


@pytest.mark.parametrize(
    "index",
    [
        [0, 0, 1, 1, 2, 2, 3, 3],  # every clip twice
        [1, 2, 0, 1, 2, 1],  # 1, 3 and 2 copies, interleaved
    ],
)
def test_identical_copies_give_the_deduplicated_loss_and_gradient(index):
    index = torch.tensor(index)
    unique_video = unit_rows(int(index.max()) + 1, 12).requires_grad_()
    unique_text = unit_rows(int(index.max()) + 1, 13).requires_grad_()
    scale = torch.tensor(4.0, requires_grad=True)
    inputs = (unique_video, unique_text, scale)

    deduplicated = clip_loss(unique_video, unique_text, scale)
    copies = clip_loss(unique_video[index], unique_text[index], scale, groups=index)
    assert copies.item() == pytest.approx(deduplicated.item(), rel=1e-6)
    # the copies are made by indexing, so autograd sums each clip's copies' gradients
    for expected, grad in zip(
        torch.autograd.grad(deduplicated, inputs), torch.autograd.grad(copies, inputs), strict=True
    ):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    # without the groups the copies are each other's negatives: another loss
    plain = clip_loss(unique_video[index], unique_text[index], scale)
    assert abs(plain.item() - deduplicated.item()) > 0.1


def test_a_copy_of_the_same_clip_has_no_say_in_the_loss():
    # video = identity and scale 1, so logits[i, j] = text[j, i]: the gradient w.r.t. text
    # is the gradient w.r.t. the logits, transposed
    groups = torch.tensor([0, 1, 0, 2, 1, 1])
    video = torch.eye(6)
    text = torch.randn(6, 6, generator=torch.Generator().manual_seed(14), requires_grad=True)
    clip_loss(video, text, torch.tensor(1.0), groups).backward()
    grad_logits = text.grad.T
    other_copy = (groups[:, None] == groups[None, :]) & ~torch.eye(6, dtype=torch.bool)
    assert (grad_logits[other_copy] == 0).all()
    assert (grad_logits[~other_copy] != 0).all()


def test_clip_loss_without_groups_is_unchanged():
    video, text, scale = unit_rows(8, 15), unit_rows(8, 16), torch.tensor(2.7)
    # the formula before groups existed, bit for bit
    logits = scale.float() * video.float() @ text.float().T
    targets = torch.arange(8)
    before = (
        torch.nn.functional.cross_entropy(logits, targets)
        + torch.nn.functional.cross_entropy(logits.T, targets)
    ) / 2
    assert torch.equal(clip_loss(video, text, scale), before)
    assert torch.equal(clip_loss(video, text, scale, groups=None), before)
    assert torch.equal(ClipLoss()(video, text, scale, groups=None), before)
    # all-distinct groups: the same loss through the other path
    assert clip_loss(video, text, scale, torch.arange(8)).item() == pytest.approx(
        before.item(), rel=1e-6
    )
    with pytest.raises(ValueError):
        clip_loss(video, text, scale, torch.arange(7))


def test_pretrain_objectives_pass_the_batch_clip_groups_to_the_contrastive_loss():
    video, text, scale = unit_rows(4, 17), unit_rows(4, 18), torch.tensor(3.0)
    groups = torch.tensor([0, 1, 0, 2])

    def contrastive_only_model(**inputs):
        return types.SimpleNamespace(
            video_embeds=video,
            text_embeds=text,
            logit_scale=scale,
            masked_video_loss=None,
            masked_language_loss=None,
            matching_loss=None,
        )

    objectives = PretrainObjectives(
        ClipLoss(),
        ObjectiveWeights(contrastive=1.0, masked_video=0.0, masked_language=0.0),
        (1, 2, 2),
        mask_token_id=MASK,
        vocab_size=VOCAB,
        special_token_ids=[PAD, CLS, SEP, MASK],
    )
    batch = {
        "video": torch.zeros(4, 2, 3, 4, 4, dtype=torch.uint8),
        "input_ids": torch.full((4, 3), 200),
        "attention_mask": torch.ones(4, 3, dtype=torch.long),
    }
    with_copies = clip_loss(video, text, scale, groups)
    plain = clip_loss(video, text, scale)
    assert with_copies.item() != pytest.approx(plain.item(), rel=1e-3)
    losses = objectives(contrastive_only_model, {**batch, "clip_group": groups})
    assert torch.equal(losses["contrastive"], with_copies)
    assert torch.equal(objectives(contrastive_only_model, batch)["contrastive"], plain)


def test_weighted_total_skips_missing_and_zero_weight_objectives():
    losses = {"contrastive": torch.tensor(2.0), "masked_video": torch.tensor(3.0)}
    losses["masked_language"] = None
    weights = ObjectiveWeights(contrastive=0.5, masked_video=2.0, masked_language=1.0)
    assert weighted_total(losses, weights).item() == pytest.approx(0.5 * 2 + 2 * 3)
    assert weighted_total(losses, ObjectiveWeights(masked_video=0)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        ObjectiveWeights(matching=-1)


# ----------------------------------------------------------------------------- masked video


def test_tube_mask_count_ratio_and_tubes():
    grid = (4, 7, 7)  # T', H', W'
    mask = tube_mask(5, grid, 0.9, torch.Generator().manual_seed(1))
    assert mask.shape == (5, 4 * 49) and mask.dtype == torch.bool
    per_frame = int(0.9 * 49)  # 44 of 49 patches per frame
    assert mask.sum(dim=1).tolist() == [4 * per_frame] * 5
    assert mask.float().mean().item() == pytest.approx(0.9, abs=0.01)
    # a tube is masked through all time steps: every time slice equals the first
    by_time = mask.view(5, 4, 49)
    assert torch.equal(by_time, by_time[:, :1].expand_as(by_time))
    # samples differ, a seed reproduces, another seed does not
    assert not torch.equal(by_time[0, 0], by_time[1, 0])
    assert torch.equal(mask, tube_mask(5, grid, 0.9, torch.Generator().manual_seed(1)))
    assert not torch.equal(mask, tube_mask(5, grid, 0.9, torch.Generator().manual_seed(2)))


def test_tube_mask_refuses_masking_nothing_or_everything():
    with pytest.raises(ValueError):
        tube_mask(2, (2, 2, 2), 0.1)  # int(0.4) = 0 masked
    with pytest.raises(ValueError):
        tube_mask(2, (2, 2, 2), 1.0)


def test_patchify_orders_tubes_like_the_conv3d_embedding():
    # frames whose every pixel holds the index of the tube it falls into
    t_, h_, w_ = 2, 3, 4
    index = torch.arange(t_ * h_ * w_, dtype=torch.float).view(t_, h_, w_)
    frames = index.repeat_interleave(2, 0).repeat_interleave(5, 1).repeat_interleave(5, 2)
    frames = frames[None, :, None].expand(1, 4, 3, 15, 20)  # (B, T, C, H, W)
    tubes = patchify(frames, tubelet_size=2, patch_size=5)  # (1, N, 50, 3)
    assert tubes.shape == (1, 24, 50, 3)
    assert torch.equal(tubes[0, :, 0, 0], torch.arange(24, dtype=torch.float))
    assert torch.equal(tubes, tubes[:, :, :1, :1].expand_as(tubes))


def test_norm_pix_loss_matches_hand_computation():
    generator = torch.Generator().manual_seed(3)
    frames = torch.rand(1, 2, 1, 4, 4, generator=generator)  # one channel, 4 tubes of 2x2x2
    bool_masked_pos = torch.tensor([[False, True, False, True]])
    predictions = torch.rand(1, 2, 8, generator=generator)

    def target(tube_row, tube_col):
        values = [
            frames[0, t, 0, 2 * tube_row + y, 2 * tube_col + x].item()
            for t in range(2)
            for y in range(2)
            for x in range(2)
        ]
        mean, std = statistics.mean(values), statistics.stdev(values)  # stdev: unbiased
        return [(v - mean) / (std + 1e-6) for v in values]

    # tubes 1 and 3 are (row 0, col 1) and (row 1, col 1)
    targets = target(0, 1) + target(1, 1)
    flat_predictions = predictions.flatten().tolist()
    expected = statistics.mean((p - t) ** 2 for p, t in zip(flat_predictions, targets, strict=True))
    loss = masked_video_loss(predictions, frames, bool_masked_pos, tubelet_size=2, patch_size=2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_norm_pix_targets_ignore_per_channel_affine_normalization():
    frames = torch.rand(2, 4, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    plain = norm_pix_targets(frames, 2, 4)
    normalized = norm_pix_targets((frames - mean) / std, 2, 4)
    assert torch.allclose(plain, normalized, atol=1e-3)


# ----------------------------------------------------------------------------- masked language

PAD, CLS, SEP, MASK, VOCAB = 0, 101, 102, 103, 1000


def caption_batch(batch=400, length=40):
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1000, (batch, length), generator=generator).clamp(min=200)
    lengths = torch.randint(5, length + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[attention_mask == 0] = PAD
    return ids, attention_mask


def test_mlm_masking_80_10_10_and_never_special_or_pad():
    ids, attention_mask = caption_batch()
    masked, labels = mask_tokens(
        ids,
        attention_mask,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        special_token_ids=[PAD, CLS, SEP, MASK],
        generator=torch.Generator().manual_seed(5),
    )
    chosen = labels != IGNORE_INDEX
    maskable = (attention_mask == 1) & (ids != CLS) & (ids != SEP)
    special = ~maskable

    assert not chosen[special].any()
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # only chosen positions change

    n_chosen = chosen.sum().item()
    assert n_chosen / maskable.sum().item() == pytest.approx(0.15, abs=0.01)  # ~1500 of ~10k
    as_mask = (masked[chosen] == MASK).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    replaced = 1 - as_mask - unchanged
    # about 1500 draws: 3 standard deviations of a 10% share is 2.3 points
    assert as_mask == pytest.approx(0.8, abs=0.035)
    assert replaced == pytest.approx(0.1, abs=0.025)
    assert unchanged == pytest.approx(0.1, abs=0.025)


def test_mlm_masking_is_seeded():
    ids, attention_mask = caption_batch(batch=8)
    kwargs = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=[PAD, CLS, SEP])
    first = mask_tokens(ids, attention_mask, generator=torch.Generator().manual_seed(6), **kwargs)
    again = mask_tokens(ids, attention_mask, generator=torch.Generator().manual_seed(6), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_mlm_loss_is_cross_entropy_on_targets_and_zero_without_any():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 4, IGNORE_INDEX], [1, IGNORE_INDEX, IGNORE_INDEX]])
    expected = (-logits[0, 1].log_softmax(-1)[4] - logits[1, 0].log_softmax(-1)[1]).item() / 2
    assert masked_language_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    empty = masked_language_loss(logits[:, :0], labels[:, :0])
    assert empty.item() == 0.0
    empty.backward()  # the graph survives, so every rank still runs its backward


def test_hard_negatives_never_pick_the_positive():
    similarity = torch.randn(5, 5)
    similarity.fill_diagonal_(100.0)  # all softmax mass on the positive
    for seed in range(5):
        negatives = sample_hard_negatives(similarity, torch.Generator().manual_seed(seed))
        assert (negatives != torch.arange(5)).all()


# ----------------------------------------------------------------------------- 2 ranks vs 1


GLOBAL_BATCH, FEATURES, EMBED = 8, 6, 4


def toy_problem():
    """Global batch of (video, text) features and a linear two-tower 'model' with a logit scale."""
    generator = torch.Generator().manual_seed(7)
    video_in = torch.randn(GLOBAL_BATCH, FEATURES, generator=generator)
    text_in = torch.randn(GLOBAL_BATCH, FEATURES, generator=generator)
    model = torch.nn.ModuleDict(
        {"video": torch.nn.Linear(FEATURES, EMBED), "text": torch.nn.Linear(FEATURES, EMBED)}
    )
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    model.logit_scale = torch.nn.Parameter(torch.tensor(2.5))
    return video_in, text_in, model


def toy_step(model, video_in, text_in, loss_fn):
    video = torch.nn.functional.normalize(model["video"](video_in), dim=-1)
    text = torch.nn.functional.normalize(model["text"](text_in), dim=-1)
    loss = loss_fn(video, text, model.logit_scale)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


LOCAL_COPIES = [3, 0, 3, 3]
"""Local copy ids, the same on every rank: clip 3 three times, clip 0 once. Only the rank offset
keeps rank 0's clip 3 apart from rank 1's."""


def copies_rows(rank, per_rank):
    """Rows of the toy batch that rank ``rank`` holds as copies; they are also the global ids."""
    return rank * per_rank + torch.tensor(LOCAL_COPIES)


def _two_rank_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for copies in (False, True):
            for gather_with_grad in (True, False):
                video_in, text_in, model = toy_problem()
                per_rank = GLOBAL_BATCH // world_size
                loss_fn = ClipLoss(rank, world_size, gather_with_grad=gather_with_grad)
                if copies:
                    rows = copies_rows(rank, per_rank)
                    loss_fn = functools.partial(loss_fn, groups=torch.tensor(LOCAL_COPIES))
                else:
                    rows = slice(rank * per_rank, (rank + 1) * per_rank)
                loss, grads = toy_step(model, video_in[rows], text_in[rows], loss_fn)
                # what DeepSpeed / DDP do after backward: average the gradients over ranks
                for grad in grads.values():
                    dist.all_reduce(grad)
                    grad /= world_size
                results[copies, gather_with_grad] = (loss, grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Gloo ranks on 127.0.0.1, started once: {(copies, gather_with_grad): (loss, grads)}."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in (0, 1)]


def assert_ranks_match(results, reference_loss, reference_grads):
    for gather_with_grad, (loss, grads) in results.items():
        # each rank reports the global loss
        assert loss == pytest.approx(reference_loss, rel=1e-6), gather_with_grad
        for name, grad in reference_grads.items():
            torch.testing.assert_close(
                grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"{name} {gather_with_grad}"
            )


def test_two_ranks_equal_one_process(two_rank_results):
    """Both gather modes, against the loss on the whole batch."""
    video_in, text_in, model = toy_problem()
    reference_loss, reference_grads = toy_step(model, video_in, text_in, ClipLoss())
    for results in two_rank_results:
        assert_ranks_match(
            {mode: value for (copies, mode), value in results.items() if not copies},
            reference_loss,
            reference_grads,
        )


def test_two_ranks_with_copies_equal_one_process_and_deduplicated(two_rank_results):
    """Local copy ids on 2 ranks, both gather modes, against one process holding both ranks'
    rows with global ids, and against the de-duplicated clips without groups."""
    rows = torch.cat([copies_rows(rank, GLOBAL_BATCH // 2) for rank in (0, 1)])  # (8,)
    video_in, text_in, model = toy_problem()
    reference_loss, reference_grads = toy_step(
        model, video_in[rows], text_in[rows], functools.partial(ClipLoss(), groups=rows)
    )
    video_in, text_in, model = toy_problem()
    unique = rows.unique()  # clips 0, 3, 4, 7
    dedup_loss, dedup_grads = toy_step(model, video_in[unique], text_in[unique], ClipLoss())
    assert reference_loss == pytest.approx(dedup_loss, rel=1e-6)
    for name, grad in dedup_grads.items():
        torch.testing.assert_close(reference_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)

    for results in two_rank_results:
        assert_ranks_match(
            {mode: value for (copies, mode), value in results.items() if copies},
            reference_loss,
            reference_grads,
        )
