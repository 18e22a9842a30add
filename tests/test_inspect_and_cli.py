"""``vidrec shards inspect / stream / synth`` and the contact sheet."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_factory import HEIGHT, WIDTH, write_shards

from data_shards.build import BuildConfig, parse_part
from data_shards.inspect_shards import inspect_shards
from vidrec_cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    written = write_shards(directory, num_shards=2, samples_per_shard=5, corrupt_every=4)
    return directory, written


def test_inspect_counts_decode_failures_and_draws_a_sheet(shard_dir, tmp_path):
    directory, written = shard_dir
    sheet = tmp_path / "sheet.png"
    report = inspect_shards(directory, decode_samples=100, sheet_clips=3, sheet_path=sheet)
    assert report.shards == 2
    assert report.samples == 10
    # Samples 3 and 7 are broken: random bytes as mp4, then unparsable json.
    assert len(written.corrupt_keys) == 2
    assert report.decode_failed == 1
    assert report.bad_metadata == 1
    assert report.resolutions == {f"{WIDTH}x{HEIGHT}": 9}
    assert report.empty_captions == 3  # the factory empties the caption of samples 1, 5, 9
    image = Image.open(sheet)
    assert image.size[0] == 6 * 112
    assert image.size[1] == 3 * (112 + 18)
    # The sheet shows frames, not a blank canvas: the tiles hold the clips' grey levels.
    pixels = np.asarray(image.convert("L"))
    assert pixels[18:130].std() > 10


def test_cli_inspect_json_and_exit_code(shard_dir, capsys, tmp_path):
    directory, _ = shard_dir
    code = main(["shards", "inspect", str(directory), "--json", "--sheet", str(tmp_path / "s.png")])
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 10
    assert code == 1  # a sample that does not decode makes the check fail


def test_cli_inspect_missing_directory(tmp_path, capsys):
    assert main(["shards", "inspect", str(tmp_path)]) == 2
    assert "no shards" in capsys.readouterr().err


def test_cli_stream_reports_batches_and_skips(tmp_path, capsys):
    written = write_shards(tmp_path, num_shards=2, samples_per_shard=6, corrupt_every=5)
    code = main(
        ["shards", "stream", str(tmp_path), "--batches", "3", "--batch-size", "2",
         "--frames", "4", "--size", "32", "--workers", "0", "--mode", "eval"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "video (2, 4, 3, 32, 32) torch.uint8" in out
    assert "3 batches" in out
    assert written.corrupt_keys  # the stream met them before its third batch
    assert "skipped samples: 0" not in out


def test_cli_synth_then_build_then_inspect(tmp_path, capsys):
    synth_dir, shards = tmp_path / "synth", tmp_path / "shards"
    assert main(["shards", "synth", "--out", str(synth_dir), "--items", "6", "--users", "5",
                 "--no-progress"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary
    assert main(["shards", "build", "--manifest", str(synth_dir / "manifest.jsonl"),
                 "--out", str(shards), "--short-side", "48", "--workers", "1",
                 "--samples-per-shard", "4", "--no-progress"]) == 0  # fmt: skip
    assert "6 samples in 2 shards from 6 inputs (0 failed" in capsys.readouterr().out
    assert main(["shards", "inspect", str(shards)]) == 0
    out = capsys.readouterr().out
    assert "samples: 6" in out
    assert (shards / "contact_sheet.png").is_file()


def test_cli_build_defaults_are_the_build_configs():
    args = build_parser().parse_args(["shards", "build", "--manifest", "m", "--out", "o"])
    defaults = BuildConfig()
    for field in dataclasses.fields(BuildConfig):
        if field.name not in ("part", "num_parts"):
            assert getattr(args, field.name) == getattr(defaults, field.name), field.name
    assert parse_part(args.part) == (defaults.part, defaults.num_parts)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_info_lines_come_from_rank_0_only(rank):
    """Each rank of a job runs the same code: INFO lines from rank 0 only, other ranks log
    warnings and errors with their rank, so a 2-rank job prints each line once."""
    script = (
        "import logging, vidrec_cli\n"
        "vidrec_cli.configure_logging(verbose=False)\n"
        "logging.getLogger('pretrain.checkpoint').info('checkpoint step_2 saved')\n"
        "logging.getLogger('pretrain.checkpoint').warning('disk almost full')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}
    env |= {"RANK": rank, "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    lines = result.stderr.splitlines()
    if rank == "0":
        assert [line.split(" ", 2)[2] for line in lines] == [
            "INFO pretrain.checkpoint: checkpoint step_2 saved",
            "WARNING pretrain.checkpoint: disk almost full",
        ]
    else:
        assert [line.split(" ", 2)[2] for line in lines] == [
            "WARNING [rank 1] pretrain.checkpoint: disk almost full"
        ]
