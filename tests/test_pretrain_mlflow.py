"""Pretraining against a real ``mlflow server`` on 127.0.0.1 that dies in the middle of the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONFIGS
from mlflow import MlflowClient
from test_tracking import MlflowServer


def _vidrec() -> list[str]:
    script = Path(sys.executable).with_name("vidrec")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vidrec_cli"]


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _loss_points(client: MlflowClient) -> tuple[str | None, int]:
    experiment = client.get_experiment_by_name("vidrec-pretrain")
    if experiment is None:
        return None, 0
    runs = client.search_runs([experiment.experiment_id])
    if not runs:
        return None, 0
    run_id = runs[0].info.run_id
    return run_id, len(client.get_metric_history(run_id, "loss"))


@pytest.mark.slow
def test_training_survives_the_tracking_server_going_away(tmp_path, synthetic_shards):
    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    output = tmp_path / "run"
    command = _vidrec() + [
        "pretrain", "--config", str(CONFIGS / "tiny.yaml"),
        "--set", f"data.train_shards={synthetic_shards['train']}",
        "--set", f"train.output_dir={output}",
        "--set", "train.steps=60", "--set", "train.log_every=1",
        "--set", f"tracking.tracking_uri={server.uri}",
        "--set", "tracking.flush_interval_s=0.2", "--set", "tracking.finish_timeout_s=3",
    ]  # fmt: skip
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = tmp_path / "training.log"
    # A file, not a pipe: nobody would drain a pipe while the test polls the server.
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    training = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    try:
        client = MlflowClient(tracking_uri=server.uri)
        deadline = time.monotonic() + 120
        run_id, points = None, 0
        while points < 3 and time.monotonic() < deadline and training.poll() is None:
            time.sleep(0.3)
            run_id, points = _loss_points(client)
        assert points >= 3, "no metrics reached the server while it was up:\n" + _tail(log_path)
        run = client.get_run(run_id)
        assert run.data.params["train.steps"] == "60"
        assert run.data.params["world_size"] == "1"
        assert "versions.torch" in run.data.params
        assert training.poll() is None, "training ended before the server could be stopped"
        server.stop()  # SIGKILL, mid-run
        try:
            training.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail("training did not finish after the server died:\n" + _tail(log_path))
    finally:
        if training.poll() is None:
            training.kill()
        server.stop()
        log_file.close()
    log = log_path.read_text(errors="replace")
    assert training.returncode == 0, log[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 60
    assert [entry["step"] for entry in summary["history"]] == list(range(1, 61))
    assert "is unreachable" in log, log[-3000:]
    # What reached the server before it died is still there.
    server.start()
    try:
        assert _loss_points(MlflowClient(tracking_uri=server.uri))[1] >= points
    finally:
        server.stop()
