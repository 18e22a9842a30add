"""Finetune model, tiny sizes: item tower paths and freezing, user tower masks, heads, losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.model import (
    PAD_ID,
    ContentEmbeddings,
    IDOnlyItemTower,
    ItemTower,
    RankingHead,
    Recommender,
    UserTower,
    bucketize_time_gaps,
    centred_log_popularity,
    history_exclusion,
    mixed_sampling_log_q,
    pointwise_bce_loss,
    sampled_softmax_loss,
)
from finetune.recommender import RecommenderSpec, build_model
from pretrain.model import VideoTextConfig, VideoTextModel

EMBED = 16  # VideoTextConfig.tiny().embed_dim
CLS, SEP = 1, 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors here are tiny: on a loaded 2-core machine, OpenMP threads waiting on each other
    made the toy training test 50x slower (17 s against 0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> VideoTextModel:
    torch.manual_seed(0)
    return VideoTextModel(VideoTextConfig.tiny()).eval()


def make_items(num_items=5, max_clips=2, length=8, seed=0):
    """Items 1..num_items: item 1 video only (2 clips), item 2 text only, the rest both (1 clip).

    Returns the tensors of ``ItemTower.encode_content`` plus the item ids.
    """
    generator = torch.Generator().manual_seed(seed)
    clips = torch.randint(
        0, 256, (num_items, max_clips, 4, 3, 32, 32), generator=generator, dtype=torch.uint8
    )
    clip_mask = torch.zeros(num_items, max_clips, dtype=torch.bool)
    clip_mask[0] = True
    clip_mask[2:, 0] = True
    input_ids = torch.randint(4, 128, (num_items, length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = CLS, SEP
    attention_mask = torch.ones(num_items, length, dtype=torch.long)
    text_mask = torch.ones(num_items, dtype=torch.bool)
    text_mask[0] = False
    item_ids = torch.arange(1, num_items + 1)
    return dict(
        clips=clips,
        clip_mask=clip_mask,
        input_ids=input_ids,
        attention_mask=attention_mask,
        text_mask=text_mask,
    ), item_ids


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def numel(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ----------------------------------------------------------------------------- item tower


def test_item_tower_single_modality_items_match_the_encoder(encoder):
    tower = ItemTower(encoder)  # D == E: identity projection, no ID table
    inputs, _ = make_items()
    with torch.no_grad():
        items = tower(**inputs)  # (5, E)
        _, clips = encoder.encode_video(inputs["clips"][0])  # item 1's two clips
        _, texts = encoder.encode_text(inputs["input_ids"], inputs["attention_mask"])
    assert items.shape == (5, EMBED)
    torch.testing.assert_close(items[0], F.normalize(clips.mean(0), dim=-1))  # video only
    torch.testing.assert_close(items[1], texts[1])  # text only
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(5))


def test_joint_embedding_is_the_untrained_content_tower(encoder):
    """content-kNN's pretrained item embedding is what the item tower starts from."""
    tower = ItemTower(encoder)  # D == E: identity projection, no ID table
    inputs, _ = make_items()
    with torch.no_grad():
        content = tower.encode_content(**inputs)
        torch.testing.assert_close(content.joint_embedding(), tower.combine(content))
    mixed = F.normalize(content.video[2] + content.text[2], dim=-1)  # item 3 has both
    torch.testing.assert_close(content.joint_embedding()[2], mixed)
    none = ContentEmbeddings.empty(1, EMBED)
    assert not none.joint_embedding().any()


