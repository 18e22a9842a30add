"""The capacity report: FLOPs per clip, clips/s per GPU at the target MFU, the decode processes
that feed them, its warnings, the once-only data-wait alarm, and `vidrec pretrain --check`."""

from __future__ import annotations

import os

import pytest
from conftest import CONFIGS

from pretrain.capacity import (
    DataWaitAlarm,
    WaitInterval,
    capacity_report,
    format_capacity,
)
from pretrain.config import load_pretrain_config
from pretrain.distributed import cores_on_node, ranks_per_node
from pretrain.flops import forward_flops, masked_tokens, pretrain_forward_flops

H100 = 989e12
TINY_TEXT_WIDTH, TINY_VOCAB, TINY_LENGTH = 32, 30522, 16  # launch/configs/tiny.yaml
MLM_FLOPS_PER_TARGET = 2 * TINY_TEXT_WIDTH * TINY_TEXT_WIDTH + 2 * TINY_TEXT_WIDTH * TINY_VOCAB


def tiny(*overrides):
    return load_pretrain_config(CONFIGS / "tiny.yaml", ["data.workers=3", *overrides])


def tiny_model_flops(config) -> float:
    """3 × the forward of the tiny preset's objectives (MVM 0.9, MLM 15% of 14 tokens)."""
    forward = forward_flops(
        config.model.build_config(), TINY_LENGTH, mask_ratio=0.9, mlm_targets=0.15 * 14
    )
    return 3 * sum(forward.values())


def test_the_report_is_flops_per_clip_and_clips_per_second_at_40_percent_mfu():
    config = tiny("data.decode_clips_per_core=20")
    report = capacity_report(config, gpus_per_node=4, cores=64)
    assert report.model_flops == pytest.approx(tiny_model_flops(config), rel=1e-12)
    assert report.hardware_flops == report.model_flops  # no activation checkpointing
    assert [gpu.kind for gpu in report.gpus] == ["A100", "H100", "H200"]
    h100 = report.gpus[1]
    assert h100.clips_per_second == 0.4 * H100 / report.model_flops
    assert h100.decode_processes == pytest.approx(h100.clips_per_second / 20, rel=1e-12)
    assert report.gpus[0].clips_per_second == pytest.approx(0.4 * 312e12 / report.model_flops)
    # data.samples_per_clip: k training samples per decoded clip
    config.data.samples_per_clip = 4
    quartered = capacity_report(config, gpus_per_node=4, cores=64).gpus[1]
    assert quartered.decode_processes == pytest.approx(h100.clips_per_second / 80, rel=1e-12)
    assert quartered.clips_per_second == h100.clips_per_second


def test_the_lines_say_the_figures():
    config = tiny()
    report = capacity_report(config, gpus_per_node=4, cores=64)
    lines = format_capacity(report)
    h100 = report.gpus[1]
    assert lines[0].startswith(f"capacity: {report.model_flops / 1e9:.4g} GFLOP per training clip")
    assert "MLM on ≤ 2.1 masked tokens per caption" in lines[0]
    assert (
        f"  H100 (989 TFLOP/s bf16): {h100.clips_per_second:,.0f} clips/s at 40% MFU → "
        f"{h100.decode_processes:.1f} decode processes per GPU"
    ) in lines
    assert "  decode: 58.6 clips/s per core (data.decode_clips_per_core)" in lines
    assert "  loader: data.workers 3 per GPU × 4 GPUs per node = 12 processes on 64 cores" in lines
    assert not any("HFU" in line for line in lines)


@pytest.mark.parametrize(("cores", "warned"), [(12, False), (11, True)])
def test_more_decode_processes_than_cores_is_a_warning(cores, warned):
    report = capacity_report(tiny(), gpus_per_node=4, cores=cores)
    expected = (
        f"data.workers 3 × 4 GPUs per node = 12 decode processes > {cores} CPU cores present: "
        f"the loader cannot run at full speed"
    )
    assert report.warnings == ((expected,) if warned else ())


def test_activation_checkpointing_raises_hardware_flops_not_model_flops():
    plain = capacity_report(tiny(), gpus_per_node=1, cores=8)
    config = tiny("model.activation_checkpointing=true")
    report = capacity_report(config, gpus_per_node=1, cores=8)
    recomputed = pretrain_forward_flops(config, recomputed=True)
    assert report.model_flops == plain.model_flops  # MFU counts the model's FLOPs only
    assert report.gpus == plain.gpus
    assert report.hardware_flops == pytest.approx(
        plain.model_flops + sum(recomputed.values()), rel=1e-12
    )
    assert plain.model_flops < report.hardware_flops < 4 / 3 * plain.model_flops
    (line,) = [line for line in format_capacity(report) if "HFU" in line]
    assert f"{report.hardware_flops / report.model_flops:.2f} × MFU" in line


