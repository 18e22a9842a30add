"""Pretraining under real ranks: ``vidrec pretrain`` started by the deepspeed launcher with two
CPU ranks (gloo), exactly as on a cluster, compared against a reference run of the same config.

Every launch pays ~25 s of start-up (two ranks importing torch, deepspeed and transformers on
two cores), so runs are few and shared: one module-wide reference (ZeRO-2, fp32, 8 steps, with
evaluation) serves the ZeRO, resume, two-node and MLflow tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS
from mlflow import MlflowClient
from test_tracking import MlflowServer

pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
LOSSES = ("loss", "loss_contrastive", "loss_masked_video", "loss_masked_language")
# fp32 on CPU: the runs compared below do the same arithmetic up to the order of a few
# reductions (bucketed all-reduce vs reduce-scatter, one sum over 2b vs two over b). Measured:
# ~1e-7 relative in the first steps, up to ~2e-6 by step 20 as differences compound. A real
# mismatch (other data, a gradient off by a factor, a skipped update) is orders larger.
RTOL_FIRST_STEPS, RTOL = 1e-5, 1e-4
FIRST_STEPS = 4
# Variables a launcher sets per rank; a parent environment holding them (e.g. a process
# group started by an in-process test) must not leak into the ranks.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store lives in the output directory
    env["DS_ACCELERATOR"] = "cpu"
    return env


def _shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce segments of the job on ``port``, one 66 MB per rank in the
    RAM-backed /dev/shm (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``)."""
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"
    return list(Path("/dev/shm").glob(pattern))


def _remove_shm_buffers(port: int) -> None:
    """The ranks unlink their own segments once started; a job killed during start-up may
    still leave them: remove those of a finished job."""
    for path in _shm_buffers(port):
        path.unlink(missing_ok=True)


@dataclass
class Run:
    output_dir: Path
    returncode: int
    log: str
    shm_left_behind: list[str]
    """DeepSpeed shared-memory segments of the job still in /dev/shm after it ended."""

    @property
    def summary(self) -> dict:
        path = self.output_dir / "summary.json"
        assert path.is_file(), f"no summary.json; log tail:\n{self.log[-4000:]}"
        return json.loads(path.read_text())

    @property
    def history(self) -> list[dict]:
        return self.summary["history"]

    def series(self, key: str) -> list[float]:
        return [entry[key] for entry in self.history]


def _command(shards: dict[str, Path], output_dir: str | Path, overrides, launcher: list[str]):
    """``launcher`` (the program that starts the ranks, and its arguments) running
    ``vidrec pretrain`` on the tiny preset."""
    settings = {
        "data.train_shards": shards["train"],
        "train.output_dir": output_dir,
        "train.steps": STEPS,
        "parallel.precision": "fp32",
        "data.workers": 1,  # the reader's workers and their resume are part of what is tested
        # a loaded machine can take over the default 10 s to create the MLflow sqlite schema
        "tracking.start_timeout_s": 60,
    }
    command = [*launcher, str(BIN / "vidrec"), "pretrain"]
    command += ["--config", str(CONFIGS / "tiny.yaml")]
    for item in [f"{k}={v}" for k, v in settings.items()] + list(overrides):
        command += ["--set", item]
    return command


def _single_node(port: int) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]


def _torchrun(port: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port)]


def _accelerate(config_file: Path):
    def launcher(port: int) -> list[str]:
        return [str(BIN / "accelerate"), "launch", "--config_file", str(config_file),
                "--main_process_port", str(port)]  # fmt: skip

    return launcher