def test_pooled_text_starts_at_the_joint_embedding_and_its_projection_trains(encoder):
    """The tower's own copy of the text projection: the same item embeddings at init, a
    (N, Dt) pooled text field, and with frozen encoders the copy trains, not the encoder's."""
    inputs, _ = make_items()
    joint, pooled = ItemTower(encoder), ItemTower(encoder, pooled_text=True)
    joint.freeze_encoders()
    pooled.freeze_encoders()
    with torch.no_grad():
        joint_content = joint.encode_content(**inputs)
        content = pooled.encode_content(**inputs)
        torch.testing.assert_close(pooled.combine(content), joint.combine(joint_content))
        torch.testing.assert_close(
            content.joint_embedding(encoder.text_projection), joint_content.joint_embedding()
        )
    text_width = encoder.config.text_config.hidden_size
    assert text_width != EMBED and content.text.shape == (5, text_width)
    assert pooled.text_dim == text_width and joint.text_dim == EMBED
    assert not content.text[0].any()  # item 1 has no text
    pooled_text = encoder.text_features(inputs["input_ids"][1:2], inputs["attention_mask"][1:2])
    torch.testing.assert_close(content.text[1], pooled_text[0])

    trainable_names = {name for name, p in pooled.named_parameters() if p.requires_grad}
    assert {"text_projection.weight", "text_projection.bias"} <= trainable_names
    assert not any(name.startswith("encoder.") for name in trainable_names)
    optimizer = torch.optim.SGD(pooled.parameters(), lr=0.5)
    before = pooled.text_projection.weight.detach().clone()
    pretrained = encoder.text_projection.weight.detach().clone()
    pooled.combine(content)[1:].sum().backward()
    optimizer.step()
    assert not torch.equal(pooled.text_projection.weight, before)
    assert torch.equal(encoder.text_projection.weight, pretrained)
    # every mode leaves the encoder's projection out of the path (a trained copy is used)
    pooled.unfreeze_encoders()
    assert not encoder.text_projection.weight.requires_grad
    assert encoder.text_model.encoder.layer[0].attention.self.query.weight.requires_grad
    pooled.freeze_encoders()
    joint.freeze_encoders()


def test_cached_path_equals_end_to_end_path(encoder):
    torch.manual_seed(1)
    tower = ItemTower(encoder, dim=12, num_item_ids=5)
    with torch.no_grad():
        tower.id_embeddings.weight.normal_()  # as if trained
        tower.modality_logit.fill_(0.7)
    tower.freeze_encoders()
    tower.train()
    inputs, item_ids = make_items()
    id_mask = item_ids != 4  # item 4 is cold
    live = tower(**inputs, item_ids=item_ids, id_mask=id_mask)  # (5, 12)

    # the cache is built in a different batch composition, as a catalogue pass would
    cache = ContentEmbeddings.empty(6, EMBED)
    for part in (slice(0, 2), slice(2, 5)):
        chunk = {name: value[part] for name, value in inputs.items()}
        cache[item_ids[part]] = tower.encode_content(**chunk)
    cached = tower.from_cache(cache, item_ids, id_mask)
    torch.testing.assert_close(cached, live, atol=1e-6, rtol=1e-5)
    assert cached.requires_grad  # the tower's own layers still train on the fast path

    histories = torch.tensor([[1, 2, PAD_ID], [3, 4, 5]])
    assert tower.from_cache(cache, histories).shape == (2, 3, 12)
    assert torch.all(tower.from_cache(cache, histories)[0, 2] == 0)  # padding embeds to zero

    tower.unfreeze_top_k(1)
    with pytest.raises(RuntimeError, match="stale"):
        tower.from_cache(cache, item_ids)


def test_hybrid_ids_only_touch_warm_items(encoder):
    tower = ItemTower(encoder, num_item_ids=5)
    inputs, item_ids = make_items()
    with torch.no_grad():
        content = tower(**inputs, item_ids=item_ids)  # ID rows are zero at init
        tower.id_embeddings.weight.normal_()
        warm = tower(**inputs, item_ids=item_ids, id_mask=item_ids != 3)
        beyond_table = tower(**inputs, item_ids=item_ids + 100, id_mask=torch.zeros(5).bool())
    torch.testing.assert_close(warm[2], content[2])  # cold: content only
    assert not torch.allclose(warm[0], content[0])
    torch.testing.assert_close(beyond_table, content)  # new items need no table row


