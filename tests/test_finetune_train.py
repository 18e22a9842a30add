"""The finetune engine in-process (a world of one) on the synthetic data: frozen (cached) and
end-to-end encoders both learn, the cache equals live encoding, the report and the MLflow run
hold what they should, and the shipped presets load."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil

import pytest
import torch
import yaml
from conftest import CONFIGS
from mlflow import MlflowClient
from test_pretrain_train import world  # noqa: F401  (the module-wide process group fixture)

from finetune import report
from finetune.batches import NextItemBatcher
from finetune.config import ConfigError, load_finetune_config
from finetune.evaluate import gathered_copy
from finetune.item_content import ClipReading, build_clip_store, locate_clips
from finetune.model import PAD_ID, centred_log_popularity
from finetune.train import Finetuner
from pretrain.config import ModelSettings, from_dict
from pretrain.model import VideoTextModel

PRETRAIN_RUN_ID = "0123456789abcdef0123456789abcdef"


def data_overrides(synthetic_shards) -> list[str]:
    synth = synthetic_shards["train"].parent / "synth"
    return [
        f"data.interactions={synth / 'interactions.csv'}",
        f"data.catalogue={synth / 'items.jsonl'}",
        f"data.cold_items={synth / 'synth.json'}",
        f"data.shards=[{synthetic_shards['train']}, {synthetic_shards['eval']}]",
        # a loaded machine can take over the default 10 s to create the MLflow sqlite schema
        "tracking.start_timeout_s=60",
    ]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A random tiny encoder saved like ``pretrain/export.py``'s output (the weights and the
    ``export_info.json`` naming the pretrain MLflow run), without a pretraining."""
    directory = tmp_path_factory.mktemp("export")
    raw = yaml.safe_load((CONFIGS / "finetune_tiny.yaml").read_text())["encoder"]["random_model"]
    torch.manual_seed(0)
    model = VideoTextModel(from_dict(ModelSettings, raw).build_config())
    model.save_pretrained(directory)
    (directory / "export_info.json").write_text(json.dumps({"mlflow_run_id": PRETRAIN_RUN_ID}))
    return directory


def tiny(synthetic_shards, output_dir, *overrides):
    return load_finetune_config(
        CONFIGS / "finetune_tiny.yaml",
        [*data_overrides(synthetic_shards), f"train.output_dir={output_dir}", *overrides],
    )


def encoder_weights(trainer: Finetuner) -> dict[str, torch.Tensor]:
    encoder = trainer.engine.module.item_tower.encoder
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


@pytest.fixture(scope="module")
def frozen_run(world, synthetic_shards, export_dir, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("frozen")
    config = tiny(
        synthetic_shards,
        output,
        "encoder.random_init=false",
        f"encoder.export_dir={export_dir}",
        "train.steps=30",
    )
    trainer = Finetuner(config, world)
    before = encoder_weights(trainer)
    results = trainer.fit()
    return trainer, results, before, output


def test_frozen_mode_learns_and_leaves_the_encoders_unchanged(frozen_run):
    trainer, results, before, _ = frozen_run
    losses = [entry["loss"] for entry in trainer.history]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    after = encoder_weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainable = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("item_tower.encoder.") for n in trainable)


