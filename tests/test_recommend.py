"""The finetuned recommender's hand-off and serving: a tiny finetune run (in-process, a world of
one) → ``vidrec export`` → a fresh process without DeepSpeed gives the live model's item
embeddings and scores, its popularity prior included; ``vidrec recommend`` for users and for a
new item; damaged exports are refused naming the component. Serving at catalogue scale on the
same run: the export's item index, ``vidrec index add`` (killed and rerun) / ``remove``,
explanations, and the registered recommendation model answering over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_finetune_train import export_dir, tiny  # noqa: F401  (export_dir is a fixture)
from test_pretrain_train import world  # noqa: F401  (the module-wide process group fixture)

import vidrec_cli
from finetune.catalogue import clip_keys_from_shards
from finetune.export import INDEX_FILE, ITEMS, USER_TOWER, build_recommender, load_recommender
from finetune.index_update import embed_items, read_new_items
from finetune.item_index import head_query_vectors
from finetune.model import PAD_ID
from finetune.recommend import (
    UserHistory,
    read_histories,
    recommend_items,
    recommend_users,
)
from finetune.serving import resolve_histories
from finetune.train import Finetuner
from pretrain.export import ExportError, read_info
from pretrain.pyfunc import load_clip

NEW_ITEM_TEXT = "Large red circle, up. a big red disc drifts upwards"


class Live:
    """A finished tiny run, and what its live engine says about the test histories."""

    def __init__(self, trainer: Finetuner, export: Path):
        self.trainer, self.export = trainer, export
        self.output_dir = trainer.output_dir
        module = trainer.engine.module
        module.eval()
        eval_set = trainer.data.eval_set("test")
        self.items = trainer.items.table(module.item_tower, trainer.world.device)  # (N + 1, D)
        self.states = trainer.evaluation.user_states(module, self.items, eval_set)  # (U, D)
        rows = torch.arange(len(self.items))
        self.scores = module.head.score_all(self.states, self.items, rows)  # (U, N + 1)
        ids, histories = trainer.data.catalogue.item_ids, eval_set.histories
        self.histories = []
        for user in range(len(eval_set.users)):
            start, stop = histories.offsets[user], histories.offsets[user + 1]
            self.histories.append(
                {
                    "user_id": trainer.data.user_ids[eval_set.users[user]],
                    "items": [ids[i - 1] for i in histories.items[start:stop]],
                    "timestamps": trainer.batcher.times_by_row[histories.rows[start:stop]].tolist(),
                }
            )


@pytest.fixture(scope="module")
def live(world, synthetic_shards, export_dir, tmp_path_factory):  # noqa: F811
    """Frozen encoders from an export dir, the hybrid (content + ID) item tower reading pooled
    text through its own projection, with the popularity prior, 4 steps."""
    output = tmp_path_factory.mktemp("finetune")
    config = tiny(
        synthetic_shards, output, "encoder.random_init=false", f"encoder.export_dir={export_dir}",
        "train.steps=4", "baselines.id_sasrec=false", "model.id_embeddings=true",
        "model.item_text=pooled",
        "model.popularity_prior=true",
    )  # fmt: skip
    trainer = Finetuner(config, world)
    trainer.fit()
    export = tmp_path_factory.mktemp("recommender") / "model"
    # through the CLI: `vidrec export` must recognise the finetune checkpoint by itself
    assert vidrec_cli.main(["export", "--checkpoint", str(output), "--out", str(export)]) == 0
    return Live(trainer, export)


def histories_of(recommender, live: Live) -> list[UserHistory]:
    return [
        UserHistory(h["user_id"], recommender.rows(h["items"]), h["timestamps"])
        for h in live.histories
    ]


SUBPROCESS_CHECK = """
import json, sys
from safetensors.torch import save_file
from finetune.export import load_recommender

export, histories_file, out = sys.argv[1:]
recommender = load_recommender(export)
histories = json.loads(open(histories_file).read())
states = recommender.user_states(
    [recommender.rows(h["items"]) for h in histories], [h["timestamps"] for h in histories]
)
save_file({"items": recommender.item_embeddings, "states": states,
           "scores": recommender.score_items(states)}, out)
