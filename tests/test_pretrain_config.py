"""Run configs: every shipped preset loads and builds; overrides and checks name the field."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS

from pretrain.config import (
    ConfigError,
    PretrainConfig,
    deepspeed_config,
    from_dict,
    launcher_overrides,
    load_pretrain_config,
    model_width,
    to_dict,
)
from pretrain.model import VideoTextModel

PRESETS = ("tiny", "small", "base", "large", "giant")
# Rough sizes the README quotes; a preset drifting far from its class is a mistake.
EXPECTED_PARAMETERS = {
    "tiny": (0.5e6, 3e6),
    "small": (30e6, 60e6),
    "base": (180e6, 260e6),
    "large": (550e6, 800e6),
    "giant": (0.9e9, 1.3e9),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_loads_and_builds(preset):
    config = load_pretrain_config(CONFIGS / f"{preset}.yaml")
    model_config = config.model.build_config()
    with torch.device("meta"):
        model = VideoTextModel(model_config)
    parameters = model.num_parameters()
    low, high = EXPECTED_PARAMETERS[preset]
    assert low <= parameters <= high, f"{preset}: {parameters:,} parameters"
    ds = deepspeed_config(config, world_size=8)
    assert ds["train_batch_size"] == config.parallel.micro_batch_size * 8
    assert ds["zero_optimization"]["stage"] == config.parallel.zero_stage
    # The round trip through plain dicts is lossless (what checkpoints and MLflow store).
    assert from_dict(PretrainConfig, to_dict(config)) == config


def test_zero_buffers_follow_the_model_width():
    """ZeRO's buckets are h² of the widest tower (h = 384 in the small preset), not fixed sizes
    that would dwarf a small model; without a width the fixed 5e7 elements remain."""
    config = load_pretrain_config(CONFIGS / "small.yaml", ["parallel.zero_stage=3"])
    width = model_width(config)
    assert width == 384
    zero = deepspeed_config(config, world_size=2, width=width)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 384 * 384
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 384 * 384)
    assert zero["stage3_param_persistence_threshold"] == 3840
    fixed = deepspeed_config(config, world_size=2)["zero_optimization"]
    assert fixed["reduce_bucket_size"] == 5e7 and "stage3_prefetch_bucket_size" not in fixed


def test_overrides_parse_as_yaml_and_reach_nested_fields():
    config = load_pretrain_config(
        CONFIGS / "tiny.yaml",
        ["train.steps=7", "parallel.zero_stage=3", "optimizer.betas=[0.8, 0.9]",
         "data.train_shards=/data/{000..009}.tar"],
    )  # fmt: skip
    assert config.train.steps == 7
    assert config.parallel.zero_stage == 3
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.data.train_shards == "/data/{000..009}.tar"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", "unknown field train.stepz"),
        ("train.steps=many", "train.steps: expected an integer"),
        ("parallel.precision=fp8", "parallel.precision: 'fp8' is not one of"),
        ("parallel.zero_stage=5", "zero_stage must be 0-3"),
        ("parallel.offload_params=true", "offload_params needs zero_stage 3"),
        ("objectives.mask_ratio=1.0", "mask_ratio must be in [0, 1)"),
        ("objectives.matching=1.0", "needs model.matching_head"),
        ("data.samples_per_clip=0", "data.samples_per_clip must be >= 1"),
        (
            "data.samples_per_clip=3",
            "micro_batch_size 4 is not a multiple of data.samples_per_clip 3",
        ),
        ("data.crop_scale=[0.8, 0.4]", "data.crop_scale must be 0 < low <= high <= 1"),
        ("data.crop_ratio=[0, 1]", "data.crop_ratio must be 0 < low <= high"),
        ("data.flip_prob=1.5", "data.flip_prob must be in [0, 1]"),
        ("data.train_text_fields=[]", "data.train_text_fields must name at least one field"),
        ("model.init_temperature=0.005", "1 / it <= model.max_logit_scale 100.0"),
        ("model.init_temperature=0", "model.init_temperature 0.0 must be > 0"),
    ],
)
def test_bad_values_are_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_pretrain_config(CONFIGS / "tiny.yaml", [override])


def test_contrastive_masking_and_the_whole_clip_for_contrastive_are_refused_together():
    both = ["objectives.contrastive_masking=true", "objectives.contrastive_on_unmasked=true"]
    with pytest.raises(ConfigError, match="contrastive_masking and .*contrastive_on_unmasked"):
        load_pretrain_config(CONFIGS / "tiny.yaml", both)


def test_matching_is_refused_with_copies_of_a_clip_in_the_batch():
    settings = ["model.matching_head=true", "objectives.matching=1.0"]
    load_pretrain_config(CONFIGS / "tiny.yaml", settings)
    with pytest.raises(ConfigError, match="objectives.matching > 0 needs data.samples_per_clip: 1"):
        load_pretrain_config(CONFIGS / "tiny.yaml", [*settings, "data.samples_per_clip=2"])


def test_global_batch_arithmetic_is_checked():
    config = load_pretrain_config(
        CONFIGS / "tiny.yaml",
        ["parallel.micro_batch_size=4", "parallel.grad_accum_steps=2",
         "parallel.global_batch_size=16"],
    )  # fmt: skip
    assert deepspeed_config(config, world_size=2)["train_batch_size"] == 16
    with pytest.raises(ConfigError, match="global_batch_size 16 != micro_batch_size 4"):
        deepspeed_config(config, world_size=4)


def test_check_command_prints_config_without_starting(capsys):
    from vidrec_cli import main

    code = main(["pretrain", "--config", str(CONFIGS / "giant.yaml"), "--check",
                 "--world-size", "64"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert '"train_batch_size": 1024' in out
    assert "parameters:" in out
    assert "H100 (989 TFLOP/s bf16)" in out  # the capacity report, nodes of 8 GPUs by default
    assert "data.workers 10 per GPU × 8 GPUs per node = 80 processes" in out
    assert main(["pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--set", "x.y=1"]) == 2


def test_an_accelerate_config_sets_the_zero_stage_and_a_contradicting_set_is_refused():
    environ = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    overrides = launcher_overrides(environ, ["train.steps=5", "parallel.zero_stage=3"])
    config = load_pretrain_config(CONFIGS / "tiny.yaml", overrides)
    assert config.parallel.zero_stage == 3 and config.parallel.precision == "bf16"
    assert config.train.steps == 5
    assert launcher_overrides({}, ["parallel.zero_stage=1"]) == ["parallel.zero_stage=1"]
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage=1 contradicts .*zero_stage=3"):
        launcher_overrides(environ, ["parallel.zero_stage=1"])


def test_train_shards_take_one_spec_or_a_weighted_list_of_sources(tmp_path):
    plain = load_pretrain_config(CONFIGS / "tiny.yaml", ["data.train_shards=/data/a"])
    assert [(s.name, s.shards, s.weight) for s in plain.data.train_sources()] == [
        ("default", "/data/a", 1.0)
    ]
    mix = "[{name: own, shards: /data/own, weight: 0.7}, {name: v2d, shards: 's3/{0..9}.tar'}]"
    config = load_pretrain_config(CONFIGS / "tiny.yaml", [f"data.train_shards={mix}"])
    assert [(s.name, s.shards, s.weight) for s in config.data.train_sources()] == [
        ("own", "/data/own", 0.7),
        ("v2d", "s3/{0..9}.tar", 1.0),
    ]
    assert to_dict(config)["data"]["train_shards"][0] == {
        "name": "own", "shards": "/data/own", "weight": 0.7
    }  # fmt: skip


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ("[{name: a, shards: x, weight: -1}]", "source 'a': weight must be finite and >= 0"),
        ("[{name: a, shards: x, weight: 0}, {name: b, shards: y, weight: 0}]",
         "every source has weight 0: a, b"),
        ("[{name: a, shards: x, weight: lots}]", r"train_shards\[0\].weight: expected a number"),
        ("[{name: a, shards: x}, {name: a, shards: y}]", "source 'a' is named twice"),
    ],
)  # fmt: skip
def test_bad_sources_are_refused_naming_the_source(mix, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(CONFIGS / "tiny.yaml", [f"data.train_shards={mix}"])


def test_a_source_without_shards_stops_the_job_before_training(tmp_path, capsys):
    from vidrec_cli import main

    (tmp_path / "own").mkdir()
    mix = f"[{{name: own, shards: {tmp_path}/own/*.tar}}]"
    code = main(["pretrain", "--config", str(CONFIGS / "tiny.yaml"),
                 "--set", f"data.train_shards={mix}"])  # fmt: skip
    assert code == 2
    assert "source 'own': no shards match" in capsys.readouterr().err
