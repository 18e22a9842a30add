"""Video I/O on PyAV: probe, cut sources into clips, encode clips, decode clips.

Everything that touches a codec lives here, so the shard builder, the streaming reader, the
synthetic dataset and the tests share one notion of rotation, timing and pixel layout.
Frames are uint8 RGB arrays shaped ``(T, H, W, 3)`` throughout this module.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# One scaler per process: ``frame.reformat`` builds a new swscale context for every frame, a
# kept reformatter reuses it while the sizes stay the same (all frames of a clip). Keyed by
# process id because a context made before a fork (DataLoader workers) can hang in the child:
# its swscale threads are not copied.
_REFORMATTERS: dict[int, VideoReformatter] = {}


def _reformatter() -> VideoReformatter:
    return _REFORMATTERS.setdefault(os.getpid(), VideoReformatter())


class VideoError(RuntimeError):
    """A source that cannot be turned into clips (undecodable, empty, not a video)."""


@dataclass(frozen=True)
class VideoInfo:
    duration: float
    """Seconds, from the container or the stream (0.0 when neither knows)."""
    fps: float
    """Average frame rate the container declares."""
    width: int
    """Coded width, before display rotation."""
    height: int
    rotation: int
    """Counter-clockwise display rotation in degrees (0, 90, 180, 270)."""
    codec: str
    has_audio: bool


@dataclass
class SourceClip:
    start: float
    """Seconds from the start of the source."""
    end: float
    frames: np.ndarray
    """(T, H, W, 3) uint8, rotated upright, resized, resampled to ``fps``."""
    fps: float
    audio: list[av.AudioFrame] | None = None


def _open(source: str | BinaryIO, timeout: float = 30.0) -> av.container.InputContainer:
    try:
        return av.open(source, mode="r", timeout=timeout)
    except av.error.FFmpegError as err:
        raise VideoError(f"cannot open: {err}") from err


def _stream_duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def probe(source: str | BinaryIO) -> VideoInfo:
    with _open(source) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        rotation = 0
        for frame in container.decode(stream):
            rotation = _normalize_rotation(frame.rotation)
            break
        return VideoInfo(
            duration=_stream_duration(container, stream),
            fps=float(stream.average_rate or 0.0),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            rotation=rotation,
            codec=stream.codec_context.name,
            has_audio=bool(container.streams.audio),
        )


def _normalize_rotation(rotation: float | int | None) -> int:
    if not rotation:
        return 0
    return int(round(rotation / 90.0)) % 4 * 90


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side``, both even (yuv420p needs it)."""
    if short_side is None or short_side <= 0:
        return width - width % 2, height - height % 2
    scale = short_side / min(width, height)
    new_w = max(2, int(round(width * scale / 2)) * 2)
    new_h = max(2, int(round(height * scale / 2)) * 2)
    return new_w, new_h


