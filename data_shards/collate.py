"""Decoded samples → one batch: frames stacked once into shared memory, captions tokenized
together, and the reader's bookkeeping (slot, position, sources, failures) beside them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate


def sum_skipped(tallies: Sequence[tuple[list[int], int]]) -> list[int]:
    return [sum(column) for column in zip(*(skipped for skipped, _ in tallies), strict=True)]


def stack_frames(samples: list[dict[str, Any]]) -> torch.Tensor:
    """Train samples' frames → (B, T, C, H, W) uint8, channels last in memory (as decoded).

    One copy, by ``default_collate``, which stacks into shared memory inside a worker: no
    extra copy to hand the batch to the main process. Clips of different sizes are
    zero-padded at the bottom and right to the largest; their crop boxes stay inside them.
    """
    height = max(sample["frames"][0].shape[0] for sample in samples)
    width = max(sample["frames"][0].shape[1] for sample in samples)
    frames = []
    for sample in samples:
        for frame in sample["frames"]:
            if frame.shape[:2] != (height, width):
                padding = ((0, height - frame.shape[0]), (0, width - frame.shape[1]), (0, 0))
                frame = np.pad(frame, padding)
            frames.append(torch.from_numpy(frame))
    stacked = default_collate(frames)  # (B·T, H, W, C)
    return stacked.view(len(samples), -1, height, width, 3).permute(0, 1, 4, 2, 3)


class Collate:
    """Samples → one batch; captions are tokenized here, all at once, not per sample."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [sample["text"] for sample in samples]
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        positions = [sample["__position__"] for sample in samples]
        tallies = [sample["__tally__"] for sample in samples]
        batch = {
            "input_ids": tokens["input_ids"].long(),  # (B, L)
            "attention_mask": tokens["attention_mask"].long(),  # (B, L)
            "text": texts,
            "key": [sample["key"] for sample in samples],
            "item_id": [sample["item_id"] for sample in samples],
            "meta": [sample["meta"] for sample in samples],
            "_reader": {
                "slot": samples[0]["__slot__"],
                "end_position": None if positions[0] is None else max(positions) + 1,
                "sources": [sample["__source__"] for sample in samples],
                "skipped": sum_skipped(tallies),
                "shard_errors": sum(shard_errors for _, shard_errors in tallies),
            },
        }
        if "frames" in samples[0]:
            batch["video"] = stack_frames(samples)  # (B, T, C, H, W), shards' resolution
            batch["crops"] = torch.tensor([sample["crops"] for sample in samples])  # (B, k, 5)
        else:
            # stacked into shared memory inside a worker, as above
            batch["video"] = default_collate([sample["video"] for sample in samples])
        return batch
