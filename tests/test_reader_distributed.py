"""The reader under two real ranks (gloo process group, each rank with two workers)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from shard_factory import write_shards

from data_shards.reader import ReaderConfig, build_loader


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_epoch(rank: int, world_size: int, port: int, shards: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = ReaderConfig(
            shards=shards, mode="eval", num_frames=4, size=32, batch_size=3, num_workers=2
        )
        loader = build_loader(config, rank=dist.get_rank(), world_size=dist.get_world_size())
        keys = [key for batch in loader for key in batch["key"]]
        gathered = [None] * world_size
        dist.all_gather_object(gathered, keys)  # the ranks finish the epoch together
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"mine": keys, "all": gathered}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("num_shards", [5, 1])
def test_two_ranks_two_workers_read_each_sample_once(tmp_path, num_shards):
    written = write_shards(
        tmp_path / "shards", num_shards=num_shards, samples_per_shard=14 // num_shards + 1
    )
    mp.start_processes(
        _read_epoch,
        args=(2, _free_port(), str(tmp_path / "shards"), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    rank0, rank1 = results[0]["mine"], results[1]["mine"]
    assert rank0 and rank1, "a rank got no data"
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(written.keys)
    assert results[0]["all"] == results[1]["all"] == [rank0, rank1]
