"""Finetuning under real ranks: ``vidrec finetune`` started by the deepspeed launcher with two
CPU ranks (gloo), SIGKILLed after its first checkpoint, then resumed by the same command to a
complete report. Each launch pays ~30 s of start-up on two cores, so this is one test."""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import CONFIGS
from mlflow import MlflowClient
from test_finetune_train import data_overrides
from test_pretrain_distributed import (
    BIN,
    _free_port,
    _kill_job,
    _launch_in_background,
    _remove_shm_buffers,
)

pytestmark = pytest.mark.distributed

STEPS = 40


def _command(synthetic_shards, output_dir, port: int) -> list[str]:
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]
    command += [str(BIN / "vidrec"), "finetune", "--config", str(CONFIGS / "finetune_tiny.yaml")]
    settings = [
        *data_overrides(synthetic_shards),
        f"train.output_dir={output_dir}",
        f"train.steps={STEPS}",
        "train.save_every=4",
        "train.log_every=1",
        "baselines.id_sasrec_steps=10",
    ]
    for setting in settings:
        command += ["--set", setting]
    return command


def test_two_ranks_finetune_and_resume_after_sigkill(synthetic_shards, tmp_path):
    output = tmp_path / "run"
    latest = output / "checkpoints" / "latest"

    # 1. killed (the launcher and both ranks) as soon as its first checkpoint is complete
    port = _free_port()
    job = _launch_in_background(
        _command(synthetic_shards, output, port), tmp_path, tmp_path / "killed.log"
    )
    try:
        deadline = time.monotonic() + 240
        while not latest.is_file() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = job.poll() is None
    finally:
        _kill_job(job)
        _remove_shm_buffers(port)
    killed_log = (tmp_path / "killed.log").read_text(errors="replace")
    assert alive and latest.is_file(), f"no checkpoint before the end:\n{killed_log[-4000:]}"
    assert job.returncode == -signal.SIGKILL
    killed_at = int(latest.read_text().removeprefix("step_"))
    assert 0 < killed_at < STEPS
    assert not (output / "metrics.json").exists()

    # 2. the same command resumes from the checkpoint and finishes, with the report
    port = _free_port()
    job = _launch_in_background(
        _command(synthetic_shards, output, port), tmp_path, tmp_path / "resumed.log"
    )
    try:
        job.wait(timeout=300)
    finally:
        _kill_job(job)
        _remove_shm_buffers(port)
    log = (tmp_path / "resumed.log").read_text(errors="replace")
    assert job.returncode == 0, log[-4000:]
    assert f"resumed from step_{killed_at:08d}" in log
    assert "content cache" in log and "reused" in log  # the killed run had written it

    results = json.loads((output / "metrics.json").read_text())
    assert results["step"] == STEPS
    for model in ("content", "id_sasrec", "popularity"):
        assert {"warm", "cold"} <= set(results["metrics"]["test"][model])

    client = MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vidrec-finetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    logged = {point.step for point in client.get_metric_history(run.info.run_id, "loss")}
    assert set(range(killed_at + 1, STEPS + 1)) <= logged
