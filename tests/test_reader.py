"""Streaming reader: shapes, frame sampling, splits across ranks and workers, bad data, resume."""

from __future__ import annotations

import functools
import itertools
import json
import random
import signal
import tarfile
import threading
from contextlib import contextmanager
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from shard_factory import (
    HEIGHT,
    WIDTH,
    key_index,
    read_frame_index,
    read_sample_code,
    sample_key,
    write_shards,
)

from data_shards import reader
from data_shards.augment import center_crop, expand_crops, random_resized_crop, resize_square
from data_shards.frames import segment_frame_indices, uniform_frame_indices
from data_shards.reader import ReaderConfig, build_loader
from data_shards.sources import resolve_shards
from data_shards.text import load_tokenizer

SIZE, FRAMES = 32, 4


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def config(shards, **overrides) -> ReaderConfig:
    settings = dict(
        shards=str(shards),
        mode="eval",
        num_frames=FRAMES,
        size=SIZE,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        max_text_length=16,
    )
    settings.update(overrides)
    return ReaderConfig(**settings)


def read_all(loader) -> list[dict]:
    return list(loader)


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def frame_codes(video: torch.Tensor) -> list[int]:
    """(T, C, H, W) → the frame index coded in the top half of each frame."""
    height = video.shape[-2]
    top = video[:, 0, height // 10 : height * 35 // 100].float().mean(dim=(1, 2))
    return [read_frame_index(level) for level in top.tolist()]


def sample_code(video: torch.Tensor) -> int:
    height = video.shape[-2]
    bottom = video[:, 0, height * 65 // 100 : height * 9 // 10].float().mean()
    return read_sample_code(bottom.item())


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging the test run."""

    def expire(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------


def test_resolve_shards_forms(tmp_path):
    written = write_shards(tmp_path / "d", 3, 1)
    paths = [str(p) for p in written.paths]
    assert resolve_shards(str(tmp_path / "d" / "{00000..00002}.tar")) == paths
    assert resolve_shards(str(tmp_path / "d" / "*.tar")) == paths
    assert resolve_shards(str(tmp_path / "d")) == paths  # index.json
    # The index order wins over name order.
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    index["shards"].reverse()
    (tmp_path / "d" / "index.json").write_text(json.dumps(index))
    assert resolve_shards(str(tmp_path / "d")) == paths[::-1]
    (tmp_path / "d" / "index.json").unlink()
    assert resolve_shards(str(tmp_path / "d")) == paths  # *.tar without an index
    assert resolve_shards("http://h/{0..1}.tar::pipe:cat x.tar") == [
        "http://h/0.tar",
        "http://h/1.tar",
        "pipe:cat x.tar",
    ]
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(tmp_path / "d" / "{00000..00003}.tar"))
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(tmp_path / "nothing-*.tar"))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        ReaderConfig(shards="x", mode="test")
    with pytest.raises(ValueError):
        ReaderConfig(shards="x", crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        ReaderConfig(shards="x", num_frames=0)


def test_batch_shapes_dtypes_and_content(tmp_path, tokenizer):
    written = write_shards(tmp_path, 2, 5)
    loader = build_loader(config(tmp_path, batch_size=4), tokenizer=tokenizer)
    batches = read_all(loader)
    assert [len(b["key"]) for b in batches] == [4, 4, 2]  # eval keeps the partial batch
    first = batches[0]
    assert first["video"].dtype == torch.uint8
    assert first["video"].shape == (4, FRAMES, 3, SIZE, SIZE)
    assert first["input_ids"].dtype == torch.long and first["input_ids"].shape == (4, 16)
    assert first["attention_mask"].dtype == torch.long and first["attention_mask"].shape == (4, 16)
    assert set(first) == {"video", "input_ids", "attention_mask", "text", "key", "item_id", "meta"}
    assert keys_of(batches) == written.keys
    for batch in batches:
        for video, key, item_id, meta, text, mask in zip(
            batch["video"],
            batch["key"],
            batch["item_id"],
            batch["meta"],
            batch["text"],
            batch["attention_mask"],
            strict=True,
        ):
            index = key_index(key)
            assert sample_code(video) == index % 22  # the pixels belong to this key
            assert item_id == f"item{index}" and meta["sample_index"] == index
            assert text == meta["caption"]
            if text == "":
                assert mask.sum() == 2  # [CLS] [SEP]
    texts = [t for b in batches for t in b["text"]]
    assert any("Zürich ☕" in t for t in texts) and any("日本語" in t for t in texts)
    assert loader.skipped_samples == 0


def test_train_batches_hold_clips_at_shard_size_and_a_crop_per_sample(tmp_path, tokenizer):
    """Three samples per clip: a batch of 6 samples is 2 clips at the shards' 40×56 with 3
    crop rows each; expanded, each sample is its clip's pixels cut to SIZE², copies adjacent
    and grouped, their tokens and keys repeated; the copies' boxes differ."""
    write_shards(tmp_path, 2, 6)
    cfg = config(tmp_path, mode="train", batch_size=6, samples_per_clip=3, epoch_size=24)
    boxes = set()
    for batch in build_loader(cfg, tokenizer=tokenizer):
        assert batch["video"].shape == (2, FRAMES, 3, HEIGHT, WIDTH)
        assert batch["crops"].shape == (2, 3, 5) and batch["crops"].dtype == torch.long
        top, left, height, width, flip = batch["crops"].reshape(-1, 5).T
        assert bool((top >= 0).all() and (top + height <= HEIGHT).all())
        assert bool((left >= 0).all() and (left + width <= WIDTH).all())
        assert set(flip.tolist()) <= {0, 1}
        boxes.update(map(tuple, batch["crops"][:, :, :4].reshape(-1, 4).tolist()))
        samples = expand_crops(batch, SIZE)
        assert samples["video"].shape == (6, FRAMES, 3, SIZE, SIZE)
        assert samples["clip_group"].tolist() == [0, 0, 0, 1, 1, 1]
        assert samples["key"] == [batch["key"][0]] * 3 + [batch["key"][1]] * 3
        assert torch.equal(samples["input_ids"][:3], batch["input_ids"][:1].expand(3, -1))
        assert "crops" not in samples
    assert len(boxes) > 12  # 24 samples, nearly all boxes drawn apart


def test_expand_crops_cuts_resizes_and_flips_each_row():
    """Against interpolate on hand-cut regions: row r of clip c is clip c's box, resized,
    mirrored when its flip is set."""
    generator = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (2, 3, 3, 20, 30), dtype=torch.uint8, generator=generator)
    crops = torch.tensor(
        [[[0, 0, 20, 30, 0], [4, 10, 8, 8, 1]], [[2, 3, 16, 16, 0], [0, 0, 8, 30, 1]]]
    )
    text = {"input_ids": torch.arange(4).view(2, 2), "attention_mask": torch.ones(2, 2).long()}
    samples = expand_crops({"video": video, "crops": crops, **text}, 12)
    for index, (top, left, height, width, flip) in enumerate(crops.reshape(-1, 5).tolist()):
        region = video[index // 2, :, :, top : top + height, left : left + width]
        expected = torch.nn.functional.interpolate(
            region, size=(12, 12), mode="bilinear", antialias=height > 12 or width > 12
        )
        if flip:
            expected = expected.flip(-1)
        assert torch.equal(samples["video"][index], expected), index
    assert samples["input_ids"].tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.parametrize("size", [12, 40])
def test_the_accelerator_resize_through_float_matches_the_uint8_one(size):
    """The path a GPU takes, run here on the CPU: within one grey level of the CPU's."""
    generator = torch.Generator().manual_seed(1)
    clip = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8, generator=generator)
    direct = resize_square(clip, size, through_float=False).int()
    through_float = resize_square(clip, size, through_float=True)
    assert through_float.dtype == torch.uint8 and through_float.shape == (3, 3, size, size)
    assert (through_float.int() - direct).abs().max() <= 1


def test_samples_per_clip_must_divide_the_batch():
    with pytest.raises(ValueError, match="batch_size 5 is not a multiple of samples_per_clip 2"):
        ReaderConfig(shards="x", mode="train", batch_size=5, samples_per_clip=2)
    with pytest.raises(ValueError, match="samples_per_clip must be at least 1"):
        ReaderConfig(shards="x", samples_per_clip=0)
    # eval reads each clip once, whatever the training setting
    assert (
        ReaderConfig(shards="x", mode="eval", batch_size=5, samples_per_clip=2).clips_per_batch()
        == 5
    )


def test_eval_frames_are_uniform(tmp_path, tokenizer):
    write_shards(tmp_path, 1, 3, num_frames=12)
    batch = next(iter(build_loader(config(tmp_path, num_frames=4), tokenizer=tokenizer)))
    for video in batch["video"]:
        assert frame_codes(video) == [1, 4, 7, 10]  # centres of 4 segments of 12 frames
    # More frames wanted than the clip has: indices repeat, in order, covering the clip.
    batch = next(iter(build_loader(config(tmp_path, num_frames=16), tokenizer=tokenizer)))
    codes = frame_codes(batch["video"][0])
    assert codes == uniform_frame_indices(12, 16).tolist()
    assert codes == [0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11]


def test_segment_indices_stay_in_their_segments():
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        indices = segment_frame_indices(12, 4, rng)
        for k, index in enumerate(indices):
            assert 3 * k <= index < 3 * k + 3
        seen.add(tuple(indices))
    assert len(seen) > 20  # random, not always the centre
    short = segment_frame_indices(3, 8, rng)
    assert short.min() >= 0 and short.max() <= 2 and (np.diff(short) >= 0).all()


def coordinate_clip(height: int, width: int) -> torch.Tensor:
    """(2, 3, H, W) uint8 whose channel 0 holds the row and channel 1 the column."""
    rows = torch.arange(height, dtype=torch.uint8)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.uint8)[None, :].expand(height, width)
    frame = torch.stack([rows, cols, torch.zeros_like(rows)])
    return frame.expand(2, 3, height, width).clone()