def test_freezing_modes_count_trainable_parameters(encoder):
    tower = ItemTower(VideoTextModel(VideoTextConfig.tiny()), num_item_ids=5)
    model = tower.encoder
    own = numel(tower) - numel(model)  # mix logit, projection, ID table
    heads = (model.video_norm, model.video_projection, model.text_projection)
    # the text pooler is kept for the export, frozen: BertModel's output it feeds is not used
    path = numel(model.video_model, model.text_model, *heads) - numel(model.text_model.pooler)

    assert trainable(tower) == own + path  # default: whole embedding path
    assert trainable(model.decoder) == trainable(model.fusion_layers) == 0
    assert not model.logit_scale.requires_grad

    tower.freeze_encoders()
    assert trainable(tower) == own
    assert not model.training  # frozen encoders run without dropout

    tower.unfreeze_top_k(1)
    top = numel(model.video_model.encoder.layer[-1], model.text_model.encoder.layer[-1])
    assert trainable(tower) == own + top + numel(*heads)
    assert trainable(model.video_model.encoder.layer[0]) == 0
    assert trainable(model.text_model.embeddings) == 0
    tower.train()
    assert model.training

    tower.unfreeze_encoders()
    assert trainable(tower) == own + path
    with pytest.raises(ValueError, match="depth"):
        tower.unfreeze_top_k(3)


def test_top_k_training_reaches_only_the_top_blocks(encoder):
    tower = ItemTower(VideoTextModel(VideoTextConfig.tiny()))
    tower.unfreeze_top_k(1)
    inputs, _ = make_items()
    tower(**inputs).sum().backward()
    model = tower.encoder
    assert model.text_model.encoder.layer[-1].output.dense.weight.grad is not None
    assert model.video_model.encoder.layer[-1].output.dense.weight.grad is not None
    assert model.text_model.encoder.layer[0].output.dense.weight.grad is None


# ----------------------------------------------------------------------------- user tower


def make_user_tower(**overrides) -> UserTower:
    torch.manual_seed(0)
    fields = dict(dim=16, num_layers=2, num_heads=2, max_length=10, dropout=0.0)
    return UserTower(**(fields | overrides)).eval()


def test_user_tower_shapes_and_last_state():
    tower = make_user_tower(num_time_buckets=8)
    history = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
    gaps = torch.tensor([[-1.0, 5, 60, 3600, 86400]]).expand(3, 5)
    states = tower(history, mask, gaps)
    assert states.shape == (3, 5, 16)
    assert torch.isfinite(states).all()
    assert torch.all(states[1, 3:] == 0) and torch.all(states[2] == 0)
    last = UserTower.last_states(states, mask)
    torch.testing.assert_close(last[:2], torch.stack([states[0, 4], states[1, 2]]))


def test_user_tower_is_causal():
    tower = make_user_tower()
    history, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    changed = history.clone()
    changed[:, 4] = torch.randn(2, 16)
    before, after = tower(history, mask), tower(changed, mask)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_states(side):
    tower = make_user_tower(num_time_buckets=8)
    items, gaps = torch.randn(1, 3, 16), torch.tensor([[-1.0, 30, 7200]])
    reference = tower(items, torch.ones(1, 3, dtype=torch.bool), gaps)
    pad_items = torch.randn(1, 2, 16)  # garbage in padding slots must not matter
    pad_gaps, real = torch.tensor([[99.0, 1e6]]), torch.tensor([[True] * 3 + [False] * 2])
    if side == "left":
        padded = tower(
            torch.cat([pad_items, items], 1), real.flip(1), torch.cat([pad_gaps, gaps], 1)
        )
        torch.testing.assert_close(padded[:, 2:], reference)
    else:
        padded = tower(torch.cat([items, pad_items], 1), real, torch.cat([gaps, pad_gaps], 1))
        torch.testing.assert_close(padded[:, :3], reference)


def test_time_gap_buckets_are_logarithmic():
    gaps = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0, 1e9])
    assert bucketize_time_gaps(gaps, 8).tolist() == [0, 1, 2, 2, 3, 7]


# ----------------------------------------------------------------------------- heads


def test_dot_and_mlp_heads_shapes():
    users, items = torch.randn(4, 16), torch.randn(7, 16)
    for kind in ("dot", "mlp"):
        head = RankingHead(16, kind=kind, mlp_hidden=8)
        all_scores = head.score_all(users, items)
        assert all_scores.shape == (4, 7)
        pairs = head.score_pairs(users[:, None].expand(4, 7, 16), items[None].expand(4, 7, 16))
        torch.testing.assert_close(pairs, all_scores)
        assert head.score_pairs(users, items[:4]).shape == (4,)


def test_dot_head_is_scaled_cosine_with_fixed_temperature():
    head = RankingHead(16, temperature=0.1, learn_temperature=False)
    assert trainable(head) == 0
    users, items = torch.randn(2, 16), torch.randn(3, 16)
    expected = 10 * F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T
    torch.testing.assert_close(head.score_all(users, items), expected)


