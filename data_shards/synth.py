"""The deterministic synthetic dataset: moving-shape videos, varied captions, synthetic users.

Every item is a short real H.264 video of one flat shape moving in a straight line over a flat
background. Its six attributes (shape, colour, size, background, direction, speed) are drawn
from a seeded RNG and described by captions in varied wording, so video-text retrieval is
learnable but not a lookup of one template. Users like colours, a shape, a kind of motion and a
speed; their histories follow those tastes mixed with Zipf popularity. A share of items
(cold-start) appear only as some users' final interaction, after a global cutoff, so only a
content-based recommender can rank them.

Files written into ``out_dir``:

- ``videos/<item_id>.mp4``
- ``manifest.jsonl``: ``video`` (relative), ``caption``, ``key``, ``item_id``, ``title``,
  ``tags`` (comma-separated), the six attributes and ``cold_start``; input to the shard builder.
- ``manifest_warm.jsonl`` / ``manifest_cold.jsonl``: the same rows split by ``cold_start``
  (pretraining shards from the warm items, held-out evaluation shards from the cold ones).
- ``items.jsonl``: the catalogue (the same rows, attributes nested).
- ``interactions.csv``: ``user_id,item_id,timestamp,label,weight`` sorted by user, then time.
- ``users.jsonl``: each user's ground-truth preferences (for tests and analysis only).
- ``synth.json``: settings, counts, cold-start item ids, the cutoff, the preference model.

The same arguments give byte-identical text files and identical decoded frames.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_shards.atomic import atomic_write_bytes, atomic_write_text, make_output_dir
from data_shards.video import write_video

logger = logging.getLogger(__name__)

SYNTH_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Far apart in RGB and in YUV chroma, so they survive 4:2:0 subsampling at 48 px.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
}
BACKGROUNDS = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "grey": (110, 110, 110),
    "beige": (215, 195, 150),
}
SIZES = ("small", "large")
# Image coordinates: x to the right, y downwards.
DIRECTIONS = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
}
SPEEDS = ("slow", "fast")
MOTIONS = ("horizontal", "vertical", "diagonal")

# Shape radius as a fraction of the frame side.
RADIUS = {"small": 0.1, "large": 0.2}
# Distance travelled over the whole video along each moving axis, as a fraction of the frame
# side; "fast" still fits a large shape inside the frame (0.5 <= 1 - 2 * 0.2).
TRAVEL = {"slow": 0.22, "fast": 0.5}
# Shapes are drawn this many times larger and box-filtered down: sub-pixel motion and soft edges
# instead of one-pixel jumps on slow items.
SUPERSAMPLE = 4

SHAPE_WORDS = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid", "three-sided shape"),
    "star": ("star", "five-pointed star", "starburst"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "cross": ("cross", "plus sign", "plus"),
}
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "cobalt", "sapphire"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "tangerine", "amber"),
    "cyan": ("cyan", "turquoise", "aqua"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
BACKGROUND_WORDS = {
    "black": ("black", "dark", "jet-black"),
    "white": ("white", "bright white", "pale"),
    "grey": ("grey", "gray", "ash-grey"),
    "beige": ("beige", "sand-coloured", "cream"),
}
# Adverbial phrases ("moves ___") and adjectives ("___ motion") per direction.
DIRECTION_PHRASES = {
    "left": ("to the left", "leftward", "toward the left edge"),
    "right": ("to the right", "rightward", "toward the right edge"),
    "up": ("upward", "up", "toward the top"),
    "down": ("downward", "down", "toward the bottom"),
    "up-left": ("up and to the left", "diagonally toward the top left", "up-left"),
    "up-right": ("up and to the right", "diagonally toward the top right", "up-right"),
    "down-left": ("down and to the left", "diagonally toward the bottom left", "down-left"),
    "down-right": ("down and to the right", "diagonally toward the bottom right", "down-right"),
}
DIRECTION_ADJECTIVES = {
    "left": ("leftward", "right-to-left"),
    "right": ("rightward", "left-to-right"),
    "up": ("upward", "bottom-to-top"),
    "down": ("downward", "top-to-bottom"),
    "up-left": ("up-left diagonal", "upper-left"),
    "up-right": ("up-right diagonal", "upper-right"),
    "down-left": ("down-left diagonal", "lower-left"),
    "down-right": ("down-right diagonal", "lower-right"),
}
SPEED_ADVERBS = {
    "slow": ("slowly", "gently", "leisurely"),
    "fast": ("quickly", "rapidly", "swiftly"),
}
SPEED_ADJECTIVES = {"slow": ("slow", "gentle", "unhurried"), "fast": ("fast", "quick", "rapid")}
VERBS = ("moves", "glides", "travels", "slides")

# Each template uses every attribute once; word choice and order vary between them.
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} {verb} {speed_adv} {direction} on a {background} background",
    "{Speed_adj} {direction_adj} motion: {size} {colour} {shape} over {background}",
    "On a {background} backdrop, a {size} {colour} {shape} {verb} {direction}, {speed_adv}",
    "{Direction}: a {speed_adj} {colour} {shape}, {size}, against a {background} backdrop",
    "video of a {colour} {shape} ({size}) moving {speed_adv} {direction}; the background is "
    "{background}",
    "{Size} {shape} in {colour} {verb} {direction} {speed_adv} across a {background} scene",
)

# Interaction model (also written to synth.json).
PREFERENCE_WEIGHTS = {"colour": 2.5, "shape": 1.5, "motion": 1.0, "speed": 0.5}
POPULARITY_MIX = 0.25
"""Share of each user's item distribution that is Zipf popularity instead of taste."""
ZIPF_EXPONENT = 1.0
HISTORY_LENGTH = (5, 30)
"""Engaged warm interactions per user, inclusive, capped by the number of warm items."""
SKIP_RATE = 0.1
"""Expected skipped (label 0) rows per engaged row; skips are popular items of unliked colours."""
START_TIMESTAMP = 1_700_000_000
WARM_WINDOW_SECONDS = 120 * 86_400
GAP_SECONDS = (600, 3 * 86_400)
"""Between consecutive interactions of one user; shorter for histories too long for the window."""
COLD_WINDOW_SECONDS = 7 * 86_400