def test_the_mlm_head_counts_masked_tokens_not_a_flag():
    config = tiny()
    # 15% of a caption's 16 tokens less [CLS] and [SEP], at most
    assert masked_tokens(config) == pytest.approx(0.15 * 14)
    assert masked_tokens(config, caption_tokens=10) == pytest.approx(0.15 * 8)
    assert masked_tokens(tiny("objectives.masked_language=0")) is None
    forward = pretrain_forward_flops(config)
    assert forward["mlm_head"] == pytest.approx(0.15 * 14 * MLM_FLOPS_PER_TARGET, rel=1e-12)
    # a flag counted as one token would have been 2.1 × too small
    model_config = config.model.build_config()
    one = forward_flops(model_config, TINY_LENGTH, mlm_targets=1.0)["mlm_head"]
    assert one == MLM_FLOPS_PER_TARGET
    with pytest.raises(TypeError, match="count of masked tokens"):
        forward_flops(model_config, TINY_LENGTH, mlm_targets=True)


def test_contrastive_masking_counts_the_visible_tubes_and_no_decoder():
    whole = pretrain_forward_flops(tiny("objectives.masked_video=0"))
    masked = pretrain_forward_flops(
        tiny("objectives.masked_video=0", "objectives.contrastive_masking=true")
    )
    with_decoder = pretrain_forward_flops(tiny())
    assert "video_decoder" not in masked and "video_decoder" in with_decoder
    assert masked["video_encoder"] == with_decoder["video_encoder"] < whole["video_encoder"]


def test_the_data_wait_alarm_speaks_once_above_the_threshold():
    report = capacity_report(tiny(), gpus_per_node=4, cores=64)
    alarm = DataWaitAlarm(report, "NVIDIA H100 80GB HBM3", H100)
    assert alarm.check(0.10, 50.0) is None  # at the threshold: not above it
    message = alarm.check(0.25, 30.0)
    # 30 clips/s while waiting a quarter of the time: 40 clips/s without the wait
    assert "waited on data 25% of the last log interval" in message
    assert "30.0 clips/s per rank, 40.0 without the wait" in message
    assert f"{40 / 58.6:.1f} decode processes per rank at 58.6 clips/s per core" in message
    assert "data.workers is 3 (12 for 4 ranks on 64 cores)" in message
    target = 0.4 * H100 / report.model_flops
    assert f"this NVIDIA H100 80GB HBM3 would consume {target:,.0f} clips/s" in message
    assert f"{target / 58.6:.1f} decode processes" in message
    assert alarm.check(0.9, 5.0) is None  # once
    assert "MFU" not in DataWaitAlarm(report, "cpu", None).check(0.5, 10.0)


def test_the_data_wait_is_measured_over_the_log_interval():
    interval = WaitInterval()
    interval.add(2.0, 0.5, 8)  # 1 s of 2 waiting
    interval.add(1.0, 0.0, 8)
    assert interval.metrics() == {
        "interval_data_wait_fraction": pytest.approx(1 / 3),
        "interval_clips_per_second_per_rank": pytest.approx(16 / 3),
    }


def test_ranks_and_cores_per_node_come_from_the_launcher():
    assert ranks_per_node({"LOCAL_WORLD_SIZE": "4"}, 16) == 4  # torchrun, accelerate
    assert ranks_per_node({"LOCAL_SIZE": "2"}, 16) == 2  # deepspeed
    assert ranks_per_node({"SLURM_TASKS_PER_NODE": "8(x4)"}, 32) == 8
    assert ranks_per_node({}, 3) == 3
    assert cores_on_node({"SLURM_CPUS_ON_NODE": "96"}) == 96
    assert cores_on_node({}) == len(os.sched_getaffinity(0))


def test_check_prints_the_report(capsys):
    from vidrec_cli import main

    code = main(["pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--check",
                 "--set", "data.workers=3", "--gpus-per-node", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    report = capacity_report(tiny(), gpus_per_node=4, cores=cores_on_node(os.environ))
    expected = format_capacity(report) + [f"warning: {w}" for w in report.warnings]
    assert out.splitlines()[-len(expected) :] == expected  # after the config and parameters
