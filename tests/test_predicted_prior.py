"""A tiny finetune run (in-process, a world of one) of the hybrid tower with ID dropout and the
popularity prior predicted from content → ``vidrec export`` → ``vidrec recommend --item``: no
item without training interactions ever gets its ID (trained rows stay zero, the served table
is its content), the export holds the predictor and its prior table, and a new item is scored
with the prior its content predicts."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from safetensors.torch import load_file
from test_finetune_train import data_overrides, tiny
from test_pretrain_train import world  # noqa: F401  (the module-wide process group fixture)

import vidrec_cli
from finetune import report
from finetune.config import load_finetune_config
from finetune.export import HEAD, load_recommender
from finetune.index_update import add_embedded_items
from finetune.item_index import head_item_vectors
from finetune.item_source import ItemSource
from finetune.model import PAD_ID
from finetune.recommend import read_histories
from finetune.train import Finetuner
from pretrain.export import read_info

NEW_ITEM_TEXT = "Small blue square, left. a little blue box slides to the left"


@pytest.fixture(scope="module")
def run(world, synthetic_shards, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("predicted-prior")
    config = tiny(
        synthetic_shards, output, "train.steps=6", "baselines.id_sasrec=false",
        "baselines.content_knn=false", "model.id_embeddings=true", "model.id_dropout=0.5",
        "model.popularity_prior=true", "model.predicted_prior=true",
    )  # fmt: skip
    trainer = Finetuner(config, world)
    results = trainer.fit()
    export = tmp_path_factory.mktemp("predicted-prior-export") / "model"
    assert vidrec_cli.main(["export", "--checkpoint", str(output), "--out", str(export)]) == 0
    return trainer, results, export


def untrained(trainer: Finetuner) -> torch.Tensor:
    """(N + 1,) bool: the real items without training interactions (cold-start ones too)."""
    warm = trainer.items.warm.clone()
    warm[PAD_ID] = True
    return ~warm


def test_training_never_gives_an_untrained_item_its_id(run):
    trainer, results, _ = run
    module = trainer.engine.module
    never = untrained(trainer)
    assert never.sum() >= 20 and torch.from_numpy(trainer.data.cold_items)[never].any()
    for table in (module.item_tower.id_embeddings, module.head.prior_predictor.id_correction):
        weight = table.weight.detach()
        assert not weight[never].any()  # never in a batch with its ID: no gradient, still zero
        assert weight[trainer.items.warm].abs().amax(dim=-1).gt(0).float().mean() > 0.5
    losses = [entry["loss_prior"] for entry in trainer.history]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert set(results["metrics"]["test"]) == {"hybrid+predpop", "popularity"}


def test_the_export_serves_untrained_items_from_content_and_holds_the_predictor(run):
    trainer, _, export = run
    recommender = load_recommender(export)
    never = untrained(trainer)
    content = ItemSource(trainer.items.warm, cache=trainer.items.cache.to("cpu")).table(
        recommender.model.item_tower, torch.device("cpu"), with_ids=False
    )
    torch.testing.assert_close(recommender.item_embeddings[never], content[never])
    assert (recommender.item_embeddings[~never] - content[~never]).abs().amax() > 1e-4

    info = read_info(export)["components"][HEAD]
    assert info["config"]["predicted_prior"] is True
    tensors = load_file(export / info["file"])
    assert {
        "popularity_prior", "popularity_weight", "prior_predictor.content_head.0.weight",
        "prior_predictor.content_head.2.weight", "prior_predictor.id_correction.weight",
    } <= set(tensors)  # fmt: skip
    head = recommender.model.head
    live_head = trainer.engine.module.head  # its table written by the final evaluation
    torch.testing.assert_close(head.popularity_prior, live_head.popularity_prior.cpu())
    with torch.no_grad():
        predicted = head.prior_predictor.from_content(content)
    # untrained items: what their content predicts, not 0 (the catalogue mean)
    torch.testing.assert_close(head.popularity_prior[never], predicted[never], atol=1e-6, rtol=0)
    assert head.popularity_prior[never].abs().min() > 0
    assert float(head.popularity_weight.abs()) > 1e-4  # the ranking loss moved the weight


def test_recommend_scores_a_new_item_with_the_prior_its_content_predicts(
    run, synthetic_shards, tmp_path, capsys
):
    _, _, export = run
    interactions = synthetic_shards["train"].parent / "synth" / "interactions.csv"
    out = tmp_path / "users.jsonl"
    argv = ["recommend", "--model", str(export), "--item", "brand_new", "--item-text",
            NEW_ITEM_TEXT, "--users-from", str(interactions), "--top-k", "5",
            "--out", str(out)]  # fmt: skip
    assert vidrec_cli.main(argv) == 0
    assert "brand_new" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    recommender = load_recommender(export)
    histories = list(read_histories(interactions, recommender).values())
    states = recommender.user_states(
        [h.items for h in histories], [h.timestamps for h in histories]
    )
    item = recommender.embed_new_item(NEW_ITEM_TEXT)
    head = recommender.model.head
    with torch.no_grad():
        prior = head.prior_predictor.from_content(item)
        shift = head.logit_scale * head.popularity_weight * prior
        plain = head.score_all(states, item[None], torch.tensor([1]), torch.zeros(1))[:, 0]
    assert float(shift.abs()) > 1e-4
    top = (plain + shift).topk(5)
    assert [row["user_id"] for row in rows] == [histories[i].user_id for i in top.indices]
    served = torch.tensor([row["score"] for row in rows])
    torch.testing.assert_close(served, top.values, atol=1e-5, rtol=1e-5)


def test_an_item_added_to_the_index_gets_the_prior_its_content_predicts(run, tmp_path):
    """``vidrec index add``: an added item is scored, in the index and by the re-ranking head,
    with the prior its content predicts, as ``recommend --item`` scores a new item."""
    _, _, export = run
    copy = tmp_path / "model"
    shutil.copytree(export, copy)
    before = load_recommender(copy)
    item = before.embed_new_item(NEW_ITEM_TEXT)  # (D,)
    add_embedded_items(copy, ["brand_new"], item[None])

    after = load_recommender(copy)
    head, row = after.model.head, len(after.item_ids)
    assert after.item_ids[-1] == "brand_new" and len(head.popularity_prior) == row + 1
    with torch.no_grad():
        predicted = head.prior_predictor.from_content(item)
        torch.testing.assert_close(head.popularity_prior[row], predicted, atol=1e-6, rtol=0)
        assert float(predicted.abs()) > 1e-4  # not the mean's 0
        state = torch.randn(1, item.shape[-1])
        served = head.score_pairs(state, item[None], torch.tensor([row]))
        as_new_item = head.score_pairs(state, item[None], torch.tensor([PAD_ID]))
        torch.testing.assert_close(served, as_new_item)
    rows = torch.tensor([row])
    # the index's vector of the row, built while it was added and again after: the same prior
    adding = head_item_vectors(before.model.head, item[None], rows)
    loaded = head_item_vectors(head, after.item_embeddings[rows], rows)
    np.testing.assert_allclose(adding, loaded, atol=1e-6)
    weight = float(head.popularity_weight)
    assert adding[0, -1] == pytest.approx(weight * float(predicted), abs=1e-6)


def test_every_benchmark_variant_configures_the_model_it_reads(synthetic_shards):
    """``launch/bench_ranking.py --variants``: each variant's overrides load on the demo's
    config and train the model whose name it reads from metrics.json."""
    path = CONFIGS.parent / "bench_ranking.py"
    spec = importlib.util.spec_from_file_location("bench_ranking", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    demo_inputs = ["encoder.pretrain_dir=", "encoder.random_init=true"]  # no demo pretraining
    assert {"hybrid+dropout", "content+predpop", "hybrid+dropout+predpop"} <= set(bench.VARIANTS)
    for variant, (name, overrides) in bench.VARIANTS.items():
        config = load_finetune_config(
            CONFIGS / "finetune_small.yaml",
            [*data_overrides(synthetic_shards), *demo_inputs, *overrides],
        )
        model = config.model
        assert (
            report.model_name(model.id_embeddings, model.popularity_prior, model.predicted_prior)
            == name
        ), variant
        assert model.id_dropout == (0.5 if "dropout" in variant else 0.0), variant