def clip_windows(
    duration: float, clip_seconds: float, clips_per_video: int
) -> list[tuple[float, float]]:
    """Non-overlapping windows of at most ``clip_seconds``, spread evenly over the source.

    A source shorter than one window gives a single clip covering all of it; a source too short
    for ``clips_per_video`` windows gives as many as fit.
    """
    if duration <= clip_seconds:
        return [(0.0, duration)]
    count = max(1, min(clips_per_video, int(duration // clip_seconds)))
    span = duration / count
    windows = []
    for i in range(count):
        center = (i + 0.5) * span
        start = min(max(0.0, center - clip_seconds / 2), duration - clip_seconds)
        windows.append((start, start + clip_seconds))
    return windows


def read_clips(
    source: str | BinaryIO,
    *,
    clip_seconds: float,
    clips_per_video: int = 1,
    fps: float = 8.0,
    short_side: int | None = 224,
    keep_audio: bool = False,
) -> tuple[VideoInfo, list[SourceClip]]:
    """Decode ``source`` once and cut it into upright, resized clips sampled at ``fps``.

    Frame sampling is by presentation time, so variable-frame-rate sources come out evenly
    spaced: each output frame is the latest source frame shown at or before its timestamp.
    Only the frames that are kept are converted to RGB.
    """
    info = probe(source) if isinstance(source, str) else None
    if not isinstance(source, str):
        source.seek(0)
        info = probe(source)
        source.seek(0)
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        duration = info.duration
        if duration <= 0:
            duration = _scan_duration(container, stream)
            container.seek(0)
        if duration <= 0:
            raise VideoError("zero-length video")
        windows = clip_windows(duration, clip_seconds, clips_per_video)
        # Target timestamps for every clip, merged in time order: (time, clip index, slot).
        targets: list[tuple[float, int, int]] = []
        for clip_index, (start, end) in enumerate(windows):
            count = max(1, int(math.floor((end - start) * fps + 1e-6)))
            targets.extend((start + k / fps, clip_index, k) for k in range(count))
        targets.sort()
        slots: list[list[np.ndarray | None]] = [
            [None] * sum(1 for t in targets if t[1] == i) for i in range(len(windows))
        ]

        out_size: tuple[int, int] | None = None
        rotation = info.rotation
        pending = 0
        previous = None
        previous_rgb = None

        def to_rgb(frame: av.VideoFrame) -> np.ndarray:
            nonlocal out_size
            if out_size is None:
                width, height = frame.width, frame.height
                if rotation in (90, 270):
                    width, height = height, width
                upright_w, upright_h = scaled_size(width, height, short_side)
                out_size = (
                    (upright_h, upright_w) if rotation in (90, 270) else (upright_w, upright_h)
                )
            rgb = frame.to_ndarray(width=out_size[0], height=out_size[1], format="rgb24")
            return np.rot90(rgb, k=rotation // 90) if rotation else rgb

        decoded_any = False
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                decoded_any = True
                while pending < len(targets) and targets[pending][0] < frame.time:
                    chosen = previous if previous is not None else frame
                    if chosen is previous:
                        if previous_rgb is None:
                            previous_rgb = to_rgb(previous)
                        rgb = previous_rgb
                    else:
                        rgb = to_rgb(frame)
                    _, clip_index, slot = targets[pending]
                    slots[clip_index][slot] = rgb
                    pending += 1
                previous, previous_rgb = frame, None
                if pending == len(targets):
                    break
        except av.error.FFmpegError as err:
            if not decoded_any:
                raise VideoError(f"cannot decode: {err}") from err
            # A truncated file: keep the frames decoded before the damage.
        if previous is not None:
            last_rgb = previous_rgb if previous_rgb is not None else to_rgb(previous)
            while pending < len(targets):
                _, clip_index, slot = targets[pending]
                slots[clip_index][slot] = last_rgb
                pending += 1
        if not decoded_any:
            raise VideoError("no decodable video frames")

    audio = _read_audio(source, windows) if keep_audio and info.has_audio else [None] * len(windows)
    clips = [
        SourceClip(
            start=start,
            end=end,
            frames=np.ascontiguousarray(np.stack(frames)),
            fps=fps,
            audio=clip_audio,
        )
        for (start, end), frames, clip_audio in zip(windows, slots, audio, strict=True)
    ]
    return info, clips


def _scan_duration(container, stream) -> float:
    last = 0.0
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            last = max(last, end)
    return last


def _read_audio(source, windows):
    if not isinstance(source, str):
        source.seek(0)
    per_clip: list[list[av.AudioFrame]] = [[] for _ in windows]
    with _open(source) as container:
        for frame in container.decode(audio=0):
            if frame.time is None:
                continue
            for clip_index, (start, end) in enumerate(windows):
                if start <= frame.time < end:
                    per_clip[clip_index].append(frame)
    return per_clip


def encode_clip(frames: np.ndarray, fps: float, **options) -> bytes:
    """Encode ``(T, H, W, 3)`` uint8 frames to an in-memory video file: ``write_video`` into
    a buffer, with its options (an mp4 unless ``container_format`` says otherwise).

    The H.264 defaults favour training-time decode speed: yuv420p, a keyframe every
    ``gop`` frames (one second by default), ``tune=fastdecode`` (no CABAC, no deblocking).
    """
    buffer = io.BytesIO()
    write_video(buffer, frames, fps, **{"container_format": "mp4", **options})
    return buffer.getvalue()


def write_video(
    target: str | BinaryIO,
    frames: np.ndarray,
    fps: float,
    *,
    codec: str = "libx264",
    crf: int = 23,
    gop: int | None = None,
    rotation: int = 0,
    audio: list[av.AudioFrame] | None = None,
    audio_tone_hz: float | None = None,
    frame_times: list[float] | None = None,
    container_format: str | None = None,
) -> None:
    """Write frames to a file or buffer.

    ``frame_times`` (seconds, increasing) gives each frame its own timestamp: a variable frame
    rate. ``audio_tone_hz`` adds a mono sine track (tests); ``audio`` re-encodes decoded audio.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    rate = Fraction(fps).limit_denominator(1001)
    fmt = container_format or (
        None if isinstance(target, str) else ("webm" if codec == "libvpx-vp9" else "mp4")
    )
    with av.open(target, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        options = {}
        if codec == "libx264":
            # cpu-independent=1: without it the same frames encode to different bytes from run
            # to run on this hardware, even with one thread, and shard builds must reproduce.
            options = {
                "crf": str(crf),
                "preset": "veryfast",
                "tune": "fastdecode",
                "x264-params": "cpu-independent=1",
            }
        elif codec == "libvpx-vp9":
            options = {"crf": str(crf + 10), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        elif codec == "libsvtav1":
            options = {"crf": str(crf + 12), "preset": "12"}
        stream.options = options
        stream.gop_size = gop or max(1, int(round(fps)))
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream = None
        if audio:
            audio_stream = container.add_stream("aac", rate=audio[0].sample_rate)
        elif audio_tone_hz is not None:
            audio_stream = container.add_stream("aac", rate=16000)
            audio_stream.layout = "mono"
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if frame_times is not None:
                frame.pts = int(round(frame_times[index] * 1000))
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            for frame in audio or _tone(audio_tone_hz, len(frames) / fps, 16000):
                frame.pts = None
                for packet in audio_stream.encode(frame):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)


def _tone(hz: float, seconds: float, sample_rate: int) -> list[av.AudioFrame]:
    samples = np.sin(2 * np.pi * hz * np.arange(int(seconds * sample_rate)) / sample_rate)
    pcm = (samples * 0.3).astype(np.float32)
    frames = []
    for offset in range(0, len(pcm), 1024):
        chunk = pcm[offset : offset + 1024][None, :]
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frames.append(frame)
    return frames


def decode_clip(
    data: bytes,
    max_frames: int | None = None,
    threads: int = 1,
    select: Callable[[int], np.ndarray] | None = None,
    convert: Callable[[av.VideoFrame], np.ndarray] | None = None,
) -> np.ndarray:
    """Decode an encoded clip to ``(T, H, W, 3)`` uint8, upright (``decode_frames``, stacked)."""
    return np.stack(decode_frames(data, max_frames, threads, select, convert))


def decode_frames(
    data: bytes,
    max_frames: int | None = None,
    threads: int = 1,
    select: Callable[[int], np.ndarray] | None = None,
    convert: Callable[[av.VideoFrame], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Decode an encoded clip to a list of ``(H, W, 3)`` uint8 frames, upright.

    ``max_frames`` stops decoding early when the caller only needs a prefix. ``select`` maps the
    clip's frame count to the frame indices wanted (sorted, repeats allowed): every frame is
    still decoded (inter prediction needs them) but only the selected ones are converted to RGB,
    which is most of the per-frame cost for small clips. ``convert`` replaces the RGB
    conversion (e.g. ``crop_resize_planar``); the caller then owns the display rotation.
    A repeated index gives the same array twice.
    """
    to_array = convert or upright_rgb
    frames: list[np.ndarray] = []
    rgb_by_index: dict[int, np.ndarray] = {}
    wanted: np.ndarray | None = None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            if threads > 1:
                stream.thread_type = "AUTO"
                stream.thread_count = threads
            if select is not None and stream.frames > 0:
                wanted = np.asarray(select(stream.frames))
            wanted_set = set(wanted.tolist()) if wanted is not None else None
            index = -1
            for index, frame in enumerate(container.decode(stream)):
                if wanted_set is None:
                    frames.append(to_array(frame))
                elif index in wanted_set:
                    rgb_by_index[index] = to_array(frame)
                if max_frames is not None and index + 1 >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as err:
        raise VideoError(f"cannot decode clip: {err}") from err
    if wanted is not None:
        if len(rgb_by_index) < len(wanted_set):
            # Fewer frames than the header promised (a damaged clip): select from what decoded.
            if index < 0:
                raise VideoError("clip has no frames")
            every_frame = decode_frames(data, threads=threads, convert=convert)
            return [every_frame[i] for i in np.asarray(select(len(every_frame))).tolist()]
        frames = [rgb_by_index[i] for i in wanted.tolist()]
    elif select is not None and frames:
        frames = [frames[i] for i in np.asarray(select(len(frames))).tolist()]
    if not frames:
        raise VideoError("clip has no frames")
    return frames


def upright_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB with the display rotation applied.

    Converted by the process's kept scaler (0.2 vs 0.5 ms a 298×224 frame for
    ``frame.to_ndarray``, which builds a scaler per frame) and returned as a view of the
    converted frame's buffer: no copy is made here, the caller's stack makes the one copy.
    """
    rgb_frame = _reformatter().reformat(frame, format="rgb24")
    plane = rgb_frame.planes[0]
    height, width = rgb_frame.height, rgb_frame.width
    rows = np.frombuffer(plane, np.uint8, count=height * plane.line_size)
    rgb = rows.reshape(height, plane.line_size)[:, : width * 3].reshape(height, width, 3)
    rotation = _normalize_rotation(frame.rotation)
    return np.ascontiguousarray(np.rot90(rgb, k=rotation // 90)) if rotation else rgb


def crop_resize_planar(
    frame: av.VideoFrame, box: tuple[int, int, int, int], size: int, flip: bool = False
) -> np.ndarray:
    """(3, size, size) uint8 RGB: the ``box`` (top, left, height, width) of ``frame``, resized.

    The resize and the colour conversion happen in one swscale call, to planar RGB, so no
    interleaved-to-planar transpose is left to do. The whole frame is scaled so that the box
    comes out at ``size`` × ``size``, then the box is sliced out. Ignores display rotation.
    """
    top, left, box_height, box_width = box
    scale_x, scale_y = size / box_width, size / box_height
    full_width = max(size, round(frame.width * scale_x))
    full_height = max(size, round(frame.height * scale_y))
    scaled = _reformatter().reformat(
        frame, width=full_width, height=full_height, format="gbrp", interpolation="BILINEAR"
    )
    x0 = min(round(left * scale_x), full_width - size)
    y0 = min(round(top * scale_y), full_height - size)
    columns = slice(x0 + size - 1, x0 - 1 if x0 else None, -1) if flip else slice(x0, x0 + size)
    green, blue, red = (
        np.frombuffer(plane, np.uint8, count=full_height * plane.line_size).reshape(
            full_height, plane.line_size
        )[y0 : y0 + size, columns]
        for plane in scaled.planes
    )
    return np.stack([red, green, blue])
