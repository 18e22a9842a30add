"""ID dropout and the popularity prior predicted from content, on tiny modules: the step's ID
masks are seeded and never give an item without training interactions its ID; the item table
of a hybrid tower serves such items from content; the predictor's loss, the head's prior of a
new item and the catalogue's prior table, by hand; the config fields' checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_sampling_log_q import WINDOW, data  # noqa: F401  (data is a fixture)

from finetune.batches import NextItemBatcher
from finetune.config import ConfigError, FinetuneModelSettings, LossSettings
from finetune.item_source import ItemSource, refresh_predicted_prior
from finetune.model import PAD_ID, ContentEmbeddings, ItemTower, RankingHead
from finetune.popularity import PopularityPredictor
from finetune.recommender import RecommenderSpec, build_model
from pretrain.model import VideoTextConfig, VideoTextModel

EMBED = 16  # VideoTextConfig.tiny().embed_dim
NOT_TRAINED = (6, 7)
"""The fixture's items without training interactions (held-out targets only)."""


def random_cache(num_items: int, dim: int, seed: int = 0) -> ContentEmbeddings:
    """Content of items 1..num_items, every item with a clip and a text."""
    generator = torch.Generator().manual_seed(seed)
    cache = ContentEmbeddings.empty(num_items + 1, dim)
    cache.video[1:] = F.normalize(torch.randn(num_items, dim, generator=generator), dim=-1)
    cache.text[1:] = F.normalize(torch.randn(num_items, dim, generator=generator), dim=-1)
    cache.video_mask[1:] = cache.text_mask[1:] = True
    return cache


def id_masks(batcher: NextItemBatcher, seed: int, steps: int = 40) -> list[dict[int, bool]]:
    """Each step's ID mask by item id (every trainable user per step, the untrained items as
    the batch's anchors, so they are embedded at every step)."""
    items = ItemSource(torch.from_numpy(batcher.popularity > 0), cache=random_cache(7, 4))
    generator = torch.Generator().manual_seed(seed)
    users, anchors = batcher.trainable_users(), torch.tensor(NOT_TRAINED)
    masks = []
    for _ in range(steps):
        batch = batcher.batch(users, items, generator, torch.device("cpu"), anchors)
        ids = batch.items.item_ids.tolist()
        masks.append(dict(zip(ids, batch.items.id_mask.tolist(), strict=True)))
    return masks


def test_id_dropout_masks_are_seeded_and_never_give_an_untrained_item_its_id(data):  # noqa: F811
    loss = LossSettings(uniform_negatives=6)
    dropout = NextItemBatcher(data, loss, WINDOW, id_dropout=0.5)
    first, rerun, other = id_masks(dropout, 0), id_masks(dropout, 0), id_masks(dropout, 1)
    assert first == rerun  # a rerun draws the same masks
    assert first != other
    assert all(not step[item] for step in first for item in NOT_TRAINED)
    assert all(not step[PAD_ID] for step in first if PAD_ID in step)
    warm = [kept for step in first for item, kept in step.items() if 1 <= item <= 5]
    assert 0.35 < sum(warm) / len(warm) < 0.65, sum(warm) / len(warm)  # 1 - p, p = 0.5
    masks_of_an_item = {step.get(2) for step in first}
    assert masks_of_an_item == {True, False}  # per item and step, not once per run
    # p = 0: every warm item keeps its ID, untrained ones still have none
    for step in id_masks(NextItemBatcher(data, loss, WINDOW), 0, steps=3):
        assert all(kept == (1 <= item <= 5) for item, kept in step.items())


def test_an_item_without_training_interactions_is_served_from_content():
    """The item table (evaluation, export) gives an untrained item its content alone, however
    its (never trained) ID row looks; a warm item gets content + ID."""
    torch.manual_seed(0)
    tower = ItemTower(VideoTextModel(VideoTextConfig.tiny()), num_item_ids=7)
    tower.freeze_encoders()
    with torch.no_grad():
        tower.id_embeddings.weight.normal_()  # every row, the untrained items' included
    warm = torch.tensor([False, True, True, True, True, True, False, False])
    items = ItemSource(warm, cache=random_cache(7, EMBED))
    table = items.table(tower, torch.device("cpu"))
    content = items.table(tower, torch.device("cpu"), with_ids=False)
    for item in NOT_TRAINED:
        torch.testing.assert_close(table[item], content[item], atol=0, rtol=0)
    assert (table[1:6] - content[1:6]).norm(dim=-1).min() > 0.1
    embeddings, content_only = tower.combine_with_content(
        items.cache[torch.arange(8)], torch.arange(8), warm
    )
    torch.testing.assert_close(embeddings, table)
    torch.testing.assert_close(content_only, content)


