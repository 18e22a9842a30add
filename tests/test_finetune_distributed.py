"""Finetuning under real ranks: ``vidrec finetune`` started by the deepspeed launcher with two
CPU ranks (gloo) under ZeRO-3 (weights partitioned), SIGKILLed after its first checkpoint, then
resumed by the same command to a complete report; its last checkpoint is then exported in this
process and must reproduce the run's own test metrics. Each launch pays ~30 s of start-up on
two cores, so this is one test."""

from __future__ import annotations

import json
import math
import signal
import time

import numpy as np
import pytest
import torch
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

from finetune import report
from finetune.catalogue import read_catalogue, read_cold_items
from finetune.config import load_finetune_config
from finetune.export import export_finetune, load_recommender
from finetune.interactions import load_interactions
from finetune.metrics import auc, evaluate_ranking

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
        "parallel.zero_stage=3",
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
    for model in ("content", "ID-SASRec", "popularity", "content-kNN"):
        assert {"warm", "cold"} <= set(results["metrics"]["test"][model])

    client = MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vidrec-finetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    logged = {point.step for point in client.get_metric_history(run.info.run_id, "loss")}
    assert set(range(killed_at + 1, STEPS + 1)) <= logged

    # 3. the ZeRO-3 shards, merged in this process, give back the model the run evaluated
    exported = load_recommender(export_finetune(output, tmp_path / "export"))
    assert exported.finetune["zero_stage"] == 3 and exported.finetune["world_size"] == 2
    assert exported.finetune["step"] == STEPS
    recomputed = _test_metrics(exported, output)
    saved = results["metrics"]["test"]["content"]
    for group in ("all", "warm", "cold"):
        for metric in ("hr@10", "ndcg@10", "mrr"):
            assert recomputed[group][metric] == pytest.approx(saved[group][metric], abs=1e-6)
    assert recomputed["auc"] == pytest.approx(saved["auc"], abs=1e-6, nan_ok=True)


def _test_metrics(recommender, output) -> dict:
    """The run's test metrics of the content model (``Finetuner.evaluate_model``), from the
    export alone: its item table, its user states of the same history windows, its head.
    The run computed its figures from the live weights gathered across ranks, so a wrong merge
    of the ZeRO-3 partitions (a shard misplaced, a shape misread) changes them."""
    config = load_finetune_config(output / "config.yaml")
    settings = config.data
    catalogue = read_catalogue(settings.catalogue, text_fields=settings.text_fields)
    data = load_interactions(
        settings.interactions,
        catalogue,
        cold_items=read_cold_items(settings.cold_items) if settings.cold_items else set(),
        min_interactions=settings.min_interactions,
    )
    times_by_row = np.zeros(int(data.row.max()) + 1)
    times_by_row[data.row] = data.timestamp
    eval_set = data.eval_set("test")
    histories, offsets = eval_set.histories, eval_set.histories.offsets
    states = recommender.user_states(
        [histories.items[offsets[u] : offsets[u + 1]].tolist() for u in range(len(offsets) - 1)],
        [times_by_row[histories.rows[offsets[u] : offsets[u + 1]]].tolist()
         for u in range(len(offsets) - 1)],
    )  # fmt: skip
    items, head = recommender.item_embeddings, recommender.model.head
    cold = torch.from_numpy(eval_set.is_cold)
    with torch.no_grad():
        flat = evaluate_ranking(
            torch.from_numpy(eval_set.targets),
            score_fn=lambda examples, ids: head.score_all(states[examples], items[ids]),
            num_items=recommender.num_items + 1,
            histories=histories,
            groups={"warm": ~cold, "cold": cold},
            user_chunk=config.train.eval_user_chunk,
        )
        figures = report.nest(flat)
        rows = data.pointwise("test")
        figures["auc"] = math.nan
        if len(np.unique(rows["label"])) == 2:
            scores = head.score_pairs(
                states[torch.from_numpy(rows["user"])], items[torch.from_numpy(rows["item"])]
            )
            figures["auc"] = auc(scores, rows["label"])
    return figures