def test_crops_cut_the_right_box():
    clip = coordinate_clip(40, 56)
    assert torch.equal(center_crop(clip, 40), clip[..., 8:48])
    small = center_crop(clip, 20)
    assert small.dtype == torch.uint8 and small.shape == (2, 3, 20, 20)
    # No box of area 1 fits a square ratio in 40×56: the centred square is the fallback.
    fallback = random_resized_crop(clip, 40, (1.0, 1.0), (1.0, 1.0), random.Random(0))
    assert torch.equal(fallback, clip[..., 8:48])
    big = coordinate_clip(80, 80)
    rng = random.Random(0)
    tops, lefts = set(), set()
    for _ in range(20):
        crop = random_resized_crop(big, 40, (0.25, 0.25), (1.0, 1.0), rng)
        top, left = int(crop[0, 0, 0, 0]), int(crop[0, 1, 0, 0])
        assert torch.equal(crop, big[..., top : top + 40, left : left + 40])
        tops.add(top)
        lefts.add(left)
    assert len(tops) > 5 and len(lefts) > 5


def test_train_frames_come_from_segments(tmp_path, tokenizer):
    write_shards(tmp_path, 1, 6, num_frames=12)
    # Full-height crops keep the top-half frame code readable.
    cfg = config(tmp_path, mode="train", crop_scale=(1.0, 1.0), flip_prob=0.0, epoch_size=12)
    picks = set()
    for batch in build_loader(cfg, tokenizer=tokenizer):
        for video in batch["video"]:
            codes = frame_codes(video)
            assert all(3 * k <= code < 3 * k + 3 for k, code in enumerate(codes)), codes
            picks.add(tuple(codes))
    assert len(picks) > 1