assert "deepspeed" not in sys.modules, "loading a recommender export imported deepspeed"
print("loaded without deepspeed")
"""


def test_export_in_a_fresh_process_gives_the_live_embeddings_and_scores(live, tmp_path):
    histories_file, out = tmp_path / "histories.json", tmp_path / "out.safetensors"
    histories_file.write_text(json.dumps(live.histories))
    script = tmp_path / "check.py"
    script.write_text(SUBPROCESS_CHECK)
    root = Path(__file__).resolve().parent.parent  # this checkout, not the installed one
    result = subprocess.run(
        [sys.executable, str(script), str(live.export), str(histories_file), str(out)],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
             "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert result.returncode == 0 and "without deepspeed" in result.stdout, result.stderr[-3000:]
    served = load_file(str(out))
    torch.testing.assert_close(served["items"], live.items, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served["states"], live.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served["scores"], live.scores, atol=1e-5, rtol=1e-5)


def test_export_records_catalogue_cold_items_config_and_metrics(live):
    recommender = load_recommender(live.export)
    data = live.trainer.data
    assert recommender.item_ids == data.catalogue.item_ids
    assert torch.equal(recommender.cold, torch.from_numpy(data.cold_items))
    assert 0 < int(recommender.cold.sum()) < recommender.num_items
    assert recommender.finetune["config"]["model"]["id_embeddings"] is True
    assert recommender.model.item_tower.text_projection is not None  # pooled text, trained
    trained = live.trainer.engine.module.item_tower.text_projection.weight.cpu()
    torch.testing.assert_close(recommender.model.item_tower.text_projection.weight, trained)
    pretrained = recommender.model.item_tower.encoder.text_projection.weight
    assert not torch.equal(trained, pretrained)
    saved = json.loads((live.output_dir / "metrics.json").read_text())
    assert recommender.finetune["metrics"] == saved
    card = (live.export / "README.md").read_text()
    assert set(saved["metrics"]["test"]) == {"hybrid+pop", "popularity", "content-kNN"}
    assert "test/hybrid+pop/cold/hr@10" in card and "components/user_tower.safetensors" in card
    assert "## Evaluation (recommendation: leave-one-out test split" in card
    assert "held-out text-video retrieval" not in card
    assert "metrics:\n- hit_rate\n- ndcg\n- mrr" in card.split("\n---\n")[0]
    assert str(live.output_dir) not in card and str(live.export.parent) not in card
    assert not list(live.export.rglob("*.pt")) and not list(live.export.rglob("*.bin"))


def test_the_trained_popularity_prior_is_exported_and_served(live):
    """The head of the live run holds the prior of its training counts and a weight that
    training moved off 0; the export holds both, and its scores are the plain scores plus
    w · prior of each item."""
    head = live.trainer.engine.module.head
    counts = torch.from_numpy(live.trainer.batcher.popularity)
    warm = counts > 0
    log_counts = torch.log1p(counts.double())
    by_hand = torch.where(warm, log_counts - log_counts[warm].mean(), 0.0).float()
    torch.testing.assert_close(head.popularity_prior, by_hand, atol=1e-6, rtol=0)
    assert head.popularity_prior[PAD_ID] == 0 and not head.popularity_prior[~warm].any()
    cold = torch.from_numpy(live.trainer.data.cold_items)
    assert cold.any() and not head.popularity_prior[cold].any()
    weight = float(head.popularity_weight.detach())
    assert abs(weight) > 1e-4, weight  # 4 steps of training moved it

    recommender = load_recommender(live.export)
    served = recommender.model.head
    assert torch.equal(served.popularity_prior, head.popularity_prior.cpu())
    assert float(served.popularity_weight) == weight
    states = recommender.user_states(
        [recommender.rows(h["items"]) for h in live.histories],
        [h["timestamps"] for h in live.histories],
    )
    scores = recommender.score_items(states)
    with torch.no_grad():
        served.popularity_weight.zero_()
    plain = recommender.score_items(states)
    shift = (scores - plain)[:, warm]  # (U, warm items)
    scale = float(served.logit_scale)
    expected = (scale * weight * head.popularity_prior.cpu()[warm]).expand_as(shift)
    torch.testing.assert_close(shift, expected, atol=1e-5, rtol=0)
    assert torch.equal(scores[:, ~warm], plain[:, ~warm])


def test_an_output_dir_serves_the_same_recommender(live):
    exported, built = load_recommender(live.export), build_recommender(live.output_dir)
    torch.testing.assert_close(built.item_embeddings, exported.item_embeddings)
    histories = histories_of(built, live)[:3]
    assert recommend_items(built, histories, 5) == recommend_items(exported, histories, 5)


def test_a_zero0_run_with_trained_encoder_blocks_exports_its_live_item_table(
    world,  # noqa: F811
    synthetic_shards,
    tmp_path,
):
    """ZeRO-0 keeps module weights rather than fp32 partitions; top_k mode embeds items from
    the clip store rather than the content cache: the export must follow both. (A ZeRO-3
    export is checked by tests/test_finetune_distributed.py, from a 2-rank run.)"""
    config = tiny(
        synthetic_shards, tmp_path / "run", "parallel.zero_stage=0", "encoder.mode=top_k",
        "train.steps=3", "baselines.id_sasrec=false", "baselines.popularity=false",
        "model.item_text=pooled",
    )  # fmt: skip
    trainer = Finetuner(config, world)
    trainer.fit()
    module = trainer.engine.module
    module.eval()
    built = build_recommender(trainer.output_dir)
    torch.testing.assert_close(
        built.item_embeddings,
        trainer.items.table(module.item_tower, trainer.world.device),
        atol=1e-5,
        rtol=1e-5,
    )


def test_recommendations_exclude_seen_items_and_are_the_top_k_by_score(live):
    recommender = load_recommender(live.export)
    histories = histories_of(recommender, live)
    rows = recommend_items(recommender, histories, k=7)
    for user, history in enumerate(histories):
        mine = [row for row in rows if row.user_id == history.user_id]
        assert [row.rank for row in mine] == list(range(1, 8))
        scores = [row.score for row in mine]
        assert scores == sorted(scores, reverse=True)
        chosen = recommender.rows([row.item_id for row in mine])
        assert not set(chosen) & set(history.items)
        expected = live.scores[user].clone()
        expected[[0, *history.items]] = -torch.inf
        assert chosen == expected.topk(7).indices.tolist()
        assert [row.cold_start for row in mine] == [bool(recommender.cold[i]) for i in chosen]
    seen = recommend_items(recommender, histories[:1], k=3, exclude_seen=False)
    assert [r.item_id for r in seen] == [
        recommender.item_ids[i - 1] for i in live.scores[0, 1:].topk(3).indices.add(1).tolist()
    ]


def test_users_for_a_new_item_are_sorted_and_equal_a_manual_computation(live, synthetic_shards):
    recommender = load_recommender(live.export)
    histories = histories_of(recommender, live)
    synth = synthetic_shards["train"].parent / "synth"
    prep = recommender.preprocessing
    clip = load_clip(synth / "videos" / "item_00003.mp4", prep.num_frames, prep.image_size)
    rows = recommend_users(recommender, histories, "new_item", k=5, text=NEW_ITEM_TEXT,
                           clips=[clip])  # fmt: skip
    assert [row.rank for row in rows] == [1, 2, 3, 4, 5] and all(r.cold_start for r in rows)
    assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)

    # by hand, with the live model: its item tower on the same content, the head on its states
    module = live.trainer.engine.module
    tokens = live.trainer.tokenizer(
        [NEW_ITEM_TEXT], padding="max_length", truncation=True,
        max_length=live.trainer.config.data.max_text_length, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        item = module.item_tower(
            clip[None, None], torch.ones(1, 1, dtype=torch.bool), tokens["input_ids"],
            tokens["attention_mask"], item_ids=torch.zeros(1, dtype=torch.long),
            id_mask=torch.zeros(1, dtype=torch.bool),
        )  # fmt: skip
        # a new item has no training count: the prior of PAD_ID, 0
        expected = module.head.score_all(live.states, item, torch.tensor([PAD_ID]))[:, 0]
    top = expected.topk(5)
    assert [r.user_id for r in rows] == [histories[i].user_id for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([r.score for r in rows]), top.values, atol=1e-5,
                               rtol=1e-5)  # fmt: skip

    # a catalogue item: its table row, and its past audience is left out
    item_id = recommender.item_ids[histories[0].items[0] - 1]
    audience = recommend_users(recommender, histories, item_id, k=len(histories))
    assert histories[0].user_id not in {row.user_id for row in audience}
    user_index = {history.user_id: index for index, history in enumerate(histories)}
    column = live.scores[[user_index[row.user_id] for row in audience], histories[0].items[0]]
    served = torch.tensor([row.score for row in audience])
    torch.testing.assert_close(served, column, atol=1e-5, rtol=1e-5)  # its prior included
    with pytest.raises(KeyError, match="unknown item id 'nope'"):
        recommend_users(recommender, histories, "nope", k=3)


def copy_of(export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    return copy


def test_a_missing_component_is_named(live, tmp_path):
    copy = copy_of(live.export, tmp_path)
    (copy / "components" / f"{USER_TOWER}.safetensors").unlink()
    with pytest.raises(ExportError, match="user_tower"):
        load_recommender(copy)
    info = read_info(copy)
    del info["components"][USER_TOWER]
    (copy / "export_info.json").write_text(json.dumps(info))
    with pytest.raises(ExportError, match="component\\(s\\) user_tower missing"):
        load_recommender(copy)


def test_a_mismatched_shape_is_named(live, tmp_path):
    copy = copy_of(live.export, tmp_path)
    path = copy / "components" / f"{ITEMS}.safetensors"
    tensors = load_file(str(path))
    tensors["item_embeddings"] = tensors["item_embeddings"][:-1]  # one item short
    save_file(tensors, str(path))
    info = read_info(copy)  # a consistent but wrong export: the info agrees with the file
    entry = info["components"][ITEMS]
    entry["shapes"]["item_embeddings"] = list(tensors["item_embeddings"].shape)
    entry["sha256"] = None
    (copy / "export_info.json").write_text(json.dumps(info))
    with pytest.raises(ExportError, match="item_embeddings has shape .* expected"):
        load_recommender(copy)


def test_cli_prints_a_table_and_writes_jsonl(live, synthetic_shards, tmp_path, capsys):
    interactions = synthetic_shards["train"].parent / "synth" / "interactions.csv"
    users = [h["user_id"] for h in live.histories[:2]]
    out = tmp_path / "recs.jsonl"
    argv = ["recommend", "--model", str(live.export), "--interactions", str(interactions),
            "--users", ",".join(users), "--top-k", "4", "--out", str(out)]  # fmt: skip
    assert vidrec_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["user_id", "rank", "item_id", "score", "cold_start"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and {r["user_id"] for r in rows} == set(users)
    assert all(f"{r['item_id']}" in printed for r in rows)
    # the file's histories are every engaged row, so seen items are excluded from those
    recommender = load_recommender(live.export)
    seen = read_histories(interactions, recommender)[users[0]].items
    assert not set(
        recommender.rows([r["item_id"] for r in rows if r["user_id"] == users[0]])
    ) & set(seen)

    csv_out = tmp_path / "users.csv"
    argv = ["recommend", "--model", str(live.export), "--item", "brand_new",
            "--item-text", NEW_ITEM_TEXT, "--users-from", str(interactions), "--top-k", "3",
            "--out", str(csv_out)]  # fmt: skip
    assert vidrec_cli.main(argv) == 0
    assert "brand_new" in capsys.readouterr().out
    assert len(csv_out.read_text().splitlines()) == 4  # header + 3 users

    argv = ["recommend", "--model", str(live.export), "--interactions", str(interactions),
            "--users", f"{users[0]},ghost_user"]  # fmt: skip
    assert vidrec_cli.main(argv) == 2
    assert "ghost_user" in capsys.readouterr().err
    # an unknown id in a history is skipped and reported, not fatal
    argv = ["recommend", "--model", str(live.export), "--history", "item_00003,not_an_item"]
    assert vidrec_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "1 history entries name 1 item id(s) not in the catalogue (e.g. not_an_item)" in (
        captured.err
    )
    assert len(captured.out.splitlines()) == 2 + 10  # header, rule, the default top 10


# ============================================================================= the item index

ROOT = Path(__file__).resolve().parent.parent  # this checkout, not the installed one
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                  "HOME": str(Path.home()), "PYTHONPATH": str(ROOT)}  # fmt: skip


def expected_top(live: Live, user: int, seen: list[int], k: int) -> list[int]:
    scores = live.scores[user].clone()
    scores[[0, *seen]] = -torch.inf
    return scores.topk(k).indices.tolist()


def test_the_export_holds_an_exact_index_of_its_catalogue_and_refuses_a_tampered_one(
    live, tmp_path, capsys
):
    entry = read_info(live.export)["item_index"]
    assert (entry["file"], entry["factory"], entry["metric"]) == (
        INDEX_FILE,
        "Flat",
        "inner_product",
    )
    recommender = load_recommender(live.export)
    assert entry["size"] == recommender.index.size == recommender.num_items
    # the index's inner products are the head's logits over its logit scale, prior included
    head = recommender.model.head
    scores, rows = recommender.index.search(head_query_vectors(head, live.states), 5)
    assert rows.tolist() == live.scores[:, 1:].topk(5).indices.add(1).tolist()
    served = torch.from_numpy(scores) * float(head.logit_scale)
    torch.testing.assert_close(served, live.scores.gather(1, torch.from_numpy(rows)), atol=1e-4,
                               rtol=0)  # fmt: skip

    copy = copy_of(live.export, tmp_path)
    data = bytearray((copy / INDEX_FILE).read_bytes())
    data[-5] ^= 0xFF
    (copy / INDEX_FILE).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{INDEX_FILE}: content differs from the export"):
        load_recommender(copy)
    assert vidrec_cli.main(["recommend", "--model", str(copy), "--history", "item_00003"]) == 2
    assert f"{copy / INDEX_FILE}: content differs" in capsys.readouterr().err


def test_an_approximate_index_proposes_candidates_the_full_head_re_ranks(live, tmp_path):
    out = tmp_path / "ivf"
    argv = ["export", "--checkpoint", str(live.output_dir), "--out", str(out),
            "--index-exact-below", "1", "--index-factory", "IVF4,Flat", "--index-nprobe", "4",
            "--index-candidates", "20"]  # fmt: skip
    assert vidrec_cli.main(argv) == 0
    recommender = load_recommender(out)
    assert recommender.index.factory == "IVF4,Flat" and not recommender.index.exact
    assert read_info(out)["item_index"]["settings"]["candidates"] == 20
    histories = histories_of(recommender, live)
    rows = recommend_items(recommender, histories, k=7)
    for user, history in enumerate(histories):  # every list probed: the exact top 7
        mine = [row for row in rows if row.user_id == history.user_id]
        chosen = recommender.rows([row.item_id for row in mine])
        assert chosen == expected_top(live, user, history.items, 7)
        expected = live.scores[user, chosen]
        torch.testing.assert_close(torch.tensor([r.score for r in mine]), expected, atol=1e-5,
                                   rtol=0)  # fmt: skip


def near_duplicates(live: Live, synthetic_shards, tmp_path: Path) -> tuple[Path, str]:
    """Four re-uploads of one cold-start video (its clip, title and tags) under other ids and
    other descriptions (not a text field): three for a user's history, the fourth the new
    video."""
    catalogue = live.trainer.data.catalogue
    row = int(torch.nonzero(torch.from_numpy(live.trainer.data.cold_items)).flatten()[0])
    fields = catalogue.texts[row - 1]  # title, tags
    synth = synthetic_shards["train"].parent / "synth"
    video = str(synth / "videos" / f"{catalogue.item_ids[row - 1]}.mp4")
    records = [
        {"item_id": f"reupload_{n}", **fields, "description": suffix, "video": video}
        for n, suffix in enumerate(["original", "HD", "full version", "new upload"])
    ]
    path = tmp_path / "new_items.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path, "reupload_3"


def content_transparent(recommender):
    """A user tower that passes content through (attention and feed-forward outputs zeroed,
    no final norm: a state is the last item plus its position and time embeddings) and a head
    without the popularity prior: what a model that learned "more like what you watched"
    does. The 4-step tiny model has not learned that (its random encoders make every item look
    alike, so popularity decides: it ranked the new video 54th of 129 even at 40 steps), and
    the path from ``index add`` to a recommendation is what is under test here."""
    tower = recommender.model.user_tower
    with torch.no_grad():
        for layer in tower.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.linear2):
                linear.weight.zero_()
                linear.bias.zero_()
        recommender.model.head.popularity_weight.zero_()
    tower.encoder.norm = torch.nn.Identity()
    return recommender


def test_an_added_video_is_recommended_to_the_user_of_its_near_duplicates(
    live, synthetic_shards, tmp_path, capsys
):
    copy = copy_of(live.export, tmp_path)
    items, new_id = near_duplicates(live, synthetic_shards, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "a", "title": "t"}\n{"item_id": "b", "video": "gone.mp4"}\n')
    assert vidrec_cli.main(["index", "add", "--model", str(copy), "--items", str(bad)]) == 2
    assert f"{bad}: row 1, video: {tmp_path / 'gone.mp4'} does not exist" in capsys.readouterr().err
    argv = ["index", "add", "--model", str(copy), "--items", str(items)]  # the export's fields
    assert vidrec_cli.main(argv) == 0
    assert "added 4 items" in capsys.readouterr().out
    recommender = content_transparent(load_recommender(copy))
    assert recommender.num_items == live.trainer.data.num_items + 4
    assert recommender.index.size == recommender.num_items
    row = recommender.item_index[new_id]
    assert recommender.cold[row] and not recommender.warm[row]
    assert float(recommender.model.head.popularity_prior[row]) == 0.0  # a new item: the mean
    history = resolve_histories(recommender, [("fan", ["reupload_0", "reupload_1", "reupload_2"],
                                               None)]).histories  # fmt: skip
    top = [r.item_id for r in recommend_items(recommender, history, k=5)]
    assert new_id in top, top
    assert not {"reupload_0", "reupload_1", "reupload_2"} & set(top)  # seen: excluded


KILL_SCRIPT = """
import os, signal, sys
import finetune.index_update as update
import vidrec_cli

