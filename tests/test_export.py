"""Export and hand-off: checkpoint → export directory → the same embeddings as the live engine;
stock transformers towers; MLflow pyfunc; refusal of damaged exports; batch embedding to Parquet
with resume.

Checkpoints come from tiny in-process runs (a world of one, ZeRO 0, 2 and 3, 2 steps each);
the 2-rank ZeRO-3 case is one real deepspeed launch (marked ``distributed``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_pretrain_train import tiny, world  # noqa: F401  (world is a fixture)

import vidrec_cli
from data_shards.reader import ReaderConfig, build_loader
from pretrain.checkpoint import load_weights
from pretrain.consolidate import consolidate_checkpoint, load_deepspeed_file
from pretrain.embed import embed_clips, embed_texts
from pretrain.export import (
    ExportComponent,
    ExportError,
    add_component,
    export_checkpoint,
    load_export,
)
from pretrain.train import Pretrainer

QUERIES = ["a red square moving left on grass", "blue circle", ""]


class Trained:
    """A finished tiny run, and what its live engine says about a fixed batch."""

    def __init__(self, trainer: Pretrainer, batch: dict):
        self.output_dir = trainer.output_dir
        self.config = trainer.config
        model = trainer.engine.module
        model.eval()
        self.weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        tokens = trainer.tokenizer(
            QUERIES, padding="max_length", truncation=True,
            max_length=trainer.config.data.max_text_length, return_tensors="pt",
        )  # fmt: skip
        self.video = batch["video"]  # (B, T, C, H, W) uint8
        self.input_ids, self.attention_mask = tokens["input_ids"], tokens["attention_mask"]
        with torch.no_grad():
            self.video_embeds = model.encode_video(self.video)[1].clone()
            self.text_embeds = model.encode_text(self.input_ids, self.attention_mask)[1].clone()
            # what the stock towers must reproduce
            _, pixels = model.prepare_video(self.video)
            self.video_tokens = model.video_model(pixels).last_hidden_state.clone()
            self.pixels = pixels.clone()
            self.text_tokens = model.text_model(
                self.input_ids, attention_mask=self.attention_mask
            ).last_hidden_state.clone()


def eval_batch(shards, config, size: int = 8) -> dict:
    video = config.model.video
    loader = build_loader(
        ReaderConfig(
            shards=str(shards["eval"]), mode="eval", num_frames=video["num_frames"],
            size=video["image_size"], batch_size=size, num_workers=0,
        )
    )  # fmt: skip
    return next(iter(loader))


@pytest.fixture(scope="module")
def runs(world, synthetic_shards, tmp_path_factory):  # noqa: F811
    """(ZeRO stage, precision) → Trained, built on first use (each run is ~10 s here)."""
    cache: dict[tuple[int, str], Trained] = {}

    def get(stage: int, precision: str = "fp32") -> Trained:
        if (stage, precision) not in cache:
            output = tmp_path_factory.mktemp(f"zero{stage}-{precision}") / "run"
            config = tiny(
                synthetic_shards, output, "train.steps=2", f"parallel.zero_stage={stage}",
                f"parallel.precision={precision}", f"data.eval_shards={synthetic_shards['eval']}",
            )  # fmt: skip
            trainer = Pretrainer(config, world)
            trainer.fit()
            cache[stage, precision] = Trained(trainer, eval_batch(synthetic_shards, config))
        return cache[stage, precision]

    return get


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> Path:
    """The fp32 export of the ZeRO-2 run, shared by the read-only tests below."""
    return export_checkpoint(runs(2).output_dir, tmp_path_factory.mktemp("export") / "model")


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_gives_the_live_embeddings(stage, runs, tmp_path):
    trained = runs(stage)
    out = tmp_path / "model"
    started = time.perf_counter()
    assert (
        vidrec_cli.main(["export", "--checkpoint", str(trained.output_dir), "--out", str(out)]) == 0
    )
    seconds = time.perf_counter() - started

    names = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "video_preprocessing.json",
            "export_info.json", "README.md", "video_encoder", "text_encoder"} <= names  # fmt: skip
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    info = json.loads((out / "export_info.json").read_text())
    assert info["step"] == 2 and info["zero_stage"] == stage and info["world_size"] == 1
    assert info["mlflow_run_id"]
    card = (out / "README.md").read_text()
    assert info["mlflow_run_id"] in card and "step 2" in card and "preset: tiny" in card
    assert f"{info['parameters']:,}" in card and "t2v_r1" in card  # evaluation figures
    # Hugging Face card metadata; no path of the training machine
    front_matter, body = card.removeprefix("---\n").split("\n---\n", 1)
    metadata = yaml.safe_load(front_matter)
    assert metadata["library_name"] == "vidrec" and metadata["pipeline_tag"]
    assert "vidrec" in metadata["tags"] and metadata["metrics"] == ["recall"]
    assert metadata["datasets"] == ["train"]  # the shard set's name, not its path
    assert "## Evaluation (held-out text-video retrieval" in body
    assert str(tmp_path.parent) not in card  # pytest's base directory: shards, checkpoint
    preprocessing = json.loads((out / "video_preprocessing.json").read_text())
    assert preprocessing["num_frames"] == 4 and preprocessing["image_size"] == 32
    assert preprocessing["fps"] == 8.0 and preprocessing["max_text_length"] == 16

    model = load_export(out)
    torch.testing.assert_close(
        model.embed_video(trained.video), trained.video_embeds, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(model.embed_text(QUERIES), trained.text_embeds, atol=1e-5, rtol=0)
    print(f"ZeRO-{stage}: export {seconds:.1f} s")


def test_bf16_export_is_close(runs, exported, tmp_path):
    trained = runs(2)
    out = export_checkpoint(trained.output_dir, tmp_path / "model", dtype="bf16")
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.55 * (exported / "model.safetensors").stat().st_size  # tied weights stay tied
    model = load_export(out)
    assert next(model.model.parameters()).dtype == torch.bfloat16
    video = model.embed_video(trained.video)
    text = model.embed_text(QUERIES)
    # unit vectors; measured on the tiny model: a bf16 forward moves them by at most ~5e-3
    torch.testing.assert_close(video, trained.video_embeds, atol=2e-2, rtol=0)
    torch.testing.assert_close(text, trained.text_embeds, atol=2e-2, rtol=0)
    assert (video * trained.video_embeds).sum(-1).min() > 0.99  # cosine to the fp32 embedding


def test_a_bf16_run_exports_its_fp32_master_weights(runs, tmp_path):
    """Under bf16 the engine's module holds bf16 copies of the fp32 masters in the optimizer
    partitions: the export takes the masters, which round to exactly the live weights."""
    trained = runs(2, "bf16")
    consolidated = consolidate_checkpoint(trained.output_dir)
    assert consolidated.weights_source == "fp32 master"
    for name, live in trained.weights.items():
        merged = consolidated.state_dict[name]
        # the frozen text pooler has no master: its bf16 module copy is what there is
        assert merged.dtype == (live.dtype if "pooler" in name else torch.float32), name
        assert torch.equal(merged.to(live.dtype), live), name
    model = load_export(export_checkpoint(trained.output_dir, tmp_path / "model", dtype="bf16"))
    torch.testing.assert_close(
        model.embed_video(trained.video), trained.video_embeds.float(), atol=1e-3, rtol=0
    )


def test_large_models_are_sharded_with_an_index(runs, tmp_path):
    out = export_checkpoint(runs(2).output_dir, tmp_path / "model", max_shard_size="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    load_export(out)


@pytest.mark.distributed
def test_two_rank_zero3_checkpoint_exports_in_one_process(synthetic_shards, tmp_path):
    """Saved by 2 ranks under ZeRO-3, exported by a plain process (world size 1): the merged
    weights equal DeepSpeed's own zero_to_fp32 (which unpickles; fine on a file we just wrote),
    and the export loads and embeds."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_pretrain_distributed import launch

    output = tmp_path / "run"
    launch(synthetic_shards, output, "parallel.zero_stage=3", "train.steps=2")
    consolidated = consolidate_checkpoint(output)
    assert consolidated.zero_stage == 3 and consolidated.world_size == 2
    reference = get_fp32_state_dict_from_zero_checkpoint(str(output / "checkpoints"))
    assert consolidated.state_dict.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(consolidated.state_dict[name], tensor), name

    model = load_export(export_checkpoint(output, tmp_path / "model"))
    batch = eval_batch(synthetic_shards, tiny(synthetic_shards, output), size=4)
    assert model.embed_video(batch["video"]).shape == (4, 16)


