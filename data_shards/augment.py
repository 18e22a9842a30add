"""Spatial augmentation of clips: crop boxes, resizing, and the training crops of a batch.

Train batches leave the reader at the shards' resolution with one crop box per training
sample (``crops``); ``expand_crops`` cuts and resizes them where the batch is, on the
accelerator in training: there it costs microseconds, in a reader process it cost more than
decoding the clip (``launch/bench_loader.py``), and with several samples per clip it would be
paid once per sample.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F

CROP_FIELDS = ("top", "left", "height", "width", "flip")
"""The columns of a batch's ``crops`` tensor."""


def random_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random box, drawn as torchvision's RandomResizedCrop does.

    Falls back to the largest centred box of an allowed aspect ratio after ten misses.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    crop_w, crop_h = width, height
    if width / height > aspect:
        crop_w = round(height * aspect)
    else:
        crop_h = round(width / aspect)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The centred square: resizing it is the same picture as resize-short-side-then-crop."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def resize_square(clip: torch.Tensor, size: int, through_float: bool | None = None) -> torch.Tensor:
    """(T, C, h, w) uint8 → (T, C, size, size) uint8, bilinear, in one call for all frames.

    On the CPU torch resizes uint8 directly (its fastest path); elsewhere (``through_float``)
    in float32, rounded back.
    """
    height, width = clip.shape[-2:]
    if (height, width) == (size, size):
        return clip
    # Antialiasing only matters, and only costs, when shrinking.
    options = {"size": (size, size), "mode": "bilinear", "align_corners": False}
    options["antialias"] = height > size or width > size
    if through_float is None:
        through_float = clip.device.type != "cpu"
    if not through_float:
        return F.interpolate(clip, **options)
    resized = F.interpolate(clip.float(), **options)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop(
    clip: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> torch.Tensor:
    """(T, C, H, W) → (T, C, size, size): one random box for all frames, cut before resizing."""
    top, left, height, width = random_crop_box(*clip.shape[-2:], scale, ratio, rng)
    return resize_square(clip[:, :, top : top + height, left : left + width], size)


def center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """(T, C, H, W) → (T, C, size, size): the short side resized to ``size``, centre kept."""
    top, left, height, width = center_crop_box(*clip.shape[-2:])
    return resize_square(clip[:, :, top : top + height, left : left + width], size)


def expand_crops(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """A train batch of clips → its batch of training samples, on the device of its video.

    In: ``video`` uint8 (clips, T, C, H, W) at the shards' resolution (zero-padded to the
    batch's largest clip), ``crops`` long (clips, k, 5) on the CPU, one row of
    ``CROP_FIELDS`` per sample, and one caption per clip. Out: ``video`` uint8
    (clips·k, T, C, size, size), the tokens and the per-clip lists repeated k times (copies of
    a clip are adjacent), and ``clip_group`` long (clips·k,): the clip each sample was cut
    from, which the contrastive loss needs so that copies are not each other's negatives.
    """
    video, crops = batch["video"], batch["crops"]
    clips, copies = crops.shape[:2]
    samples = torch.empty(
        (clips * copies, *video.shape[1:3], size, size), dtype=torch.uint8, device=video.device
    )  # (B, T, C, size, size)
    for index, (top, left, height, width, flip) in enumerate(crops.reshape(-1, 5).tolist()):
        region = video[index // copies, :, :, top : top + height, left : left + width]
        resized = resize_square(region, size)
        samples[index] = resized.flip(-1) if flip else resized
    expanded = dict(batch)
    del expanded["crops"]
    expanded["video"] = samples
    for key in ("input_ids", "attention_mask"):
        if key in batch:
            expanded[key] = batch[key].repeat_interleave(copies, dim=0)
    for key in ("text", "key", "item_id", "meta"):
        if key in batch:
            expanded[key] = [value for value in batch[key] for _ in range(copies)]
    expanded["clip_group"] = torch.arange(clips, device=video.device).repeat_interleave(copies)
    return expanded