def test_popularity_prior_is_centred_log_counts_of_warm_items():
    counts = torch.tensor([0, 1, 0, 3, 15])  # padding, three warm items, one never seen
    # log(1 + count) of the warm items: ln 2 · (1, 2, 4), mean ln 2 · 7 / 3
    expected = math.log(2) * torch.tensor([0, 1 - 7 / 3, 0, 2 - 7 / 3, 4 - 7 / 3])
    prior = centred_log_popularity(counts)
    assert prior.dtype == torch.float32
    torch.testing.assert_close(prior, expected, atol=1e-7, rtol=0)
    assert not centred_log_popularity(torch.zeros(3, dtype=torch.long)).any()
    head = RankingHead(16, num_prior_items=4)
    head.set_popularity_prior(counts)
    assert torch.equal(head.popularity_prior, prior)
    with pytest.raises(ValueError, match="counts of shape"):
        head.set_popularity_prior(torch.ones(3))


@pytest.mark.parametrize("kind", ["dot", "mlp"])
def test_popularity_prior_adds_its_weight_times_the_prior(kind):
    torch.manual_seed(0)
    plain = RankingHead(16, kind=kind, mlp_hidden=8)
    head = RankingHead(16, kind=kind, mlp_hidden=8, num_prior_items=5)
    head.load_state_dict(plain.state_dict(), strict=False)  # the same scale and MLP
    head.set_popularity_prior(torch.tensor([0, 2, 0, 9, 1, 4]))
    users, items = torch.randn(3, 16), torch.randn(4, 16)
    ids = torch.tensor([3, PAD_ID, 2, 5])  # a warm item, a new item (PAD_ID), a cold one
    # w = 0 at init: exactly the plain head
    assert torch.equal(head.score_all(users, items, ids), plain.score_all(users, items))
    with torch.no_grad():
        head.popularity_weight.fill_(0.75)
    shift = head.logit_scale * 0.75 * head.popularity_prior[ids]  # (4,), the cosine's units
    assert shift[0] > 0 and shift[1] == shift[2] == 0
    expected = plain.score_all(users, items) + shift
    torch.testing.assert_close(head.score_all(users, items, ids), expected, atol=1e-6, rtol=0)
    pairs = head.score_pairs(users, items[:3], ids[:3])
    torch.testing.assert_close(pairs, expected.diagonal(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs item_ids"):
        head.score_all(users, items)


def test_only_content_models_get_the_popularity_prior(encoder):
    spec = RecommenderSpec(dim=EMBED, num_items=6, id_embeddings=False, popularity_prior=True)
    content = build_model(spec, encoder)
    assert content.head.popularity_prior.shape == (7,)
    assert content.head.popularity_weight.requires_grad
    assert {"head.popularity_prior", "head.popularity_weight"} <= set(content.state_dict())
    without = RecommenderSpec(dim=EMBED, num_items=6, id_embeddings=False)
    ids_only = build_model(spec, None)  # the ID-SASRec baseline
    assert ids_only.head.popularity_prior is None
    assert set(ids_only.state_dict()) == set(build_model(without, None).state_dict())
    assert set(build_model(without, encoder).state_dict()) == set(content.state_dict()) - {
        "head.popularity_prior",
        "head.popularity_weight",
    }


def test_recommender_scores_next_items():
    items = IDOnlyItemTower(num_items=9, dim=16)
    model = Recommender(items, make_user_tower(), RankingHead(16)).eval()
    history = torch.tensor([[1, 2, 3, PAD_ID], [4, 5, 6, 7]])
    mask = history != PAD_ID
    states = model.user_states(items(history), mask)
    assert states.shape == (2, 4, 16)
    last = model.last_user_states(items(history), mask)
    torch.testing.assert_close(last, torch.stack([states[0, 2], states[1, 3]]))
    assert model.score(last, items(torch.arange(1, 10))).shape == (2, 9)


# ----------------------------------------------------------------------------- losses


def plain_head() -> RankingHead:
    """Logits = raw dot products: easy to compute by hand."""
    return RankingHead(2, temperature=1.0, learn_temperature=False, normalize=False)


def test_loss_equals_hand_computed_cross_entropy():
    users = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    negatives = torch.tensor([[-1.0, 3.0]])
    loss = sampled_softmax_loss(
        users, torch.tensor([1, 2]), positives, torch.tensor([3]), negatives, plain_head()
    )
    # logits, row 0: [1, 0.5, -1] target 0; row 1: [2, 2, 6] target 1
    row0 = -1 + math.log(math.exp(1) + math.exp(0.5) + math.exp(-1))
    row1 = -2 + math.log(2 * math.exp(2) + math.exp(6))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_row_weights_weight_each_row_in_the_mean():
    users = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    negatives = torch.tensor([[-1.0, 3.0]])
    args = (users, torch.tensor([1, 2]), positives, torch.tensor([3]), negatives, plain_head())
    row0 = -1 + math.log(math.exp(1) + math.exp(0.5) + math.exp(-1))
    row1 = -2 + math.log(2 * math.exp(2) + math.exp(6))
    weighted = sampled_softmax_loss(*args, row_weights=torch.tensor([0.25, 0.75]))
    assert weighted.item() == pytest.approx(0.25 * row0 + 0.75 * row1, rel=1e-6)
    equal = sampled_softmax_loss(*args, row_weights=torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(equal, sampled_softmax_loss(*args))
    only_first = sampled_softmax_loss(*args, row_weights=torch.tensor([1.0, 0.0]))
    assert only_first.item() == pytest.approx(row0, rel=1e-6)


def test_positive_duplicates_and_history_items_are_not_negatives():
    users = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    negatives = torch.tensor([[-1.0, 3.0], [2.0, 0.0]])
    head = plain_head()
    # candidate 3 is a sampled copy of row 0's positive (id 1); candidate 2 (item 9) lies in
    # user 1's history; both would be hard negatives, so including them raises the loss
    positive_ids, negative_ids = torch.tensor([1, 5]), torch.tensor([9, 1])
    history = torch.tensor([[7, PAD_ID], [9, 8]])
    loss = sampled_softmax_loss(
        users, positive_ids, positives, negative_ids, negatives, head, history_ids=history
    )
    logits = users @ torch.cat([positives, negatives]).T  # (2, 4)
    row0 = torch.cat([logits[0, :3]])  # drop column 3 (duplicate of the positive)
    row1 = logits[1, [0, 1, 3]]  # drop column 2 (history item 9)
    expected = (
        F.cross_entropy(row0[None], torch.tensor([0]))
        + F.cross_entropy(row1[None], torch.tensor([1]))
    ) / 2
    torch.testing.assert_close(loss, expected)
    unmasked = F.cross_entropy(logits, torch.tensor([0, 1]))
    assert unmasked > loss + 0.1


def test_history_index_maps_position_rows_to_their_user():
    history = torch.tensor([[3, 4, PAD_ID], [5, 6, 7]])
    candidates = torch.tensor([3, 5, 7, PAD_ID])
    exclusion = history_exclusion(history, candidates)
    assert exclusion.tolist() == [[True, False, False, False], [False, True, True, False]]

    users, embeddings = torch.randn(3, 2), torch.randn(3, 2)
    args = (users, torch.tensor([3, 4, 6]), embeddings, torch.tensor([], dtype=torch.long))
    empty = torch.zeros(0, 2)
    # rows 0 and 1 are positions of user 0, whose history holds 3 and 4: they mask each other
    loss = sampled_softmax_loss(
        *args, empty, plain_head(), history_ids=history, history_index=torch.tensor([0, 0, 1])
    )
    logits = users @ embeddings.T
    # row 0 keeps item 6 (not user 0's); row 1 keeps 6 too; row 2 (user 1) keeps everything
    expected = torch.stack(
        [
            F.cross_entropy(logits[0, [0, 2]], torch.tensor(0)),
            F.cross_entropy(logits[1, [1, 2]], torch.tensor(0)),
            F.cross_entropy(logits[2], torch.tensor(2)),
        ]
    )
    torch.testing.assert_close(loss, expected.mean())


def test_padding_rows_and_candidates_are_ignored():
    users, embeddings = torch.randn(3, 2), torch.randn(3, 2)
    ids = torch.tensor([4, PAD_ID, 6])
    no_negatives = (torch.tensor([], dtype=torch.long), torch.zeros(0, 2))
    loss = sampled_softmax_loss(users, ids, embeddings, *no_negatives, plain_head())
    logits = (users @ embeddings.T)[[0, 2]][:, [0, 2]]
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 1])))