def test_predictor_regression_loss_by_hand():
    predictor = PopularityPredictor(dim=4, num_items=5)
    with torch.no_grad():
        predictor.content_head[-1].bias.fill_(0.5)  # the head predicts 0.5 for every item
        predictor.id_correction.weight[1:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    content = torch.randn(4, 4)
    ids = torch.tensor([1, 2, 3, 6])  # 6: a new item beyond the table, never counted
    id_mask = torch.tensor([True, False, True, False])  # item 2's ID dropped this step
    targets = torch.tensor([1.0, -1.0, 0.0, float("nan")])
    prior = predictor(content, ids, id_mask)
    torch.testing.assert_close(prior, torch.tensor([1.5, 0.5, 3.5, 0.5]))
    loss = predictor.regression_loss(content, ids, id_mask, targets)
    head_error = ((0.5 - 1) ** 2 + (0.5 + 1) ** 2 + 0.5**2) / 3  # items 1, 2, 3
    corrected_error = ((1.5 - 1) ** 2 + 3.5**2) / 2  # items 1 and 3, whose IDs are kept
    torch.testing.assert_close(loss, torch.tensor(head_error + corrected_error))
    loss.backward()
    assert predictor.id_correction.weight.grad[[2, 4, 5]].abs().sum() == 0  # dropped, unseen
    assert predictor.id_correction.weight.grad[[1, 3]].abs().min() > 0


def test_a_new_item_is_scored_with_the_prior_its_content_predicts():
    torch.manual_seed(0)
    head = RankingHead(EMBED, num_prior_items=5, predicted_prior=True)
    with torch.no_grad():
        head.popularity_weight.fill_(0.5)
        head.prior_predictor.content_head[-1].weight.normal_()
        head.popularity_prior.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.0, 0.5]))
    users, items = torch.randn(3, EMBED), torch.randn(3, EMBED)
    ids = torch.tensor([3, PAD_ID, 5])  # a catalogue item, a new one, another catalogue item
    plain = RankingHead(EMBED)
    plain.load_state_dict(head.state_dict(), strict=False)
    with torch.no_grad():
        new = head.prior_predictor.from_content(items[1])
    prior = torch.stack([torch.tensor(2.0), new, torch.tensor(0.5)])
    assert abs(float(prior[1])) > 1e-3
    expected = plain.score_all(users, items) + head.logit_scale * 0.5 * prior
    torch.testing.assert_close(head.score_all(users, items, ids), expected, atol=1e-5, rtol=0)
    pairs = head.score_pairs(users, items, ids)
    torch.testing.assert_close(pairs, expected.diagonal(), atol=1e-5, rtol=0)
    given = torch.tensor([7.0, 8.0, 9.0])  # training hands the prior over
    shifted = plain.score_all(users, items) + head.logit_scale * 0.5 * given
    torch.testing.assert_close(head.score_all(users, items, ids, given), shifted)


def test_the_prior_table_is_the_predictors_and_the_baseline_has_none():
    torch.manual_seed(0)
    spec = RecommenderSpec(dim=EMBED, num_items=7, id_embeddings=True, popularity_prior=True,
                           predicted_prior=True)  # fmt: skip
    model = build_model(spec, VideoTextModel(VideoTextConfig.tiny()))
    predictor = model.head.prior_predictor
    with torch.no_grad():
        predictor.content_head[-1].weight.normal_()
        predictor.id_correction.weight.normal_()
        model.item_tower.id_embeddings.weight.normal_()
    warm = torch.tensor([False, True, True, True, True, True, False, False])
    items = ItemSource(warm, cache=random_cache(7, EMBED))
    refresh_predicted_prior(model, items, torch.device("cpu"))
    content = items.table(model.item_tower, torch.device("cpu"), with_ids=False)
    with torch.no_grad():
        predicted = predictor.from_content(content)
        corrections = predictor.id_correction.weight[:, 0]
    expected = torch.where(warm, predicted + corrections, predicted)
    expected[PAD_ID] = 0
    torch.testing.assert_close(model.head.popularity_prior, expected, atol=1e-6, rtol=0)
    assert build_model(spec, None).head.prior_predictor is None  # the ID-SASRec baseline


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"id_dropout": 1.0, "id_embeddings": True}, "model.id_dropout"),
        ({"id_dropout": -0.1, "id_embeddings": True}, "model.id_dropout"),
        ({"id_dropout": 0.3}, "model.id_dropout"),  # no ID to drop
        ({"predicted_prior": True}, "model.predicted_prior"),  # without popularity_prior
    ],
)
def test_bad_settings_are_refused_naming_the_field(settings, field):
    with pytest.raises(ConfigError, match=field):
        FinetuneModelSettings(**settings)
    FinetuneModelSettings(id_dropout=0.3, popularity_prior=True, predicted_prior=True)
