"""``vidrec shards inspect``: what a shard set holds, whether it decodes, and what it looks like."""

from __future__ import annotations

import io
import json
import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_shards.atomic import atomic_write_bytes
from data_shards.shard_set import iter_samples, list_shards
from data_shards.video import VideoError, decode_clip

log = logging.getLogger(__name__)


@dataclass
class ShardReport:
    directory: str
    shards: int = 0
    samples: int = 0
    failed_inputs: int = 0
    clip_seconds: dict[str, float] = field(default_factory=dict)
    resolutions: dict[str, int] = field(default_factory=dict)
    fps: dict[str, int] = field(default_factory=dict)
    empty_captions: int = 0
    bad_metadata: int = 0
    """Samples whose json does not parse."""
    mean_caption_words: float = 0.0
    decode_checked: int = 0
    decode_failed: int = 0
    decode_seconds_per_clip: float = 0.0
    contact_sheet: str | None = None


def inspect_shards(
    directory: str | Path,
    *,
    decode_samples: int = 32,
    sheet_clips: int = 8,
    sheet_frames: int = 6,
    sheet_path: str | Path | None = None,
) -> ShardReport:
    directory = Path(directory)
    paths = list_shards(directory)
    report = ShardReport(directory=str(directory), shards=len(paths))
    failures = directory / "failures.jsonl"
    if failures.is_file():
        report.failed_inputs = sum(1 for line in failures.read_text().splitlines() if line)

    durations, caption_words = [], []
    resolutions, rates = Counter(), Counter()
    sheet_rows: list[tuple[np.ndarray, str]] = []
    decode_time = 0.0
    for sample in iter_samples(paths):
        report.samples += 1
        caption = sample.get("txt", b"").decode("utf-8", errors="replace")
        caption_words.append(len(caption.split()))
        report.empty_captions += not caption.strip()
        try:
            metadata = json.loads(sample["json"]) if "json" in sample else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            report.bad_metadata += 1
            log.warning("sample %s has unreadable json: %s", sample["__key__"], err)
            metadata = {}
        if "clip_start" in metadata and "clip_end" in metadata:
            durations.append(metadata["clip_end"] - metadata["clip_start"])
        if "width" in metadata:
            resolutions[f"{metadata['width']}x{metadata['height']}"] += 1
        if "fps" in metadata:
            rates[str(metadata["fps"])] += 1
        if report.decode_checked < decode_samples:
            report.decode_checked += 1
            started = time.perf_counter()
            try:
                frames = decode_clip(sample["mp4"])
            except (VideoError, KeyError) as err:
                report.decode_failed += 1
                log.warning("sample %s does not decode: %s", sample["__key__"], err)
                continue
            decode_time += time.perf_counter() - started
            if len(sheet_rows) < sheet_clips:
                sheet_rows.append((frames, f"{sample['__key__']}: {caption}"))

    if durations:
        report.clip_seconds = {
            "total": round(sum(durations), 2),
            "mean": round(statistics.fmean(durations), 3),
            "min": round(min(durations), 3),
            "max": round(max(durations), 3),
        }
    report.resolutions = dict(resolutions.most_common())
    report.fps = dict(rates.most_common())
    report.mean_caption_words = round(statistics.fmean(caption_words), 2) if caption_words else 0
    decoded = report.decode_checked - report.decode_failed
    report.decode_seconds_per_clip = round(decode_time / decoded, 5) if decoded else 0.0
    if sheet_rows:
        target = Path(sheet_path) if sheet_path else directory / "contact_sheet.png"
        atomic_write_bytes(target, contact_sheet(sheet_rows, sheet_frames))
        report.contact_sheet = str(target)
    return report


def contact_sheet(rows: list[tuple[np.ndarray, str]], frames_per_row: int = 6) -> bytes:
    """PNG bytes: one row per clip (frames evenly spaced over it) with its caption above."""
    tile = 112
    caption_height = 18
    font = _caption_font(12)
    width = frames_per_row * tile
    sheet = Image.new("RGB", (width, len(rows) * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for row_index, (frames, caption) in enumerate(rows):
        top = row_index * (tile + caption_height)
        draw.text((4, top + 2), _fit(draw, caption, font, width - 8), fill="black", font=font)
        picks = np.linspace(0, len(frames) - 1, frames_per_row).round().astype(int)
        for column, frame_index in enumerate(picks):
            image = Image.fromarray(frames[frame_index])
            scale = tile / max(image.size)
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR,
            )
            left = column * tile + (tile - image.width) // 2
            sheet.paste(image, (left, top + caption_height + (tile - image.height) // 2))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _caption_font(size: int):
    """DejaVu Sans from matplotlib's data (wide Unicode coverage), else Pillow's default."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def format_report(report: ShardReport) -> str:
    lines = [
        f"shards: {report.shards}   samples: {report.samples}   "
        f"failed inputs: {report.failed_inputs}",
        f"clip seconds: {report.clip_seconds or 'n/a'}",
        f"resolutions: {report.resolutions or 'n/a'}   fps: {report.fps or 'n/a'}",
        f"captions: {report.empty_captions} empty, {report.mean_caption_words} words on average"
        f"   unreadable json: {report.bad_metadata}",
        f"decode check: {report.decode_checked - report.decode_failed}/{report.decode_checked} "
        f"decoded, {report.decode_seconds_per_clip * 1000:.1f} ms per clip",
    ]
    if report.contact_sheet:
        lines.append(f"contact sheet: {report.contact_sheet}")
    return "\n".join(lines)