def test_log_q_correction_direction_and_value():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[0.5, 0.5]])
    args = (users, torch.tensor([1, 2]), positives, torch.tensor([3]), negatives, plain_head())
    base = sampled_softmax_loss(*args)
    # item 3 is popular: it shows up as a negative often, so its logit is corrected downwards
    # and the loss (which it inflated) drops
    popular_negative = torch.log(torch.tensor([0.1, 0.1, 0.8]))
    corrected = sampled_softmax_loss(*args, candidate_log_q=popular_negative)
    assert corrected < base
    logits = users @ torch.cat([positives, negatives]).T - popular_negative
    torch.testing.assert_close(corrected, F.cross_entropy(logits, torch.tensor([0, 1])))
    # a popular positive gets no free credit: the loss rises
    popular_positive = torch.log(torch.tensor([0.8, 0.1, 0.1]))
    assert sampled_softmax_loss(*args, candidate_log_q=popular_positive) > base


def test_mixed_sampling_log_q():
    probability = torch.tensor([0.0, 0.5, 0.3, 0.2])  # items 1..3
    log_q = mixed_sampling_log_q(torch.tensor([1, 3]), probability, 4, 6, 3)
    torch.testing.assert_close(log_q, torch.log(torch.tensor([4 * 0.5 + 2, 4 * 0.2 + 2])))


