"""Which frames of a clip a sample takes, and the centre crop of an evaluation frame.

Shared by the reader's workers and by serving (``pretrain.pyfunc``), so that a clip embedded
at serving time is sampled and cropped as evaluation batches are.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from data_shards.augment import center_crop, center_crop_box
from data_shards.video import crop_resize_planar, upright_rgb


def uniform_frame_indices(available: int, num_frames: int) -> np.ndarray:
    """The centre frame of each of ``num_frames`` equal segments; repeats when too few."""
    return ((np.arange(num_frames) + 0.5) * available / num_frames).astype(np.int64)


def segment_frame_indices(available: int, num_frames: int, rng: random.Random) -> np.ndarray:
    """One random frame from each of ``num_frames`` equal segments (TSN sampling).

    With fewer frames than segments the segments are shorter than a frame and indices repeat.
    """
    offsets = np.array([rng.random() for _ in range(num_frames)])
    indices = ((np.arange(num_frames) + offsets) * available / num_frames).astype(np.int64)
    return np.minimum(indices, available - 1)


class ClipCropper:
    """Frame → (C, size, size) uint8 for one clip: the centre square of every frame, resized.

    Frames go straight from the decoder through one swscale call (resize + planar RGB);
    frames with a display rotation (rare: the shard builder writes upright clips) take the
    slower upright-RGB path. Training crops are cut elsewhere (``data_shards.augment``).
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, frame) -> np.ndarray:
        if frame.rotation:
            rgb = torch.from_numpy(upright_rgb(frame)).permute(2, 0, 1)  # (C, H, W)
            return center_crop(rgb[None], self.size)[0].numpy()
        box = center_crop_box(frame.height, frame.width)
        return crop_resize_planar(frame, box, self.size)