def launch(
    shards, output_dir: Path, *overrides: str, timeout: float = 300, launcher=_single_node
) -> Run:
    """One 2-rank run on this machine (``launcher(port)``: the deepspeed launcher, or another
    that starts two ranks), its output in ``<output_dir>.log``; asserts exit 0."""
    log = output_dir.with_name(f"{output_dir.name}.log")
    port = _free_port()
    command = _command(shards, output_dir, overrides, launcher(port))
    job = _launch_in_background(command, output_dir.parent, log)
    try:
        job.wait(timeout=timeout)
        left_behind = sorted(path.name for path in _shm_buffers(port))
    finally:
        _kill_job(job)  # on a timeout: the launcher and its ranks, not the launcher alone
        _remove_shm_buffers(port)
    run = Run(output_dir, job.returncode, log.read_text(errors="replace"), left_behind)
    assert run.returncode == 0, f"launcher exited {run.returncode}:\n{run.log[-4000:]}"
    return run


def _launch_in_background(command: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:  # a file, not a pipe nobody reads while we wait
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=_environment(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the launcher and its ranks
        )


def _kill_job(job: subprocess.Popen) -> None:
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def assert_same_training(run: Run, reference: Run, keys=LOSSES + ("lr",), steps=None) -> None:
    steps = steps or [entry["step"] for entry in reference.history]
    got = {entry["step"]: entry for entry in run.history}
    want = {entry["step"]: entry for entry in reference.history}
    for step in steps:
        for key in keys:
            rel = RTOL_FIRST_STEPS if step <= FIRST_STEPS else RTOL
            assert got[step][key] == pytest.approx(want[step][key], rel=rel, abs=0), (
                f"step {step} {key}: {got[step][key]} vs reference {want[step][key]}"
            )


@pytest.fixture(scope="module")
def reference(synthetic_shards, tmp_path_factory) -> Run:
    """ZeRO-2, fp32, all three objectives, 20 steps, evaluation on the held-out shards."""
    output = tmp_path_factory.mktemp("reference") / "run"
    return launch(synthetic_shards, output, f"data.eval_shards={synthetic_shards['eval']}")


# ------------------------------------------------------------------------------ ZeRO stages


@pytest.mark.parametrize("stage", [0, 3])
def test_zero_stages_train_identically(stage, reference, synthetic_shards, tmp_path):
    """Same data, same seeded initial weights (set before DeepSpeed wraps the model): ZeRO 0
    (plain data parallel) and ZeRO 3 (weights sharded too) must take the very steps ZeRO 2
    takes, and evaluate alike (under ZeRO 3 the encoders gather their weights in forward)."""
    run = launch(
        synthetic_shards,
        tmp_path / "run",
        f"parallel.zero_stage={stage}",
        f"data.eval_shards={synthetic_shards['eval']}",
    )
    assert [e["step"] for e in run.history] == list(range(1, STEPS + 1))
    assert_same_training(run, reference)
    # the loss is not constant, so the comparison above compares something
    assert len({round(v, 4) for v in reference.series("loss")}) > 1
    if stage == 3:  # gradient norms of sharded gradients, gathered
        assert_same_training(run, reference, keys=("grad_norm",))
    evaluation, expected = run.summary["evaluation"], reference.summary["evaluation"]
    assert evaluation["num_samples"] == expected["num_samples"] == 32
    assert evaluation == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------ accumulation


def test_gradient_accumulation_equals_the_larger_micro_batch(synthetic_shards, tmp_path):
    """2 micro-batches of 2 per rank and step == 1 micro-batch of 4 per rank and step.

    Same data: the training reader's sample stream does not depend on the batch size, so the
    batch of 4 is the two batches of 2 concatenated. The comparison must be one where the
    step's gradient is the mean of the two micro-batch gradients, which DeepSpeed's
    accumulation computes (loss / 2 per micro-batch, summed):
    - not the contrastive loss: InfoNCE over 4 (× 2 ranks) samples is not the mean of two
      InfoNCEs over 2 (the negatives differ);
    - not masked language modelling: its masks come from three generator draws per
      micro-batch (positions, fates, random ids), so splitting the batch reorders the stream
      and the masks differ;
    - masked video modelling alone is exact: a per-sample mean (every clip masks the same
      number of tubes), and its masks are one ``torch.rand(B, tubes)`` draw, which the CPU
      generator fills serially, so two draws of 2 rows equal one draw of 4.
    The per-step loss, gradient norm and learning rate must then agree, step after step
    (Adam alone would hide a gradient off by a constant factor; the gradient norm does not).
    """
    objectives = ("objectives.contrastive=0", "objectives.masked_language=0", "train.steps=4")
    whole = launch(synthetic_shards, tmp_path / "whole", *objectives, "parallel.micro_batch_size=4")
    accumulated = launch(
        synthetic_shards,
        tmp_path / "accumulated",
        *objectives,
        "parallel.micro_batch_size=2",
        "parallel.grad_accum_steps=2",
    )
    assert [e["step"] for e in accumulated.history] == [1, 2, 3, 4]
    assert set(accumulated.history[0]) >= {"loss_masked_video", "grad_norm"}
    assert "loss_contrastive" not in accumulated.history[0]
    assert_same_training(accumulated, whole, keys=("loss", "grad_norm", "lr"))
    assert len({round(v, 5) for v in whole.series("loss")}) > 1


# ------------------------------------------------------------------------------ resume


def _trainer_state(output_dir: Path, tag: str, rank: int) -> dict:
    path = output_dir / "checkpoints" / tag / f"trainer_state_rank{rank}.json"
    return json.loads(path.read_text())["train_state"]


def test_resume_after_a_clean_stop_and_after_sigkill(
    reference, synthetic_shards, tmp_path, request
):
    """One output directory, three jobs, against the straight 8-step reference:

    1. ``train.steps=2``: stops cleanly with a checkpoint at step 2 (N);
    2. the 8-step command (a compatible change): resumes at step 3, is SIGKILLed, launcher
       and ranks at once, once the server holds a step past its newest checkpoint;
    3. the same command again: resumes from ``latest`` and finishes.

    Exact resume: weights, Adam state, schedule, RNG and the reader position all carry over,
    so after each resume both ranks consume the batches the straight run consumed, and every
    loss is the reference's bit for bit (fp32 on CPU: the same arithmetic in the same order).
    The MLflow run, on a real MLflow server, holds one point per step, steps 1 to 8, each the
    straight run's value: the steps the killed job checkpointed reached the server before its
    checkpoint became ``latest``, and those it logged past it are not logged again.
    """
    output = tmp_path / "run"
    checkpoints = output / "checkpoints"
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    request.addfinalizer(server.stop)
    # points reach the server a fraction of a step after they are logged, so that the killed
    # job has logged steps past its checkpoint
    overrides = ("train.save_every=2", "train.keep_last=2", f"tracking.tracking_uri={server.uri}",
                 "tracking.flush_interval_s=0.1")  # fmt: skip

    first = launch(synthetic_shards, output, *overrides, "train.steps=2")
    # up to the stop it is the reference, bit for bit (seeded, deterministic, the same warmup)
    assert_same_training(first, reference, steps=[1, 2])
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert _trainer_state(output, "step_00000002", 0)["reader"]["delivered"] == {"default": 8}

    client = MlflowClient(tracking_uri=server.uri)
    run_id = first.summary["mlflow_run_id"]

    def tracked_past_checkpoint() -> bool:
        latest = int((checkpoints / "latest").read_text().removeprefix("step_"))
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        return latest > 2 and max(steps) > latest

    port = _free_port()
    job = _launch_in_background(
        _command(synthetic_shards, output, overrides, _single_node(port)),
        tmp_path,
        tmp_path / "killed.log",
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            if tracked_past_checkpoint():
                break
            time.sleep(0.02)
        alive = job.poll() is None
    finally:
        _kill_job(job)
        _remove_shm_buffers(port)
    killed_log = (tmp_path / "killed.log").read_text(errors="replace")
    assert alive, f"the job ended before it could be killed:\n{killed_log[-4000:]}"
    assert job.returncode == -signal.SIGKILL
    assert "resumed from step_00000002 (step 2)" in killed_log
    killed_at = int((checkpoints / "latest").read_text().removeprefix("step_"))
    assert 2 < killed_at < STEPS
    tracked_by_killed_job = max(m.step for m in client.get_metric_history(run_id, "loss"))
    assert tracked_by_killed_job > killed_at  # steps its resume computes again

    last = launch(synthetic_shards, output, *overrides)
    assert [e["step"] for e in last.history] == list(range(killed_at + 1, STEPS + 1))
    want = {entry["step"]: entry for entry in reference.history}
    for entry in last.history:
        for key in LOSSES + ("lr", "grad_norm"):
            assert entry[key] == want[entry["step"]][key], (entry["step"], key)
    # the schedule went on: every resumed step has the straight run's learning rate (a fresh
    # scheduler would be back in warmup), and the schedule is not flat
    assert_same_training(last, reference, keys=("lr",), steps=range(killed_at + 1, STEPS + 1))
    assert len({e["lr"] for e in reference.history}) > 3
    # the weights went on: logit_scale falls steadily in these first steps; resumed, it is
    # near the straight run's value at the same step, far from its value at step 1
    step = killed_at + 1
    resumed = last.history[0]["logit_scale"]
    straight = reference.history[step - 1]["logit_scale"]
    drift = abs(reference.history[0]["logit_scale"] - straight)
    assert drift > 0.02
    assert abs(resumed - straight) < drift / 4, (resumed, straight, drift)
    # DeepSpeed's and Adam's step counts went on through both resumes (2 + ... = 8)
    final = checkpoints / f"step_{STEPS:08d}"
    model_states = torch.load(final / "mp_rank_00_model_states.pt", weights_only=False)
    assert model_states["global_steps"] == STEPS
    for rank in (0, 1):
        optim = torch.load(
            final / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False
        )
        adam = optim["optimizer_state_dict"]["base_optimizer_state"]["state"]
        assert {float(s["step"]) for s in adam.values()} == {float(STEPS)}
        reader = _trainer_state(output, f"step_{STEPS:08d}", rank)["reader"]
        assert (reader["epoch"], reader["batches_in_epoch"]) == (0, STEPS)
        assert reader["delivered"] == {"default": STEPS * 4}
        assert reader["positions"][0] >= STEPS * 4

    # nothing half-written is left, and only the newest keep_last (2) checkpoints
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:08d}"
    tags = sorted(p.name for p in checkpoints.glob("step_*"))
    assert tags == [f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]
    for tag in tags:
        names = {p.name for p in (checkpoints / tag).iterdir()}
        assert {"config.json", "mp_rank_00_model_states.pt"} <= names
        for rank in (0, 1):
            assert f"trainer_state_rank{rank}.json" in names
            assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names
    assert not list(output.rglob("*.tmp")), "a temporary file was left behind"

    # three jobs, one MLflow run: each resume continued it, and the steps the killed job
    # checkpointed reached the server before its checkpoint became `latest`
    (run,) = client.search_runs([client.get_experiment_by_name("vidrec-pretrain").experiment_id])
    assert run.info.status == "FINISHED"
    # a checkpoint is written only once MLflow has every step up to it, and steps the killed
    # job logged past it are not logged again: one point per step, each the straight run's
    for key in ("loss", "lr", "grad_norm", "source/default/delivered"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in logged) == list(range(1, STEPS + 1)), key
    for metric in client.get_metric_history(run.info.run_id, "loss"):
        assert metric.value == want[metric.step]["loss"], metric.step


# ------------------------------------------------------------------------------ other launchers


def test_torchrun_starts_the_same_training(reference, synthetic_shards, tmp_path):
    """``torchrun --nproc_per_node 2``: the ranks take their place from its environment and
    take the reference's steps (4 of them; the start-up is the launcher's only part)."""
    run = launch(synthetic_shards, tmp_path / "run", "train.steps=4", launcher=_torchrun)
    assert [e["step"] for e in run.history] == [1, 2, 3, 4]
    assert_same_training(run, reference, steps=[1, 2, 3, 4], keys=LOSSES)


def test_accelerate_launch_takes_the_zero_stage_of_its_config(
    reference, synthetic_shards, tmp_path
):
    """``accelerate launch --config_file launch/accelerate/zero3.yaml``: two CPU ranks, ZeRO-3
    from the accelerate config (not the run config's 2); ZeRO-3 takes ZeRO-2's steps."""
    config_file = ROOT / "launch" / "accelerate" / "zero3.yaml"
    run = launch(
        synthetic_shards,
        tmp_path / "run",
        "train.steps=4",
        launcher=_accelerate(config_file),
    )
    resolved = yaml.safe_load((run.output_dir / "config.yaml").read_text())
    assert resolved["parallel"]["zero_stage"] == 3 and resolved["parallel"]["precision"] == "fp32"
    deepspeed_json = json.loads((run.output_dir / "deepspeed.json").read_text())
    assert deepspeed_json["zero_optimization"]["stage"] == 3
    assert_same_training(run, reference, steps=[1, 2, 3, 4], keys=LOSSES)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_accelerate_config_is_a_zero_stage_on_two_cpu_processes(stage):
    config = yaml.safe_load((ROOT / "launch" / "accelerate" / f"zero{stage}.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["use_cpu"] is True
    assert config["deepspeed_config"]["zero_stage"] == stage and config["num_processes"] == 2


# ------------------------------------------------------------------------------ two nodes


def test_two_nodes_on_one_machine(reference, synthetic_shards, tmp_path):
    """Two launchers, one per simulated node (``--hostfile``, ``--no_ssh``, ``--node_rank``),
    each starting local rank 0: one world of 2. Each node runs in its own directory with a
    RELATIVE output path, so whatever a rank writes lands under its own node: shared files
    (config, summary, evaluation, MLflow) must appear under node 0 only."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = _free_port()
    overrides = [f"data.eval_shards={synthetic_shards['eval']}"]
    jobs = []
    try:
        for node in (0, 1):
            directory = tmp_path / f"node{node}"
            directory.mkdir()
            launcher = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh"]
            launcher += ["--node_rank", str(node)]
            launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
            command = _command(synthetic_shards, "out", overrides, launcher)
            jobs.append(_launch_in_background(command, directory, directory / "launcher.log"))
        deadline = time.monotonic() + 300
        # a node that fails leaves the other waiting for it at a collective: stop at once
        while time.monotonic() < deadline and any(job.poll() is None for job in jobs):
            if any(job.poll() not in (None, 0) for job in jobs):
                break
            time.sleep(0.2)
    finally:
        for job in jobs:
            _kill_job(job)
        _remove_shm_buffers(port)
    logs = [(tmp_path / f"node{n}" / "launcher.log").read_text() for n in (0, 1)]
    for job, log in zip(jobs, logs, strict=True):
        assert job.returncode == 0, log[-4000:]

    node0, node1 = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    run = Run(node0, 0, logs[0], [])
    assert run.summary["world_size"] == 2 and run.summary["rank"] == 0
    # the same world as two ranks on one node: the same ranks read the same data splits
    # (a node reading rank 0's share twice, or all shards, would train on other samples)
    assert_same_training(run, reference)
    shared = ("summary.json", "config.yaml", "deepspeed.json", "mlflow.db", "loss_curve.png")
    for name in shared:
        assert (node0 / name).is_file(), name
        assert not (node1 / name).exists(), f"node 1 (global rank 1) wrote {name}"
    assert list((node0 / "eval").glob("*.json")) and not (node1 / "eval").exists()
    # checkpoints: each rank its own shard and state; `latest` by global rank 0 only
    tag = f"step_{STEPS:08d}"
    assert (node0 / "checkpoints" / "latest").read_text() == tag
    assert not (node1 / "checkpoints" / "latest").exists()
    assert (node1 / "checkpoints" / tag / "trainer_state_rank1.json").is_file()
    assert (node1 / "checkpoints" / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert not (node1 / "checkpoints" / tag / "trainer_state_rank0.json").exists()
    # INFO lines from global rank 0 only: node 1 (rank 1) prints warnings and errors alone
    assert f"checkpoint {tag} saved" in logs[0]
    assert f"checkpoint {tag} saved" not in logs[1]


# ------------------------------------------------------------------------------ the log


def test_a_two_rank_log_says_each_thing_once(reference):
    """Both ranks run the same code; their INFO lines come from rank 0 alone, each once, and
    the libraries' chatter stays out: DeepSpeed's print of its comm op (once per rank),
    transformers' "Loading weights" bars, MLflow's schema INFO lines, matplotlib's font cache
    line, and the FutureWarning of DeepSpeed's calls of torch's deprecated collectives."""
    lines = reference.log.splitlines()
    info = [line.split(" INFO ", 1)[1] for line in lines if " INFO " in line]
    assert len(info) > 10
    repeated = {line for line in info if info.count(line) > 1}
    assert not repeated, repeated
    assert sum(f"checkpoint step_{STEPS:08d} saved" in line for line in info) == 1
    assert sum("rank 0/2 (local 0)" in line for line in info) == 1
    assert "rank 1/2" not in reference.log
    for chatter in (
        "built successfully",
        "Loading weights",
        "MLflow database tables",
        "fontManager",
        "FutureWarning",
    ):
        assert chatter not in reference.log, chatter


def test_a_job_leaves_no_shared_memory_behind(reference):
    """DeepSpeed's CPU all-reduce segments (~66 MB per rank in /dev/shm): gone with the job."""
    assert reference.shm_left_behind == []


# ------------------------------------------------------------------------------ MLflow


def test_mlflow_run_of_a_two_rank_job(reference):
    output = reference.output_dir
    client = MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    experiment = client.get_experiment_by_name("vidrec-pretrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "rank 1 (or a second start) created a run"
    run = runs[0]
    assert run.info.run_id == reference.summary["mlflow_run_id"]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["train.steps"] == str(STEPS)
    assert params["parallel.zero_stage"] == "2"
    assert params["world_size"] == "2"
    assert params["versions.torch"] == torch.__version__
    assert params["precision.resolved"] == "fp32"
    assert int(params["parameters"]) > 0

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    loss = history("loss")
    assert [step for step, _ in loss] == list(range(1, STEPS + 1))
    assert [value for _, value in loss] == pytest.approx(reference.series("loss"), rel=1e-6)
    for key in ("lr", "samples_per_second", "loss_contrastive", "grad_norm", "logit_scale"):
        assert len(history(key)) == STEPS, key
    # the blend trained on, both ranks summed: 4 samples per rank and step
    delivered = history("source/default/delivered")
    assert delivered == [(step, 8.0 * step) for step in range(1, STEPS + 1)]
    assert {value for _, value in history("source/default/skipped")} == {0.0}
    t2v = history("eval_t2v_r1")
    assert t2v == [(STEPS, pytest.approx(reference.summary["evaluation"]["t2v_r1"]))]

    def artifacts(path=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    assert {"config", "eval", "loss_curve.png"} <= artifacts()
    assert artifacts("config") == {"config/config.yaml", "config/deepspeed.json"}
    assert artifacts("eval") == {f"eval/step_{STEPS:08d}.json"}
    logged_config = client.download_artifacts(run.info.run_id, "config/config.yaml")
    assert Path(logged_config).read_text() == (output / "config.yaml").read_text()