def test_train_texts_are_drawn_from_the_text_fields_and_eval_keeps_the_caption(tmp_path, tokenizer):
    write_shards(tmp_path, 2, 6)
    fields = ("caption", "item_id", "source")

    def texts(seed, mode="train", epoch_size=48):
        cfg = config(tmp_path, mode=mode, seed=seed, epoch_size=epoch_size, text_fields=fields)
        return [
            (text, meta)
            for batch in build_loader(cfg, tokenizer=tokenizer)
            for text, meta in zip(batch["text"], batch["meta"], strict=True)
        ]

    drawn = texts(0)
    assert len(drawn) == 48
    kinds = set()
    for text, meta in drawn:
        options = {meta["caption"]: "caption", meta["item_id"]: "item_id", "synthetic": "source"}
        assert text in options, (text, meta)  # one of this clip's own fields, nothing else
        kinds.add(options[text])
    assert kinds == set(fields)
    # an empty caption is not drawn: the clip gets one of its other texts
    assert all(text for text, meta in drawn if meta["caption"] == "")
    assert [text for text, _ in texts(0)] == [text for text, _ in drawn]
    assert all(text == meta["caption"] for text, meta in texts(0, "eval", None))


def test_pick_text_joins_lists_and_falls_back_to_the_caption():
    meta = {"tags": ["red", "circle"], "title": "", "other": None}
    assert reader.pick_text("cap", meta, ("tags",), random.Random(0)) == "red, circle"
    assert reader.pick_text("cap", meta, ("title", "other", "missing"), random.Random(0)) == "cap"
    with pytest.raises(ValueError, match="text_fields must name at least one field"):
        ReaderConfig(shards="x", text_fields=())


