"""Fixtures shared by the pretraining tests: one small synthetic shard set per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_shards.build import BuildConfig, build_shards
from data_shards.synth import synthesize

CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs"


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> dict[str, Path]:
    """Synthetic moving-shape clips: 96 training items, 32 held-out, 32 px clips of 1.5 s."""
    root = tmp_path_factory.mktemp("synthetic")
    synthesize(
        root / "synth", num_items=128, num_users=20, seconds=1.5, fps=8, size=48, progress=False
    )
    rows = (root / "synth" / "manifest.jsonl").read_text().splitlines()
    video_dir = (root / "synth").resolve()
    paths = {}
    for name, part in (("train", rows[:96]), ("eval", rows[96:])):
        manifest = root / f"{name}.jsonl"
        lines = []
        for line in part:
            row = json.loads(line)
            row["video"] = str(video_dir / row["video"])
            lines.append(json.dumps(row))
        manifest.write_text("\n".join(lines) + "\n")
        config = BuildConfig(
            clip_seconds=1.5, fps=8, short_side=32, samples_per_shard=16, workers=2
        )
        build_shards(manifest, root / name, config, progress=False)
        paths[name] = root / name
    return paths