def test_losses_add_the_popularity_prior_of_each_candidate():
    """Training sees the prior: the softmax over candidates and the BCE score scale · w · prior
    on top of the plain logits, so the prior's weight gets a gradient."""
    head = RankingHead(2, temperature=0.5, learn_temperature=False, normalize=False,
                       num_prior_items=9)  # fmt: skip
    head.set_popularity_prior(torch.tensor([0, 1, 0, 3, 7, 0, 0, 0, 0, 20]))
    with torch.no_grad():
        head.popularity_weight.fill_(0.5)
    users = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    negatives = torch.tensor([[-1.0, 3.0], [2.0, 0.0]])
    positive_ids, negative_ids = torch.tensor([1, 4]), torch.tensor([9, 2])
    loss = sampled_softmax_loss(users, positive_ids, positives, negative_ids, negatives, head)
    prior = 2 * 0.5 * head.popularity_prior[torch.cat([positive_ids, negative_ids])]
    logits = 2 * users @ torch.cat([positives, negatives]).T + prior  # (2, 4), scale 2
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 1])))
    loss.backward()
    assert head.popularity_weight.grad.abs() > 1e-3

    labels = torch.tensor([1.0, 0.0])
    bce = pointwise_bce_loss(users, positives, labels, head, positive_ids)
    pair_logits = 2 * (users * positives).sum(dim=-1) + prior[:2]
    torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(pair_logits, labels))


def test_pointwise_bce_loss():
    head = plain_head()
    users, items = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    loss = pointwise_bce_loss(users, items, torch.tensor([1, 0]), head)
    expected = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------- training


def test_id_only_sasrec_learns_a_toy_next_item_task():
    """Each user walks the catalogue cyclically (next item = item + 1): easy to learn."""
    torch.manual_seed(0)
    num_items, length, batch = 20, 8, 16
    items = IDOnlyItemTower(num_items, 32)
    model = Recommender(
        items, UserTower(32, 1, 2, length, dropout=0.0), RankingHead(32, temperature=0.1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        start = torch.randint(0, num_items, (batch, 1))
        sequence = (start + torch.arange(length + 1)) % num_items + 1  # (B, L + 1) ids 1..20
        history, targets = sequence[:, :-1], sequence[:, 1:]
        states = model.user_states(items(history), history != PAD_ID)  # (B, L, D)
        negative_ids = torch.randint(1, num_items + 1, (16,))
        loss = sampled_softmax_loss(
            states.reshape(-1, 32),
            targets.reshape(-1),
            items(targets.reshape(-1)),
            negative_ids,
            items(negative_ids),
            model.head,
            history_ids=history,
            history_index=torch.arange(batch).repeat_interleave(length),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