def test_train_augmentation_is_seeded(tmp_path, tokenizer):
    write_shards(tmp_path, 3, 4)

    def run(seed):
        cfg = config(tmp_path, mode="train", seed=seed, num_workers=2, epoch_size=16)
        loader = build_loader(cfg, tokenizer=tokenizer)
        return [(b["key"], expand_crops(b, SIZE)["video"]) for b in loader]

    first, again, other = run(0), run(0), run(1)
    assert len(first) == 4
    for (keys_a, video_a), (keys_b, video_b) in zip(first, again, strict=True):
        assert keys_a == keys_b and torch.equal(video_a, video_b)
    assert any(
        keys_a != keys_b or not torch.equal(video_a, video_b)
        for (keys_a, video_a), (keys_b, video_b) in zip(first, other, strict=True)
    )


@pytest.mark.parametrize(
    "num_shards, per_shard",
    [(9, 3), (1, 13), (3, 5)],
    ids=["shards>=slots", "one-shard", "fewer-shards-than-slots"],
)
def test_eval_splits_each_sample_once_over_ranks_and_workers(
    tmp_path, tokenizer, num_shards, per_shard
):
    written = write_shards(tmp_path, num_shards, per_shard)
    per_rank = []
    for rank in range(2):
        cfg = config(tmp_path, batch_size=2, num_workers=2)
        loader = build_loader(cfg, rank=rank, world_size=2, tokenizer=tokenizer)
        with deadline(60):
            keys = keys_of(read_all(loader))
        assert len(keys) == len(set(keys))
        per_rank.append(set(keys))
        assert keys  # no rank starves
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(written.keys)


def test_resampled_with_one_shard_feeds_every_rank_and_worker(tmp_path, tokenizer):
    write_shards(tmp_path, 1, 6)
    streams = []
    for rank in range(2):
        cfg = config(tmp_path, mode="train", batch_size=2, num_workers=2, epoch_size=16)
        loader = build_loader(cfg, rank=rank, world_size=2, tokenizer=tokenizer)
        with deadline(60):
            batches = read_all(loader)
        assert len(batches) == loader.num_batches == 4  # 16 samples / (2 per batch · 2 ranks)
        streams.append(keys_of(batches))
    assert streams[0] != streams[1]  # each rank draws its own stream


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(tmp_path, tokenizer, num_workers):
    # 2 shards of 6: samples 3, 7, 11 are broken (bad mp4, bad json, no mp4); 11 is the last.
    written = write_shards(tmp_path, 2, 6, corrupt_every=4)
    assert len(written.corrupt_keys) == 3
    loader = build_loader(config(tmp_path, num_workers=num_workers), tokenizer=tokenizer)
    keys = keys_of(read_all(loader))
    assert sorted(keys) == sorted(written.keys)
    assert loader.skipped_samples == 3
    assert loader.state_dict()["skipped_samples"] == 3


def test_train_worker_gives_up_on_unreadable_data(tmp_path, tokenizer, monkeypatch):
    # Resampling never runs out of shards, so all-bad data would otherwise spin forever.
    monkeypatch.setattr(reader, "STALL_LIMIT", 30)
    write_shards(tmp_path, 2, 3, corrupt_every=1)
    loader = build_loader(config(tmp_path, mode="train", epoch_size=8), tokenizer=tokenizer)
    with deadline(60), pytest.raises(RuntimeError, match="in a row"):
        next(iter(loader))


def test_truncated_shard_is_survived(tmp_path, tokenizer):
    written = write_shards(tmp_path, 2, 6)
    damaged = written.paths[0]
    with tarfile.open(damaged) as tar:
        cut = tar.getmember(f"{sample_key(3)}.mp4").offset_data + 100
    with open(damaged, "r+b") as stream:
        stream.truncate(cut)
    loader = build_loader(config(tmp_path), tokenizer=tokenizer)
    keys = keys_of(read_all(loader))
    assert keys == [sample_key(i) for i in (0, 1, 2, 6, 7, 8, 9, 10, 11)]
    assert loader.shard_errors >= 1


def test_reads_over_http(tmp_path, tokenizer):
    written = write_shards(tmp_path, 2, 3)

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        spec = f"http://127.0.0.1:{port}/{{00000..00001}}.tar"
        with deadline(60):
            keys = keys_of(read_all(build_loader(config(spec), tokenizer=tokenizer)))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert keys == written.keys


def test_reads_from_pipe(tmp_path, tokenizer):
    written = write_shards(tmp_path, 2, 3)
    spec = f"pipe:cat {tmp_path}/{{00000..00001}}.tar"
    keys = keys_of(read_all(build_loader(config(spec), tokenizer=tokenizer)))
    assert keys == written.keys


