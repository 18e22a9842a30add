"""PyAV helpers: selected-frame decode and the fused crop/resize to planar RGB."""

from __future__ import annotations

import io
import multiprocessing

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_shards.video import crop_resize_planar, decode_clip, encode_clip


def _smooth_clip(frames: int = 6, height: int = 60, width: int = 80) -> np.ndarray:
    """Gradients that survive H.264 well, different per channel and per frame."""
    y, x = np.mgrid[0:height, 0:width]
    clip = np.stack(
        [
            np.stack([x * 3 + 10 * t, y * 4, (x + y) * 2 + 5 * t], axis=-1) % 256
            for t in range(frames)
        ]
    )
    return clip.astype(np.uint8)  # (T, H, W, 3)


@pytest.fixture(scope="module")
def clip_bytes():
    return encode_clip(_smooth_clip(), 8, crf=10)


def _first_frame(data: bytes) -> av.VideoFrame:
    with av.open(io.BytesIO(data)) as container:
        return next(container.decode(video=0))


def test_select_converts_only_wanted_frames_in_order(clip_bytes):
    every = decode_clip(clip_bytes)
    picked = decode_clip(clip_bytes, select=lambda n: np.array([0, 0, n - 1]))
    assert picked.shape == (3, 60, 80, 3)
    assert np.array_equal(picked[0], every[0])
    assert np.array_equal(picked[1], every[0])
    assert np.array_equal(picked[2], every[-1])


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("box", [(0, 0, 60, 60), (10, 20, 30, 40), (5, 0, 50, 80)])
def test_crop_resize_planar_matches_a_torch_reference(clip_bytes, box, flip):
    frame = _first_frame(clip_bytes)
    out = crop_resize_planar(frame, box, 32, flip=flip)
    assert out.shape == (3, 32, 32)
    assert out.dtype == np.uint8
    top, left, height, width = box
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float()
    crop = rgb[None, :, top : top + height, left : left + width]
    reference = F.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True)[0]
    if flip:
        reference = reference.flip(-1)
    # swscale and torch filter a little differently; a wrong box, channel order or flip is off
    # by far more than this on these gradients.
    error = (torch.from_numpy(out).float() - reference).abs()
    assert error.mean() < 4.0


def _decode_in_child(data: bytes, queue) -> None:
    frame = _first_frame(data)
    queue.put(crop_resize_planar(frame, (0, 0, 60, 60), 24).shape)


def test_scaler_used_before_a_fork_still_works_in_the_child(clip_bytes):
    # A swscale context made in the parent hangs in a forked child (its threads are gone):
    # DataLoader workers are forked after the main process may have decoded.
    crop_resize_planar(_first_frame(clip_bytes), (0, 0, 60, 60), 24)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_decode_in_child, args=(clip_bytes, queue))
    child.start()
    child.join(timeout=30)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "crop_resize_planar hung in a forked child"
    assert queue.get(timeout=5) == (3, 24, 24)
