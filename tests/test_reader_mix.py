"""The training reader over a weighted mix of sources, one of them in video2dataset's layout."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from shard_factory import key_index, write_shards

from data_shards.reader import ReaderConfig, build_loader
from data_shards.sources import ShardSource
from data_shards.text import load_tokenizer
from data_shards.video import encode_clip

SIZE, FRAMES = 16, 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def mix_config(sources: list[ShardSource], **overrides) -> ReaderConfig:
    settings = dict(
        shards=sources,
        mode="train",
        num_frames=FRAMES,
        size=SIZE,
        batch_size=25,
        num_workers=2,
        shuffle_buffer=20,
        max_text_length=8,
    )
    return ReaderConfig(**(settings | overrides))


def test_fractions_follow_the_weights_on_two_ranks_of_two_workers(tmp_path, tokenizer):
    """Weights 0.6 / 0.3 / 0.1 over 1, 4 and 12 shards of 6, 3 and 1 samples: what each
    source delivers over 4,000 samples (2 ranks × 2 workers) is its weight ±2 points, not its
    share of shards or samples. Ranks are constructor arguments: two loaders, one per rank."""
    layout = {"big": (1, 6, 0), "mid": (4, 3, 100), "small": (12, 1, 200)}
    for name, (shards, per_shard, start) in layout.items():
        write_shards(tmp_path / name, shards, per_shard, num_frames=4, start_index=start)
    weights = {"big": 0.6, "mid": 0.3, "small": 0.1}
    sources = [ShardSource(name, str(tmp_path / name), weights[name]) for name in layout]
    cfg = mix_config(sources, epoch_size=4000)
    delivered, by_key = Counter(), Counter()
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2, tokenizer=tokenizer)
        for batch in loader:
            by_key.update("big" if i < 100 else "mid" if i < 200 else "small"
                          for i in map(key_index, batch["key"]))  # fmt: skip
        delivered.update(loader.delivered)
        assert loader.skipped_samples == 0
    assert delivered == by_key  # the per-source counts are the samples delivered
    total = sum(delivered.values())
    assert total == 4000
    for name, weight in weights.items():
        assert delivered[name] / total == pytest.approx(weight, abs=0.02), (name, delivered)


def test_a_zero_weight_source_is_never_read(tmp_path, tokenizer):
    write_shards(tmp_path / "a", 1, 3)
    write_shards(tmp_path / "b", 1, 3, start_index=100)
    sources = [ShardSource("a", str(tmp_path / "a"), 1), ShardSource("b", str(tmp_path / "b"), 0)]
    loader = build_loader(mix_config(sources, num_workers=0, epoch_size=50), tokenizer=tokenizer)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == 50 and all(key_index(key) < 100 for key in keys)
    assert loader.delivered == {"a": 50, "b": 0}


def test_per_source_counts_are_training_samples_with_several_per_clip(tmp_path, tokenizer):
    """Two samples per decoded clip: a source's count is the training samples it gave, twice
    its clips, and the pass still ends after ``epoch_size`` samples."""
    write_shards(tmp_path / "a", 2, 4, num_frames=4)
    write_shards(tmp_path / "b", 3, 2, num_frames=4, start_index=100)
    sources = [ShardSource("a", str(tmp_path / "a"), 1), ShardSource("b", str(tmp_path / "b"), 1)]
    cfg = mix_config(sources, batch_size=10, samples_per_clip=2, epoch_size=60)
    loader = build_loader(cfg, tokenizer=tokenizer)
    clips = Counter(
        "a" if key_index(key) < 100 else "b" for batch in loader for key in batch["key"]
    )
    assert sum(clips.values()) == 30
    assert loader.delivered == {name: 2 * count for name, count in clips.items()}
    assert min(clips.values()) > 0


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([("a", -1.0)], "source 'a': weight must be finite and >= 0"),
        ([("a", 0.0), ("b", 0)], "every source has weight 0: a, b"),
        ([("a", "heavy")], "source 'a': weight 'heavy' is not a number"),
        ([("a", float("nan"))], "source 'a': weight must be finite"),
        ([("a", 1), ("a", 2)], "source 'a' is named twice"),
    ],
)
def test_bad_weights_are_refused_naming_the_source(tmp_path, sources, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        mix_config([ShardSource(name, str(tmp_path), weight) for name, weight in sources])


def test_a_source_without_shards_is_named(tmp_path, tokenizer):
    write_shards(tmp_path / "a", 1, 2)
    sources = [ShardSource("a", str(tmp_path / "a")), ShardSource("gone", str(tmp_path / "x*"))]
    with pytest.raises(FileNotFoundError, match="source 'gone': no shards match"):
        build_loader(mix_config(sources), tokenizer=tokenizer)


# ------------------------------------------------------------------------------ video2dataset


def write_video2dataset_shards(directory, num_shards: int = 2, per_shard: int = 3) -> list[str]:
    """Shards as video2dataset writes them: ``00000.tar`` … of ``<key>.mp4/.txt/.json`` with
    9-digit keys, no ``index.json``, no ``item_id``; the videos raw (not re-encoded to one
    size): several resolutions, one with a display rotation of 90°. Returns the keys."""
    directory.mkdir(parents=True)
    sizes = [(48, 64), (72, 40), (36, 36)]
    keys = []
    for shard in range(num_shards):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                index = shard * per_shard + i
                key = f"{shard:05d}{i:04d}"
                height, width = sizes[index % len(sizes)]
                frames = np.full((6, height, width, 3), 40 + 20 * index, dtype=np.uint8)
                rotation = 90 if index == 1 else 0
                meta = {
                    "url": f"https://example.com/{key}.mp4",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "caption": f"clip {index}",
                    "width": width,
                    "height": height,
                    "duration": 1.0,
                }
                sink.write({
                    "__key__": key,
                    "mp4": encode_clip(frames, 6.0, rotation=rotation),
                    "txt": f"clip {index}",
                    "json": json.dumps(meta),
                })  # fmt: skip
                keys.append(key)
    return keys


def test_video2dataset_shards_are_a_source_like_any_other(tmp_path, tokenizer):
    keys = write_video2dataset_shards(tmp_path / "v2d")
    assert not (tmp_path / "v2d" / "index.json").exists()
    write_shards(tmp_path / "own", 1, 4)
    # read once, in eval mode: every clip decodes to the reader's size, captions from .txt
    eval_loader = build_loader(
        ReaderConfig(shards=str(tmp_path / "v2d"), mode="eval", num_frames=FRAMES, size=SIZE,
                     batch_size=4, num_workers=0, max_text_length=8),
        tokenizer=tokenizer,
    )  # fmt: skip
    batches = list(eval_loader)
    assert sorted(k for b in batches for k in b["key"]) == sorted(keys)
    assert all(b["video"].shape[1:] == (FRAMES, 3, SIZE, SIZE) for b in batches)
    assert {t for b in batches for t in b["text"]} == {f"clip {i}" for i in range(len(keys))}
    assert all(item is None for b in batches for item in b["item_id"])
    assert eval_loader.skipped_samples == 0
    # mixed with a built set in train mode
    sources = [
        ShardSource("v2d", str(tmp_path / "v2d"), 1.0),
        ShardSource("own", str(tmp_path / "own"), 1.0),
    ]
    loader = build_loader(mix_config(sources, num_workers=0, epoch_size=100), tokenizer=tokenizer)
    seen = {key for batch in loader for key in batch["key"]}
    assert set(keys) <= seen
    assert loader.delivered["v2d"] + loader.delivered["own"] == 100
    assert loader.delivered["v2d"] > 0 and loader.delivered["own"] > 0
    assert loader.skipped == {"v2d": 0, "own": 0}