@dataclass(frozen=True)
class Item:
    item_id: str
    shape: str
    colour: str
    size: str
    background: str
    direction: str
    speed: str
    start: tuple[float, float]
    """Shape centre at the first frame, as fractions of the frame side (x, y)."""
    cold_start: bool
    caption: str

    @property
    def motion(self) -> str:
        dx, dy = DIRECTIONS[self.direction]
        return "diagonal" if dx and dy else ("horizontal" if dx else "vertical")

    @property
    def attributes(self) -> dict[str, str]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "background": self.background,
            "direction": self.direction,
            "speed": self.speed,
        }

    @property
    def title(self) -> str:
        return f"{self.size.capitalize()} {self.colour} {self.shape}, {self.direction}"

    @property
    def tags(self) -> str:
        return ",".join(
            [self.shape, self.colour, self.size, self.direction, self.speed, self.motion]
            + [f"{self.background}-background"]
        )


@dataclass(frozen=True)
class User:
    user_id: str
    colours: tuple[str, ...]
    shape: str
    motion: str
    speed: str


def centre_at(item: Item, t: float) -> tuple[float, float]:
    """Shape centre (fractions of the frame side) at ``t`` in [0, 1] of the video."""
    dx, dy = DIRECTIONS[item.direction]
    travel = TRAVEL[item.speed]
    return item.start[0] + dx * travel * t, item.start[1] + dy * travel * t


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with a size of about ``r``; circles excluded."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = (-90, 30, 150)
        return [
            (cx + 1.1 * r * math.cos(math.radians(a)), cy + 1.1 * r * math.sin(math.radians(a)))
            for a in angles
        ]
    if shape == "star":
        points = []
        for k in range(10):
            radius = 1.15 * r if k % 2 == 0 else 0.5 * r
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "diamond":
        return [(cx, cy - 1.1 * r), (cx + 0.8 * r, cy), (cx, cy + 1.1 * r), (cx - 0.8 * r, cy)]
    if shape == "cross":
        a, e = 0.38 * r, r
        return [
            (cx - a, cy - e), (cx + a, cy - e), (cx + a, cy - a), (cx + e, cy - a),
            (cx + e, cy + a), (cx + a, cy + a), (cx + a, cy + e), (cx - a, cy + e),
            (cx - a, cy + a), (cx - e, cy + a), (cx - e, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def render_frames(item: Item, num_frames: int, size: int) -> np.ndarray:
    """The item's video as (T, size, size, 3) uint8 frames."""
    canvas = size * SUPERSAMPLE
    radius = RADIUS[item.size] * canvas
    fill = COLOURS[item.colour]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for index in range(num_frames):
        t = index / max(1, num_frames - 1)
        cx, cy = (coord * canvas for coord in centre_at(item, t))
        image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[item.background])
        draw = ImageDraw.Draw(image)
        if item.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon(_shape_polygon(item.shape, cx, cy, radius), fill=fill)
        frames[index] = np.asarray(image.resize((size, size), Image.Resampling.BOX))
    return frames


def _caption(rng: np.random.Generator, attributes: dict[str, str]) -> str:
    def pick(options: tuple[str, ...]) -> str:
        return options[rng.integers(len(options))]

    words = {
        "size": pick(SIZE_WORDS[attributes["size"]]),
        "colour": pick(COLOUR_WORDS[attributes["colour"]]),
        "shape": pick(SHAPE_WORDS[attributes["shape"]]),
        "background": pick(BACKGROUND_WORDS[attributes["background"]]),
        "direction": pick(DIRECTION_PHRASES[attributes["direction"]]),
        "direction_adj": pick(DIRECTION_ADJECTIVES[attributes["direction"]]),
        "speed_adv": pick(SPEED_ADVERBS[attributes["speed"]]),
        "speed_adj": pick(SPEED_ADJECTIVES[attributes["speed"]]),
        "verb": pick(VERBS),
    }
    words.update({name.capitalize(): word[:1].upper() + word[1:] for name, word in words.items()})
    caption = pick(CAPTION_TEMPLATES).format(**words)
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", caption)


def make_items(rng: np.random.Generator, num_items: int, cold_start_fraction: float) -> list[Item]:
    """Draw every item's attributes, start position and caption."""
    num_cold = int(round(cold_start_fraction * num_items))
    cold = set(rng.choice(num_items, size=num_cold, replace=False).tolist()) if num_cold else set()
    items = []
    for index in range(num_items):
        attributes = {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": list(COLOURS)[rng.integers(len(COLOURS))],
            "size": SIZES[rng.integers(len(SIZES))],
            "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
            "direction": list(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
            "speed": SPEEDS[rng.integers(len(SPEEDS))],
        }
        # The centre stays at least one radius (plus a margin) inside the frame for the whole
        # video, so the full shape is always visible.
        margin = RADIUS[attributes["size"]] + 0.02
        travel = TRAVEL[attributes["speed"]]
        start = []
        for step in DIRECTIONS[attributes["direction"]]:
            low, high = margin, 1.0 - margin
            if step > 0:
                high -= travel
            elif step < 0:
                low += travel
            start.append(round(float(rng.uniform(low, high)), 4))
        items.append(
            Item(
                item_id=f"item_{index:05d}",
                start=(start[0], start[1]),
                cold_start=index in cold,
                caption=_caption(rng, attributes),
                **attributes,
            )
        )
    return items


def make_users(rng: np.random.Generator, num_users: int) -> list[User]:
    users = []
    for index in range(num_users):
        num_colours = int(rng.integers(1, 3))
        colours = tuple(sorted(rng.choice(list(COLOURS), size=num_colours, replace=False)))
        users.append(
            User(
                user_id=f"user_{index:05d}",
                colours=tuple(str(c) for c in colours),
                shape=SHAPES[rng.integers(len(SHAPES))],
                motion=MOTIONS[rng.integers(len(MOTIONS))],
                speed=SPEEDS[rng.integers(len(SPEEDS))],
            )
        )
    return users


def preference_matches(user: User, item: Item) -> dict[str, bool]:
    return {
        "colour": item.colour in user.colours,
        "shape": item.shape == user.shape,
        "motion": item.motion == user.motion,
        "speed": item.speed == user.speed,
    }


def _taste_scores(user: User, items: list[Item]) -> np.ndarray:
    """(N,) log-weights of the user's content taste."""
    return np.array(
        [
            sum(
                PREFERENCE_WEIGHTS[name]
                for name, hit in preference_matches(user, item).items()
                if hit
            )
            for item in items
        ]
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def _watch_ratio(rng: np.random.Generator, user: User, item: Item) -> float:
    """Engaged watch ratio: longer the more of the user's tastes the item matches."""
    hits = sum(preference_matches(user, item).values())
    return float(np.clip(0.45 + 0.13 * hits + rng.normal(0.0, 0.08), 0.3, 1.0))


def _sample_without_replacement(rng: np.random.Generator, probs: np.ndarray, k: int) -> np.ndarray:
    # Gumbel top-k draws k items in the order of sequential sampling without replacement.
    with np.errstate(divide="ignore"):
        keys = np.log(probs) + rng.gumbel(size=probs.shape)
    return np.argsort(-keys, kind="stable")[:k]


def make_interactions(
    rng: np.random.Generator, users: list[User], items: list[Item], cold_user_fraction: float
) -> tuple[list[tuple[str, str, int, int, float]], int]:
    """Rows ``(user_id, item_id, timestamp, label, weight)`` by user then time, and the cutoff."""
    warm = [item for item in items if not item.cold_start]
    cold = [item for item in items if item.cold_start]
    if not warm:
        raise ValueError("every item is cold-start; lower cold_start_fraction")
    # Zipf popularity over a random ranking of the warm items.
    ranks = rng.permutation(len(warm))
    popularity = 1.0 / (ranks + 1.0) ** ZIPF_EXPONENT
    popularity /= popularity.sum()
    cutoff = START_TIMESTAMP + WARM_WINDOW_SECONDS
    rows = []
    for user in users:
        taste = _softmax(_taste_scores(user, warm))
        mixed = (1.0 - POPULARITY_MIX) * taste + POPULARITY_MIX * popularity
        low, high = HISTORY_LENGTH
        num_engaged = min(int(rng.integers(low, high + 1)), len(warm))
        engaged = _sample_without_replacement(rng, mixed, num_engaged)
        events = [(warm[i], 1, _watch_ratio(rng, user, warm[i])) for i in engaged]

        # Skips: popular items the user was shown but does not like the colour of.
        skippable = np.array([item.colour not in user.colours for item in warm]) & ~np.isin(
            np.arange(len(warm)), engaged
        )
        num_skips = min(int(rng.binomial(num_engaged, SKIP_RATE)), int(skippable.sum()))
        if num_skips:
            skip_probs = np.where(skippable, popularity, 0.0)
            skipped = _sample_without_replacement(rng, skip_probs / skip_probs.sum(), num_skips)
            events += [(warm[i], 0, float(rng.uniform(0.0, 0.2))) for i in skipped]
        # Time order is independent of preference order.
        events = [events[i] for i in rng.permutation(len(events))]

        # Long histories get shorter gaps so that every warm row stays before the cutoff.
        max_gap = min(GAP_SECONDS[1], WARM_WINDOW_SECONDS // len(events))
        gaps = rng.integers(GAP_SECONDS[0], max_gap + 1, size=len(events))
        offsets = np.cumsum(gaps) - gaps[0]  # (E,), offsets[0] == 0
        first = START_TIMESTAMP + int(rng.integers(0, WARM_WINDOW_SECONDS - offsets[-1]))
        timestamps = first + offsets
        rows += [
            (user.user_id, item.item_id, int(ts), label, round(weight, 3))
            for (item, label, weight), ts in zip(events, timestamps, strict=True)
        ]

        if cold and rng.random() < cold_user_fraction:
            choice = int(rng.choice(len(cold), p=_softmax(_taste_scores(user, cold))))
            timestamp = cutoff + int(rng.integers(1, COLD_WINDOW_SECONDS + 1))
            weight = _watch_ratio(rng, user, cold[choice])
            rows.append((user.user_id, cold[choice].item_id, timestamp, 1, round(weight, 3)))
    return rows, cutoff


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def synthesize(
    out_dir: str | Path,
    *,
    num_items: int = 240,
    num_users: int = 400,
    seed: int = 0,
    seconds: float = 3.0,
    fps: int = 12,
    size: int = 96,
    cold_start_fraction: float = 0.15,
    cold_user_fraction: float = 0.4,
    codec: str = "libx264",
    progress: bool = True,
) -> dict:
    """Write the synthetic dataset into ``out_dir``; returns paths and counts.

    ``size`` is the frame side in pixels (even, for yuv420p). ``cold_user_fraction`` is the
    share of users whose last interaction is a cold-start item.
    """
    if num_items < 1 or num_users < 1:
        raise ValueError("num_items and num_users must be positive")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    if not 0.0 <= cold_start_fraction < 1.0 or not 0.0 <= cold_user_fraction <= 1.0:
        raise ValueError("cold_start_fraction must be in [0, 1) and cold_user_fraction in [0, 1]")
    num_frames = int(round(seconds * fps))
    if num_frames < 2:
        raise ValueError(f"seconds * fps must give at least 2 frames, got {num_frames}")

    out_dir = make_output_dir(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(exist_ok=True)
    # Independent streams: items do not change when only num_users changes, and vice versa.
    items = make_items(np.random.default_rng([seed, 0]), num_items, cold_start_fraction)
    users = make_users(np.random.default_rng([seed, 1]), num_users)
    rows, cutoff = make_interactions(
        np.random.default_rng([seed, 2]), users, items, cold_user_fraction
    )

    for item in tqdm(items, desc="synth videos", unit="video", disable=not progress):
        frames = render_frames(item, num_frames, size)  # (T, size, size, 3)
        buffer = io.BytesIO()
        write_video(buffer, frames, fps, codec=codec, container_format="mp4")
        atomic_write_bytes(video_dir / f"{item.item_id}.mp4", buffer.getvalue())

    manifest = [
        {
            "video": f"videos/{item.item_id}.mp4",
            "caption": item.caption,
            "key": item.item_id,
            "item_id": item.item_id,
            "title": item.title,
            "tags": item.tags,
            **item.attributes,
            "cold_start": item.cold_start,
        }
        for item in items
    ]
    catalogue = [
        {
            "item_id": item.item_id,
            "title": item.title,
            "caption": item.caption,
            "tags": item.tags,
            "attributes": item.attributes,
            "motion": item.motion,
            "start": list(item.start),
            "cold_start": item.cold_start,
            "video": f"videos/{item.item_id}.mp4",
        }
        for item in items
    ]
    user_records = [
        {
            "user_id": user.user_id,
            "colours": list(user.colours),
            "shape": user.shape,
            "motion": user.motion,
            "speed": user.speed,
        }
        for user in users
    ]
    interactions = "user_id,item_id,timestamp,label,weight\n" + "".join(
        f"{user_id},{item_id},{timestamp},{label},{weight:.3f}\n"
        for user_id, item_id, timestamp, label, weight in rows
    )
    cold_ids = [item.item_id for item in items if item.cold_start]
    cold_rows = sum(1 for row in rows if row[2] > cutoff)
    counts = {
        "items": num_items,
        "warm_items": num_items - len(cold_ids),
        "cold_start_items": len(cold_ids),
        "users": num_users,
        "interactions": len(rows),
        "engaged": sum(1 for row in rows if row[3] == 1),
        "skipped": sum(1 for row in rows if row[3] == 0),
        "cold_start_interactions": cold_rows,
    }
    description = {
        "version": SYNTH_VERSION,
        "settings": {
            "num_items": num_items,
            "num_users": num_users,
            "seed": seed,
            "seconds": seconds,
            "fps": fps,
            "num_frames": num_frames,
            "size": size,
            "cold_start_fraction": cold_start_fraction,
            "cold_user_fraction": cold_user_fraction,
            "codec": codec,
        },
        "counts": counts,
        "cold_start_items": cold_ids,
        "start_timestamp": START_TIMESTAMP,
        "cutoff_timestamp": cutoff,
        "vocabulary": {
            "shape": list(SHAPES),
            "colour": list(COLOURS),
            "size": list(SIZES),
            "background": list(BACKGROUNDS),
            "direction": list(DIRECTIONS),
            "speed": list(SPEEDS),
            "motion": list(MOTIONS),
        },
        "user_model": {
            "preferences": "1-2 colours, one shape, one motion (horizontal/vertical/diagonal), "
            "one speed; see users.jsonl",
            "taste": "softmax over warm items of the summed weights of matched preferences",
            "weights": PREFERENCE_WEIGHTS,
            "popularity_mix": POPULARITY_MIX,
            "popularity": f"Zipf, exponent {ZIPF_EXPONENT}, over a random ranking of warm items",
            "history_length": list(HISTORY_LENGTH),
            "skip_rate": SKIP_RATE,
            "skips": "label 0, weight in [0, 0.2]: popular warm items of a colour the user "
            "does not like",
            "watch_ratio": "clip(0.45 + 0.13 * matched preferences + N(0, 0.08), 0.3, 1)",
            "warm_timestamps": f"in [start_timestamp, cutoff_timestamp), gaps {GAP_SECONDS} s",
            "cold_start": "a cold_user_fraction of users get one final engaged interaction with a "
            "cold-start item drawn by taste alone, timestamped after the cutoff",
        },
    }

    paths = {
        "manifest": out_dir / "manifest.jsonl",
        "manifest_warm": out_dir / "manifest_warm.jsonl",
        "manifest_cold": out_dir / "manifest_cold.jsonl",
        "items": out_dir / "items.jsonl",
        "users": out_dir / "users.jsonl",
        "interactions": out_dir / "interactions.csv",
        "synth_json": out_dir / "synth.json",
    }
    atomic_write_text(paths["manifest"], _jsonl(manifest))
    # The cold-start items double as held-out videos for pretraining's retrieval evaluation:
    # pretraining on the warm manifest never sees them.
    atomic_write_text(paths["manifest_warm"], _jsonl([r for r in manifest if not r["cold_start"]]))
    atomic_write_text(paths["manifest_cold"], _jsonl([r for r in manifest if r["cold_start"]]))
    atomic_write_text(paths["items"], _jsonl(catalogue))
    atomic_write_text(paths["users"], _jsonl(user_records))
    atomic_write_text(paths["interactions"], interactions)
    atomic_write_text(paths["synth_json"], json.dumps(description, indent=2) + "\n")
    logger.info(
        "synthesized %d items (%d cold-start), %d users, %d interactions into %s",
        num_items,
        len(cold_ids),
        num_users,
        len(rows),
        out_dir,
    )
    return {
        "out_dir": str(out_dir),
        "videos": str(video_dir),
        **{name: str(path) for name, path in paths.items()},
        "counts": counts,
        "cutoff_timestamp": cutoff,
    }