point, export, items = sys.argv[1:]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if point == "embedding":  # during the second chunk: the first one is staged
    embed, calls = update.embed_items, []
    def embed_items(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            die()
        return embed(*args, **kwargs)
    update.embed_items = embed_items
else:  # every new file written, export_info.json not yet replaced
    write = update.atomic_write_text
    def atomic_write_text(path, text):
        if str(path).endswith("export_info.json"):
            die()
        write(path, text)
    update.atomic_write_text = atomic_write_text
vidrec_cli.main(["index", "add", "--model", export, "--items", items, "--batch-size", "1"])
"""


def test_index_add_killed_by_sigkill_leaves_the_export_loadable_and_a_rerun_completes(
    live, synthetic_shards, tmp_path, capsys
):
    copy = copy_of(live.export, tmp_path)
    items, _ = near_duplicates(live, synthetic_shards, tmp_path)
    before = load_recommender(copy)
    info_before = (copy / "export_info.json").read_bytes()
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    for point in ("embedding", "commit"):
        result = subprocess.run(
            [sys.executable, str(script), point, str(copy), str(items)], cwd=ROOT,
            capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
        )  # fmt: skip
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        assert (copy / "export_info.json").read_bytes() == info_before
        loaded = load_recommender(copy)  # as it was
        assert loaded.item_ids == before.item_ids
        assert torch.equal(loaded.item_embeddings, before.item_embeddings)
    assert (copy / "catalogue-g1.json").is_file()  # the killed commit's files, unreferenced
    assert len(list(copy.glob(".index-add-*/chunk-*.safetensors"))) == 4

    argv = ["index", "add", "--model", str(copy), "--items", str(items)]
    assert vidrec_cli.main(argv + ["--batch-size", "1"]) == 0
    printed = capsys.readouterr().out
    assert "reused 4 embedding chunks" in printed and "added 4 items" in printed
    after = load_recommender(copy)
    new_ids = [f"reupload_{n}" for n in range(4)]
    assert after.item_ids == before.item_ids + new_ids
    direct = embed_items(before, read_new_items(items, ["title", "tags"]))  # uninterrupted
    torch.testing.assert_close(after.item_embeddings[-4:], direct, atol=1e-5, rtol=0)
    assert torch.equal(after.item_embeddings[:-4], before.item_embeddings)
    leftovers = {p.name for p in copy.iterdir() if p.name.startswith((".index-add", "catalogue"))}
    assert leftovers == {"catalogue-g1.json"}  # the old generation and the staging are gone
    assert not list(copy.rglob("*.tmp"))
    assert vidrec_cli.main(argv) == 0  # once more: nothing to do
    assert "4 items already in the catalogue, skipped" in capsys.readouterr().out
    assert read_info(copy)["item_index"]["generation"] == 1


def test_index_remove_stops_recommending_an_item_that_histories_still_read(live, tmp_path, capsys):
    copy = copy_of(live.export, tmp_path)
    recommender = load_recommender(copy)
    histories = histories_of(recommender, live)
    best = recommend_items(recommender, histories[:1], k=1)[0].item_id
    argv = ["index", "remove", "--model", str(copy), "--items"]
    assert vidrec_cli.main([*argv, f"{best},ghost_item"]) == 2
    assert "ghost_item" in capsys.readouterr().err
    assert vidrec_cli.main([*argv, best]) == 0
    after = load_recommender(copy)
    assert after.removed[after.item_index[best]] and int(after.removed.sum()) == 1
    assert after.index.size == recommender.index.size - 1
    rows = recommend_items(after, histories_of(after, live), k=10)
    assert best not in {row.item_id for row in rows}
    assert not resolve_histories(after, [("u", [best], None)]).unknown  # still read


# ============================================================================= explanations


def test_explanations_sum_to_the_score_they_explain(live, tmp_path, capsys):
    recommender = load_recommender(live.export)
    histories = histories_of(recommender, live)[:3]
    rows = recommend_items(recommender, histories, k=4, explain=2)
    assert len(rows) == 12
    for row in rows:
        total = row.base + sum(reason.contribution for reason in row.reasons) + row.other
        assert abs(total - row.score) < 1e-4, (total, row.score)
        shares = [reason.contribution for reason in row.reasons]
        assert len(shares) == 2 and shares == sorted(shares, reverse=True)
    everything = recommend_items(recommender, histories[:1], k=1, explain=1000)[0]
    assert abs(everything.other) < 1e-9  # every history item listed
    history_ids = {
        recommender.item_ids[i - 1] for i in histories[0].items[-recommender.max_history_length :]
    }
    assert {reason.item_id for reason in everything.reasons} <= history_ids
    # base: the score for no history at all (the zero state; the prior's part)
    row = recommender.item_index[everything.item_id]
    head = recommender.model.head
    zero = torch.zeros(1, recommender.item_embeddings.shape[1])
    base = head.score_all(zero, recommender.item_embeddings[[row]], torch.tensor([row]))
    assert abs(everything.base - float(base)) < 1e-6
    # one history item takes the whole difference
    single = UserHistory("one", histories[0].items[-1:], histories[0].timestamps[-1:])
    alone = recommend_items(recommender, [single], k=1, explain=1)[0]
    assert abs(alone.base + alone.reasons[0].contribution - alone.score) < 1e-5

    out = tmp_path / "explained.jsonl"
    history = ",".join(live.histories[0]["items"])
    argv = ["recommend", "--model", str(live.export), "--history", history, "--top-k", "3",
            "--explain", "2", "--out", str(out)]  # fmt: skip
    assert vidrec_cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[-1] == "reasons" and "(base " in printed[2]
    record = json.loads(out.read_text().splitlines()[0])
    assert len(record["reasons"]) == 2 and set(record["reasons"][0]) == {"item_id", "contribution"}
    total = record["base"] + sum(r["contribution"] for r in record["reasons"]) + record["other"]
    assert abs(total - record["score"]) < 1e-4


# ============================================================================= HTTP


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 30) -> dict | str:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    return json.loads(text) if body is not None else text


def test_the_registered_recommender_answers_over_http(live, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go under the working directory
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["export", "--checkpoint", str(live.output_dir), "--out", str(tmp_path / "served"),
            "--register", "vidrec-recommender", "--tracking-uri", uri]  # fmt: skip
    assert vidrec_cli.main(argv) == 0
    port = free_port()
    # `timeout`: the server stops itself even if this test dies before it stops it
    server = subprocess.Popen(
        ["timeout", "300", sys.executable, "-m", "mlflow", "models", "serve", "-m",
         "models:/vidrec-recommender/1", "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env={**SUBPROCESS_ENV, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                http(f"{base}/ping", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the server did not answer /ping"
                time.sleep(1)
        user = live.histories[0]
        records = [
            {
                "user_id": user["user_id"],
                "item_ids": user["items"],
                "timestamps": user["timestamps"],
            },
            {
                "user_id": "newcomer",
                "item_ids": ["not_an_item", user["items"][0]],
                "timestamps": None,
            },
        ]
        answer = http(f"{base}/invocations",
                      {"dataframe_records": records, "params": {"k": 5, "explain": 2}})  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    first, second = answer["predictions"]
    recommender = load_recommender(live.export)
    expected = recommend_items(recommender, histories_of(recommender, live)[:1], k=5)
    assert first["item_ids"] == [row.item_id for row in expected]
    scores = torch.tensor([row.score for row in expected])
    torch.testing.assert_close(torch.tensor(first["scores"]), scores, atol=1e-5, rtol=0)
    assert first["unknown_items"] == 0 and second["unknown_items"] == 1
    assert len(second["item_ids"]) == 5 and user["items"][0] not in second["item_ids"]
    for score, reason in zip(first["scores"], first["reasons"], strict=True):
        total = reason["base"] + sum(r["contribution"] for r in reason["reasons"]) + reason["other"]
        assert abs(total - score) < 1e-4


def test_index_add_embeds_a_video_from_shards_as_the_export_embedded_its_cold_items(
    live, synthetic_shards, tmp_path
):
    """A catalogue item read back as a new one (its title and tags, its clips from the
    shards) gets the embedding the export's table holds for it: the same decoding, tokens
    and item tower as a cold-start item's."""
    recommender = load_recommender(live.export)
    catalogue = live.trainer.data.catalogue
    cold_rows = torch.nonzero(recommender.cold).flatten().tolist()
    clips = {d: clip_keys_from_shards(synthetic_shards[d]) for d in ("train", "eval")}
    row, where = next(
        (row, d) for row in cold_rows for d in clips if catalogue.item_ids[row - 1] in clips[d]
    )
    item_id = catalogue.item_ids[row - 1]
    path = tmp_path / "again.jsonl"
    path.write_text(json.dumps({"item_id": item_id, **catalogue.texts[row - 1]}) + "\n")
    items = read_new_items(path, ["title", "tags"], str(synthetic_shards[where]))
    assert items[0].clip_bytes and items[0].text == catalogue.text(row)
    embedding = embed_items(recommender, items)[0]
    torch.testing.assert_close(embedding, recommender.item_embeddings[row], atol=1e-5, rtol=0)