# ------------------------------------------------------------------------------ stock towers

STOCK_CHECK = """
import sys
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

out, reference = sys.argv[1], load_file(sys.argv[2])
text = AutoModel.from_pretrained(out + "/text_encoder").eval()
video = AutoModel.from_pretrained(out + "/video_encoder").eval()
tokenizer = AutoTokenizer.from_pretrained(out + "/text_encoder")
assert type(text).__name__ == "BertModel" and type(video).__name__ == "VideoMAEModel"
with torch.no_grad():
    tokens = text(reference["input_ids"], attention_mask=reference["attention_mask"])
    frames = video(reference["pixels"])
torch.testing.assert_close(tokens.last_hidden_state, reference["text_tokens"], atol=1e-5, rtol=0)
torch.testing.assert_close(frames.last_hidden_state, reference["video_tokens"], atol=1e-5, rtol=0)
assert tokenizer("a red square")["input_ids"][0] == tokenizer.cls_token_id
ours = sorted(n for n in sys.modules if n.split(".")[0] in ("pretrain", "data_shards", "finetune"))
assert not ours, ours
print("stock ok")
"""


def test_stock_transformers_load_both_towers_without_vidrec(runs, exported, tmp_path):
    trained = runs(2)
    reference = tmp_path / "reference.safetensors"
    save_file(
        {
            "input_ids": trained.input_ids, "attention_mask": trained.attention_mask,
            "pixels": trained.pixels, "text_tokens": trained.text_tokens,
            "video_tokens": trained.video_tokens,
        },
        str(reference),
    )  # fmt: skip
    script = tmp_path / "stock_check.py"
    script.write_text(STOCK_CHECK)
    result = subprocess.run(
        [sys.executable, str(script), str(exported), str(reference)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "stock ok" in result.stdout, result.stderr[-3000:]
    # a whole BertModel and VideoMAEModel: transformers reports nothing missing or unexpected
    assert "LOAD REPORT" not in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------------------ damaged exports


def damaged(exported: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    return copy


def test_truncated_weights_are_refused_naming_the_file(exported, tmp_path):
    copy = damaged(exported, tmp_path)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"model\.safetensors"):
        load_export(copy)


def test_missing_config_is_refused(exported, tmp_path):
    copy = damaged(exported, tmp_path)
    (copy / "config.json").unlink()
    with pytest.raises(ExportError, match=r"config\.json is missing"):
        load_export(copy)


def test_a_shape_mismatch_names_the_tensor(exported, tmp_path):
    copy = damaged(exported, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["embed_dim"] = 24
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"tensor text_projection\.weight has shape \[16, 32\]"):
        load_export(copy)


def test_another_model_type_and_pickled_weights_are_refused(exported, tmp_path):
    with pytest.raises(ExportError, match=r"model_type is 'bert'"):
        load_export(exported / "text_encoder")
    copy = damaged(exported, tmp_path)
    torch.save({}, copy / "pytorch_model.bin")
    with pytest.raises(ExportError, match=r"pytorch_model\.bin; only safetensors"):
        load_export(copy)


class NotDeepSpeed:
    """A class of nobody's checkpoint: the reader must refuse it, never build it."""


def test_checkpoint_files_naming_foreign_classes_are_refused(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": NotDeepSpeed()}, path)
    with pytest.raises(ExportError, match=r"NotDeepSpeed.*weights-only loading does not allow"):
        load_deepspeed_file(path)


def test_weights_that_do_not_fit_are_refused_naming_every_tensor():
    """The one check behind export, load_export and the recommender: shapes, missing and
    unknown tensors, each named; missing tensors the caller ties afterwards may be left out."""
    module = torch.nn.Linear(3, 2)
    weights = {"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}
    with pytest.raises(
        ExportError,
        match=r"^here: tensor weight has shape \[2, 2\], the config needs \[2, 3\]; "
        r"tensor bias is missing \(expected shape \[2\]\); unexpected tensor extra$",
    ):
        load_weights(module, weights, "here")
    load_weights(module, {"weight": torch.ones(2, 3)}, "here", ignore_missing=("bias",))
    assert torch.equal(module.weight, torch.ones(2, 3))


# ------------------------------------------------------------------------------ components


def test_components_are_added_and_loaded(runs, tmp_path):
    out = export_checkpoint(runs(2).output_dir, tmp_path / "model")
    table = torch.randn(10, 16)
    add_component(
        out,
        ExportComponent(
            "item_embeddings", {"weight": table}, config={"item_ids": [str(i) for i in range(10)]},
            description="item-embedding table of the finetuned recommender",
        ),
    )  # fmt: skip
    model = load_export(out)
    assert torch.equal(model.components["item_embeddings"].tensors["weight"], table)
    assert model.components["item_embeddings"].config["item_ids"][3] == "3"
    assert "components/item_embeddings.safetensors" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------ MLflow


def _first_shard_clip(shards: Path, out: Path) -> tuple[str, Path]:
    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
        out.write_bytes(tar.extractfile(member).read())
    return member.name.removesuffix(".mp4"), out


def test_pyfunc_is_registered_and_serves_the_batch_embeddings(exported, synthetic_shards, tmp_path):
    import mlflow

    from pretrain.pyfunc import log_export

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    started = time.perf_counter()
    model_uri = log_export(exported, registered_model_name="vidrec-test", tracking_uri=uri)
    assert model_uri == "models:/vidrec-test/1"
    served = mlflow.pyfunc.load_model(model_uri)
    seconds = time.perf_counter() - started

    key, clip = _first_shard_clip(synthetic_shards["eval"], tmp_path / "clip.mp4")
    frame = pd.DataFrame({"text": ["a red square", "blue circle"], "clip_path": [str(clip), None]})
    result = served.predict(frame)
    local = load_export(exported)
    text = torch.from_numpy(np.array(result["text_embedding"].tolist(), dtype=np.float32))
    torch.testing.assert_close(
        text, local.embed_text(["a red square", "blue circle"]), atol=1e-6, rtol=0
    )
    assert result["video_embedding"][1] is None

    embed_clips(local, str(synthetic_shards["eval"]), tmp_path / "clips", num_workers=0,
                progress=False, rank=0, world_size=1)  # fmt: skip
    table = pd.read_parquet(tmp_path / "clips")
    batch_embedding = table.set_index("key").loc[key, "embedding"]
    torch.testing.assert_close(
        torch.tensor(result["video_embedding"][0]), torch.tensor(batch_embedding), atol=1e-6, rtol=0
    )
    print(f"log + register + load: {seconds:.1f} s")


# ------------------------------------------------------------------------------ embed


def _all_keys(shards: Path) -> list[str]:
    keys = []
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            keys += [
                m.name.removesuffix(".mp4") for m in tar.getmembers() if m.name.endswith(".mp4")
            ]
    return keys


def test_embed_writes_every_clip_once_across_processes_and_resumes(
    exported, synthetic_shards, tmp_path, monkeypatch
):
    import pretrain.embed as embed_module

    model = load_export(exported)
    shards = str(synthetic_shards["eval"])
    settings = dict(batch_size=4, num_workers=0, chunk_batches=2, progress=False)
    out = tmp_path / "clips"

    # rank 0 of 2 stops after its first chunk (a killed job), then runs again
    write_chunk = embed_module._write_chunk
    calls = {"n": 0}

    def fail_on_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        write_chunk(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_write_chunk", fail_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        embed_clips(model, shards, out, rank=0, world_size=2, **settings)
    monkeypatch.setattr(embed_module, "_write_chunk", write_chunk)
    resumed = embed_clips(model, shards, out, rank=0, world_size=2, **settings)
    assert resumed.resumed_from_chunk == 1
    assert resumed.clips == resumed.total_clips - 8  # the first chunk was not decoded again
    other = embed_clips(model, shards, out, rank=1, world_size=2, **settings)
    again = embed_clips(model, shards, out, rank=1, world_size=2, **settings)
    assert again.clips == 0 and again.total_clips == other.total_clips

    table = pd.read_parquet(out)
    assert sorted(table["key"]) == sorted(_all_keys(synthetic_shards["eval"]))  # each once
    assert list(table.columns) == ["key", "item_id", "embedding", "model_id"]
    assert set(table["model_id"]) == {model.model_id}
    assert table["item_id"].notna().all()

    # the same rows as one uninterrupted single-process run
    single = tmp_path / "single"
    result = embed_clips(model, shards, single, rank=0, world_size=1, **settings)
    reference = pd.read_parquet(single).set_index("key")
    for key, embedding in zip(table["key"], table["embedding"], strict=True):
        torch.testing.assert_close(
            torch.tensor(embedding),
            torch.tensor(reference.loc[key, "embedding"]),
            atol=1e-6,
            rtol=0,
        )
    print(f"embed: {result.clips_per_second:.1f} clips/s on one process")

    with pytest.raises(ValueError, match="written by 2 processes"):
        embed_clips(model, shards, out, rank=0, world_size=1, **settings)


def test_embed_cli_writes_query_embeddings(exported, tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("a red square\n\nblue circle on sand\n")
    out = tmp_path / "queries.parquet"
    code = vidrec_cli.main(["embed", "--model", str(exported), "--text-file", str(queries),
                            "--out", str(out)])  # fmt: skip
    assert code == 0 and "embedded 2 texts" in capsys.readouterr().out
    table = pd.read_parquet(out)
    assert table["text"].tolist() == ["a red square", "blue circle on sand"]
    model = load_export(exported)
    torch.testing.assert_close(
        torch.from_numpy(np.stack(table["embedding"])), model.embed_text(table["text"].tolist()),
        atol=1e-6, rtol=0,
    )  # fmt: skip
    assert embed_texts(model, ["x"], tmp_path / "one.parquet") == 1


def test_embed_cli_reads_its_rank_from_the_launcher_environment(
    exported, synthetic_shards, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = vidrec_cli.main([
        "embed", "--model", str(exported), "--shards", str(synthetic_shards["eval"]),
        "--out", str(tmp_path / "clips"), "--workers", "0", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "embed rank 1/2" in printed and "clips/s per process" in printed
    parts = sorted(path.name for path in (tmp_path / "clips").glob("*.parquet"))
    assert parts and all(name.startswith("part-r00001-of-00002-") for name in parts)
    assert len(pd.read_parquet(tmp_path / "clips")) == 16  # rank 1's half of 32