def test_cached_content_equals_live_encoding(frozen_run, world, synthetic_shards, tmp_path):  # noqa: F811
    trainer, _, _, _ = frozen_run
    config = trainer.config
    video = trainer.engine.module.item_tower.encoder.config.video_config
    sources = locate_clips(trainer.data.catalogue, config.data.shards)
    reading = ClipReading(video.num_frames, video.image_size, 16, 0, world, trainer.tokenizer)
    store = build_clip_store(tmp_path, sources, trainer.num_items, reading)
    ids = torch.arange(1, trainer.num_items + 1)
    clips, clip_mask = store.get(ids)
    texts = trainer.items.texts
    tower = trainer.engine.module.item_tower
    with torch.no_grad():
        live = tower.encode_content(
            clips, clip_mask, texts.input_ids[ids], texts.attention_mask[ids], texts.text_mask[ids]
        )
    cached = trainer.items.cache[ids]
    # every synthetic item has exactly one 1.5 s clip, so the store holds all of its clips
    assert bool(cached.video_mask.all()) and torch.equal(live.video_mask, cached.video_mask)
    assert torch.equal(live.text_mask, cached.text_mask)
    torch.testing.assert_close(live.video, cached.video, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(live.text, cached.text, atol=1e-5, rtol=1e-4)
    assert float(trainer.items.cache.video[PAD_ID].abs().sum()) == 0


def test_content_cache_is_reused_on_rerun(frozen_run, world):  # noqa: F811
    trainer, _, _, output = frozen_run
    stamp = (output / "item_content.safetensors").stat().st_mtime_ns
    again = Finetuner(trainer.config, world)  # the same output dir and encoder
    assert (output / "item_content.safetensors").stat().st_mtime_ns == stamp
    torch.testing.assert_close(again.items.cache.video, trainer.items.cache.video)


def test_a_cache_of_joint_text_is_not_taken_for_pooled_text(frozen_run, world, tmp_path):  # noqa: F811
    """The cache's text field changes meaning with model.item_text: its fingerprint too."""
    trainer, _, _, output = frozen_run
    moved = tmp_path / "moved"
    shutil.copytree(output, moved)
    config = copy.deepcopy(trainer.config)
    config.train.output_dir = config.tracking.output_dir = str(moved)
    config.model.item_text = "pooled"
    stamp = (moved / "item_content.safetensors").stat().st_mtime_ns
    again = Finetuner(config, world)
    assert (moved / "item_content.safetensors").stat().st_mtime_ns != stamp  # recomputed
    text_width = trainer.encoder_config.text_config.hidden_size
    assert again.items.cache.text.shape == (trainer.num_items + 1, text_width)
    torch.testing.assert_close(again.items.cache.video, trainer.items.cache.video)
    # content-kNN still ranks in the pretrained joint space
    joint = trainer.items.cache.joint_embedding()
    projected = again.items.cache.joint_embedding(again.pretrained_text_projection)
    torch.testing.assert_close(projected, joint, atol=1e-5, rtol=1e-4)


def test_id_sasrec_baseline_is_trained_once_and_reused_by_a_rerun(frozen_run, world, tmp_path):  # noqa: F811
    trainer, results, _, output = frozen_run
    moved = tmp_path / "moved"
    shutil.copytree(output, moved)  # where a run is written is not part of the fingerprint
    config = copy.deepcopy(trainer.config)
    config.train.output_dir = config.tracking.output_dir = str(moved)
    saved = moved / "id_sasrec.safetensors"
    stamp = saved.stat().st_mtime_ns
    again = Finetuner(config, world)
    rerun = again.fit()  # resumes at its last step: nothing to train, the report again
    assert saved.stat().st_mtime_ns == stamp
    for split in ("valid", "test"):
        assert rerun["metrics"][split]["ID-SASRec"] == results["metrics"][split]["ID-SASRec"]
    fingerprint = again.id_sasrec_fingerprint()
    again.resolved["train"]["steps"] += 5  # the main training's length: the same baseline
    again.resolved["model"]["id_embeddings"] = True  # a hybrid run: the same baseline
    again.resolved["model"]["popularity_prior"] = True  # the prior is the content model's only
    again.resolved["model"]["item_text"] = "pooled"  # what the item tower reads: not ID-only
    again.resolved["model"]["id_dropout"] = 0.5  # the hybrid's ID dropout: not the baseline's
    again.resolved["model"]["predicted_prior"] = True  # nor the prior's source
    assert again.id_sasrec_fingerprint() == fingerprint
    again.resolved["baselines"]["id_sasrec_steps"] += 1
    assert again.id_sasrec_fingerprint() != fingerprint


def test_without_a_catalogue_items_are_known_by_id_and_cold_items_may_be_a_list(
    world,  # noqa: F811
    synthetic_shards,
    tmp_path,
):
    synth = synthetic_shards["train"].parent / "synth"
    cold = json.loads((synth / "synth.json").read_text())["cold_start_items"]
    config = tiny(
        synthetic_shards,
        tmp_path / "out",
        "data.catalogue=",
        f"data.cold_items=[{', '.join(cold)}]",
        "train.steps=3",
        "baselines.id_sasrec=false",
    )
    trainer = Finetuner(config, world)
    with open(synth / "interactions.csv", newline="") as handle:
        named = {row["item_id"] for row in csv.DictReader(handle)}
    catalogue = trainer.data.catalogue
    assert set(catalogue.item_ids) == named and trainer.num_items == len(named)
    assert not catalogue.has_text().any()
    assert trainer.data.report.cold_items == len(set(cold) & named) > 0
    # clips found in the shards by the item_id of their JSON member, text for none
    cache = trainer.items.cache
    assert cache.video_mask[1:].sum() > 0 and not cache.text_mask.any()
    results = trainer.fit()
    assert math.isfinite(results["last_loss"]) and "content" in results["metrics"]["test"]


def test_row_weights_follow_the_weight_column_into_the_loss(frozen_run, world):  # noqa: F811
    trainer, _, _, _ = frozen_run
    config = copy.deepcopy(trainer.config.loss)
    config.row_weights = True
    batcher = NextItemBatcher(trainer.data, config, trainer.config.data.max_history_length)
    users = batcher.trainable_users()[:8]
    batch = batcher.batch(users, trainer.items, torch.Generator().manual_seed(0),
                          world.device, torch.zeros(0, dtype=torch.long))  # fmt: skip
    data, width = trainer.data, trainer.config.data.max_history_length + 1
    weight_of_row = dict(zip(data.row.tolist(), data.weight.tolist(), strict=True))
    sequences = batcher.sequences
    for slot, user in enumerate(users):
        rows = sequences.rows[sequences.offsets[user] : sequences.offsets[user + 1]][-width:]
        expected = [weight_of_row[row] for row in rows.tolist()]
        assert batch.weights[slot, : len(expected)].tolist() == pytest.approx(expected)
        assert not batch.weights[slot, len(expected) :].any()
    assert len(set(data.weight.tolist())) > 1  # the synthetic log has varied watch ratios
    module = trainer.engine.module
    with torch.no_grad():
        weighted = module(batch)["loss"]
        batch.weights = None
        plain = module(batch)["loss"]
    assert torch.isfinite(weighted) and not torch.isclose(weighted, plain)


MODELS = ("content", "ID-SASRec", "popularity", "content-kNN")
"""What the report calls the content model and the baselines, in its order."""


def test_metrics_json_compares_models_on_warm_and_cold_targets(frozen_run):
    _, results, _, output = frozen_run
    saved = json.loads((output / "metrics.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(results["metrics"]))
    for split in ("valid", "test"):
        assert tuple(saved["metrics"][split]) == MODELS
        for model in MODELS:
            for group in ("all", "warm", "cold"):
                values = saved["metrics"][split][model][group]
                assert {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr", "count"} <= set(values)
    test = saved["metrics"]["test"]
    assert test["content"]["cold"]["count"] > 0 and test["content"]["warm"]["count"] > 0
    assert test["popularity"]["cold"]["hr@10"] == 0  # cold items have no training count
    assert (output / "comparison.png").stat().st_size > 1000
    assert saved["pretrain_run_id"] == PRETRAIN_RUN_ID
    rows = report.table(test).splitlines()[2:]
    assert list(dict.fromkeys(row.split()[0] for row in rows)) == list(MODELS)


def test_mlflow_run_records_params_metrics_artifacts_and_pretrain_run(frozen_run):
    _, results, _, output = frozen_run
    client = MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    experiment = client.get_experiment_by_name("vidrec-finetune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == results["mlflow_run_id"]
    params = run.data.params
    assert params["encoder.pretrain_run_id"] == PRETRAIN_RUN_ID
    assert params["encoder.mode"] == "frozen" and params["train.steps"] == "30"
    assert run.data.tags["vidrec.pretrain_run_id"] == PRETRAIN_RUN_ID
    metrics = run.data.metrics
    assert {"loss", "test/content/cold/hr_at_10", "test/ID-SASRec/warm/ndcg_at_10"} <= set(metrics)
    assert {"test/popularity/all/mrr", "test/content-kNN/cold/ndcg_at_10"} <= set(metrics)
    assert "valid/content/warm/hr_at_10" in metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id, "metrics")}
    assert {"metrics/metrics.json", "metrics/comparison.png"} <= names
    assert "config/config.yaml" in {
        a.path for a in client.list_artifacts(run.info.run_id, "config")
    }


def test_end_to_end_mode_learns_and_trains_the_top_blocks(world, synthetic_shards, tmp_path):  # noqa: F811
    config = tiny(
        synthetic_shards, tmp_path / "e2e", "encoder.mode=top_k", "encoder.top_k=1",
        "train.steps=12", "baselines.id_sasrec=false", "baselines.popularity=false",
        "loss.bce_weight=0.5",
    )  # fmt: skip
    trainer = Finetuner(config, world)
    assert trainer.items.cache is None and (tmp_path / "e2e" / "item_clips.npy").is_file()
    before = encoder_weights(trainer)
    results = trainer.fit()
    losses = [entry["loss"] for entry in trainer.history]
    assert all(math.isfinite(x) for x in losses) and "loss_bce" in trainer.history[0]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    after = encoder_weights(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    top_video = "video_model.encoder.layer.1."
    assert any(k.startswith(top_video) for k in changed)
    assert not any(k.startswith("video_model.encoder.layer.0.") for k in changed)
    # content-kNN reads the pretrained content, cached before the encoders train
    assert set(results["metrics"]["test"]) == {"content", "content-kNN"}
    assert (tmp_path / "e2e" / "item_content.safetensors").is_file()


def test_shipped_configs_load_and_errors_name_the_field(synthetic_shards, tmp_path):
    overrides = data_overrides(synthetic_shards)
    for name in ("finetune_tiny.yaml", "finetune_small.yaml"):
        extra = []
        if name == "finetune_small.yaml":  # the demo's pretrain output is not there in tests
            extra = ["encoder.pretrain_dir=", "encoder.random_init=true"]
        config = load_finetune_config(CONFIGS / name, [*overrides, *extra])
        assert config.tracking.experiment == "vidrec-finetune"
    with pytest.raises(ConfigError, match="encoder.mode"):
        load_finetune_config(CONFIGS / "finetune_tiny.yaml", [*overrides, "encoder.mode=half"])
    with pytest.raises(ConfigError, match="encoder"):
        load_finetune_config(
            CONFIGS / "finetune_tiny.yaml", [*overrides, f"encoder.export_dir={tmp_path}"]
        )
    with pytest.raises(ConfigError, match="data.shards"):
        load_finetune_config(
            CONFIGS / "finetune_tiny.yaml", [*overrides, f"data.shards=[{tmp_path / 'none'}]"]
        )


def test_acceptance_on_the_synthetic_test_split(frozen_run):
    """The acceptance check, on the tiny fixture (20 users, 9 cold-start test targets, random
    encoders): deterministic here, but a small sample; the demo preset (400 users, pretrained
    encoders) is where the figures mean something (see the report)."""
    _, results, _, _ = frozen_run
    test = results["metrics"]["test"]
    content, ids, popularity = test["content"], test["ID-SASRec"], test["popularity"]
    assert content["warm"]["ndcg@10"] >= ids["warm"]["ndcg@10"]
    assert content["cold"]["hr@10"] >= 3 * ids["cold"]["hr@10"]
    assert content["cold"]["hr@10"] > popularity["cold"]["hr@10"]


@pytest.mark.parametrize("mode", ["frozen", "top_k"])
def test_zero3_trains_and_evaluates_like_zero2(world, synthetic_shards, tmp_path, mode):  # noqa: F811
    """ZeRO-3 keeps weights partitioned outside the engine's forward: the whole loss runs
    inside it, and evaluation gathers the weights. Same seed, same data: the same losses and
    metrics as ZeRO-2, for the content model (with a mid-run evaluation, the BCE term and the
    popularity prior, whose weight is partitioned like the logit scale) and the ID-SASRec
    baseline."""
    runs, prior_weights = {}, {}
    partitioned = {"head.log_logit_scale", "head.popularity_weight", "item_tower.projection.weight"}
    for stage in (2, 3):
        config = tiny(
            synthetic_shards, tmp_path / f"zero{stage}", f"parallel.zero_stage={stage}",
            f"encoder.mode={mode}", "train.steps=4", "train.eval_every=2",
            "baselines.id_sasrec_steps=3", "baselines.popularity=false", "loss.bce_weight=0.5",
            "model.popularity_prior=true",
        )  # fmt: skip
        trainer = Finetuner(config, world)
        runs[stage] = trainer, trainer.fit()
        # the weights really are partitioned outside the forward (what crashed before)
        module = trainer.engine.module
        empty = {name for name, weight in module.named_parameters() if weight.numel() == 0}
        assert (stage == 3) == (partitioned <= empty)
        # what evaluation scores with: the trained weight, the prior of the training counts
        replica = gathered_copy(module, trainer.spec, trainer.encoder_config)
        prior_weights[stage] = replica.head.popularity_weight.detach().clone()
        counts = torch.from_numpy(trainer.batcher.popularity)
        assert torch.equal(replica.head.popularity_prior, centred_log_popularity(counts))
    (trainer2, results2), (trainer3, results3) = runs[2], runs[3]
    for key in ("loss", "loss_softmax", "loss_bce"):
        torch.testing.assert_close(
            [entry[key] for entry in trainer3.history], [entry[key] for entry in trainer2.history],
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
    assert trainer3.history[0]["loss_bce"] > 0
    assert float(prior_weights[2].abs()) > 1e-4  # trained
    torch.testing.assert_close(prior_weights[3], prior_weights[2], rtol=1e-4, atol=1e-6)
    assert "test/content_pop/warm/ndcg_at_10" in report.mlflow_metrics(results3["metrics"])
    for model in ("content+pop", "ID-SASRec"):
        for group in ("warm", "cold"):
            for metric in ("ndcg@10", "mrr"):
                assert results3["metrics"]["test"][model][group][metric] == pytest.approx(
                    results2["metrics"]["test"][model][group][metric], abs=1e-4
                )


def test_a_checkpoint_of_other_data_or_encoders_is_refused_naming_the_field():
    """Finetuning refuses, beside what pretraining refuses, a checkpoint whose data or
    encoder settings differ: its content cache, item table and sampler position would not fit."""
    from pretrain import checkpoint
    from pretrain.distributed import World

    fields = (*checkpoint.INCOMPATIBLE_FIELDS, "encoder", "data")
    current = {
        "model": {"dim": 32},
        "parallel": {"zero_stage": 0, "precision": "fp32"},
        "encoder": {"export_dir": "enc", "mode": "frozen"},
        "data": {"interactions": "b.csv"},
    }
    saved = {"config": json.loads(json.dumps(current)), "world_size": 1}
    one_rank = World(0, 1, 0, torch.device("cpu"))
    checkpoint.check_compatible(saved, current, one_rank, fields)  # identical: accepted
    saved["config"]["data"]["interactions"] = "a.csv"
    saved["config"]["encoder"]["mode"] = "full"
    with pytest.raises(RuntimeError) as refused:
        checkpoint.check_compatible(saved, current, one_rank, fields)
    assert "data.interactions: checkpoint has 'a.csv'" in str(refused.value)
    assert "encoder.mode: checkpoint has 'full'" in str(refused.value)