@pytest.mark.parametrize("num_workers, copies", [(0, 1), (2, 1), (2, 2)])
def test_train_resume_replays_the_uninterrupted_stream(tmp_path, tokenizer, num_workers, copies):
    """Stopped after b batches (any b, so any worker's turn) and resumed from the saved state,
    the loader yields the very batches, videos and crops included, that the straight pass
    yields after b, through the end of the pass and into the next; corrupt samples are
    counted once; with several samples per clip as with one."""
    write_shards(tmp_path, 3, 5, corrupt_every=7)
    cfg = config(
        tmp_path, mode="train", num_workers=num_workers, epoch_size=40, samples_per_clip=copies
    )

    def batches(loader, count):
        taken = []
        while len(taken) < count:  # passes after passes, as the trainer reads
            for batch in loader:
                taken.append((batch["key"], batch["video"], batch["crops"]))
                if len(taken) == count:
                    break
        return taken

    straight_loader = build_loader(cfg, tokenizer=tokenizer)
    straight = batches(straight_loader, 14)  # 10 batches a pass: into the second one
    for stop in (4, 5):
        first = build_loader(cfg, tokenizer=tokenizer)
        batches(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # plain data
        assert state["batches_in_epoch"] == stop
        resumed = build_loader(cfg, tokenizer=tokenizer)
        resumed.load_state_dict(state)
        after = batches(resumed, 14 - stop)
        for (keys_a, video_a, crops_a), (keys_b, video_b, crops_b) in zip(
            after, straight[stop:], strict=True
        ):
            assert keys_a == keys_b and torch.equal(video_a, video_b)
            assert torch.equal(crops_a, crops_b)
    # 4 samples a batch, 4 / copies clips
    assert {len(keys) for keys, _, _ in straight} == {4 // copies}
    # 15 samples with 2 corrupt; each met once whatever the interruption
    assert resumed.skipped == straight_loader.skipped
    assert resumed.delivered == straight_loader.delivered == {"default": 14 * 4}
    # another layout or mix cannot take the positions, and the message names the field
    other = build_loader(replace(cfg, num_workers=num_workers + 1), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        build_loader(cfg, rank=0, world_size=2, tokenizer=tokenizer).load_state_dict(state)


@pytest.mark.parametrize("num_shards, per_shard", [(4, 5), (1, 17)], ids=["shards", "one-shard"])
def test_eval_resume_delivers_the_rest_once(tmp_path, tokenizer, num_shards, per_shard):
    written = write_shards(tmp_path, num_shards, per_shard, corrupt_every=6)
    cfg = config(tmp_path, batch_size=2, num_workers=2)
    first = build_loader(cfg, tokenizer=tokenizer)
    delivered = keys_of(itertools.islice(first, 3))
    state = first.state_dict()
    resumed = build_loader(cfg, tokenizer=tokenizer)
    resumed.load_state_dict(state)
    rest = keys_of(read_all(resumed))
    assert len(delivered) + len(rest) == len(written.keys)
    assert sorted(delivered + rest) == sorted(written.keys)
    assert resumed.epoch == 1
    # The next pass starts from the top again.
    assert sorted(keys_of(read_all(resumed))) == sorted(written.keys)
    # Positions are per worker: another layout cannot take them.
    other = build_loader(config(tmp_path, batch_size=2, num_workers=1), tokenizer=tokenizer)
    with pytest.raises(ValueError):
        other.load_state_dict(state)


def test_a_state_saved_before_exact_resume_is_taken_up(tmp_path, tokenizer):
    """Version 1 (a ``restarts`` count, no sources): a train state goes on with the next
    pass, since its stream cannot be replayed; eval positions still mean the same."""
    write_shards(tmp_path, 2, 5)
    train = config(tmp_path, mode="train", epoch_size=40)
    old = {"version": 1, "mode": "train", "seed": 0, "rank": 0, "world_size": 1,
           "num_workers": 0, "epoch": 2, "batches_in_epoch": 3, "restarts": 1,
           "positions": [0], "skipped_samples": 4, "shard_errors": 1}  # fmt: skip
    loader = build_loader(train, tokenizer=tokenizer)
    loader.load_state_dict(old)
    assert (loader.epoch, loader.batches_in_epoch, loader.skipped_samples) == (3, 0, 4)
    assert len(list(loader)) == 10  # a whole pass
    evaluation = build_loader(config(tmp_path), tokenizer=tokenizer)
    evaluation.load_state_dict(old | {"mode": "eval", "epoch": 0, "positions": [6]})
    assert keys_of(read_all(evaluation)) == [f"s{i:06d}" for i in range(6, 10)]
