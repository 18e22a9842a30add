"""Experiment tracking: sqlite by default, a real ``mlflow server`` on 127.0.0.1, and that
server going away mid-run (killed, then restarted on the same port and store)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import pytest
from mlflow import MlflowClient

from pretrain.tracking import (
    DROPPED_TAG,
    Tracker,
    TrackingSettings,
    environment_params,
    flatten_params,
    resolve_tracking_uri,
)
from pretrain.tracking_sender import RESUMED_FROM_TAG

# Short waits so that outages are noticed and retried within the test's time; a long start
# wait, which ends at the first answer, because creating the sqlite schema on a loaded
# machine can take longer than the default 10 s.
FAST = dict(
    flush_interval_s=0.1, retry_initial_s=0.1, retry_max_s=0.5, request_timeout_s=2,
    start_timeout_s=60,
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class MlflowServer:
    """``mlflow server`` in its own process group (it starts uvicorn as a child), so that
    stopping it stops all of it; restartable on the same port and store."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'srv.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        # The job runner (huey consumers) is not needed here and costs seconds per start.
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGKILL: the server vanishes the way a crashed or preempted one does.
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tracking_logs(caplog):
    caplog.set_level(logging.INFO, logger="pretrain.tracking")
    return caplog


# ------------------------------------------------------------------------- pure functions


@dataclass
class _Optimizer:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)


def test_flatten_params_nesting_and_limits():
    nested = {
        "model": {"width": 768, "layers": [1, 2, 3], "dropout": None, "empty": {}},
        "optimizer": _Optimizer(),
        "data": {"sources": [{"path": "/a", "weight": 0.5}, {"path": "/b", "weight": 0.5}]},
        "pairs": [[1, 2], [3]],
        "long": "x" * 7000,
        "k" * 300: 1,
        "k" * 299 + "j": 2,
        3: True,
    }
    flat = flatten_params(nested)
    assert flat["model.width"] == "768"
    assert flat["model.layers"] == "[1, 2, 3]"
    assert flat["model.dropout"] == "None"
    assert flat["model.empty"] == "{}"
    assert flat["optimizer.lr"] == "0.0003"
    assert flat["optimizer.betas"] == "[0.9, 0.95]"
    assert flat["data.sources.0.path"] == "/a" and flat["data.sources.1.weight"] == "0.5"
    assert flat["pairs.0"] == "[1, 2]" and flat["pairs.1"] == "[3]"
    assert flat["3"] == "True"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...[truncated]")
    long_keys = [key for key in flat if key.startswith("kkk")]
    assert len(long_keys) == 2 and all(len(key) == 250 for key in long_keys)
    assert all(isinstance(value, str) for value in flat.values())
    assert flatten_params({"a": {"b": 1}}, sep="/") == {"a/b": "1"}


def test_limits_match_mlflow():
    from mlflow.utils import validation

    from pretrain import tracking

    for name in (
        "MAX_PARAM_VAL_LENGTH",
        "MAX_TAG_VAL_LENGTH",
        "MAX_ENTITY_KEY_LENGTH",
        "MAX_PARAMS_TAGS_PER_BATCH",
        "MAX_METRICS_PER_BATCH",
    ):
        assert getattr(tracking, name) == getattr(validation, name), name


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = TrackingSettings(output_dir=str(tmp_path))
    assert resolve_tracking_uri(settings) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(settings) == "http://example:5000"
    settings = TrackingSettings(tracking_uri="sqlite:///x.db", output_dir=str(tmp_path))
    assert resolve_tracking_uri(settings) == "sqlite:///x.db"
    with pytest.raises(ValueError):
        TrackingSettings(request_timeout_s=0)


def test_environment_params():
    params = environment_params()
    assert {f"versions.{p}" for p in ("torch", "deepspeed", "mlflow", "av")} <= set(params)
    assert params["versions.mlflow"].startswith("3.")
    commit = params["git_commit"]
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)


# ------------------------------------------------------------------------- disabled


def test_disabled_tracker_is_a_no_op(tmp_path):
    """Non-zero ranks: nothing written, mlflow not even imported (run in a fresh process)."""
    script = f"""
import sys
from pathlib import Path
from pretrain.tracking import Tracker, TrackingSettings, flatten_params
out = Path({str(tmp_path)!r})
(out / "file.txt").write_text("x")
tracker = Tracker(TrackingSettings(output_dir=str(out)), enabled=False)
tracker.start(params=flatten_params({{"a": {{"b": 1}}}}), tags={{"t": "1"}})
tracker.log_metrics({{"loss": 1.0}}, step=1)
tracker.log_dict({{"x": 1}}, "eval/x.json")
tracker.log_artifact(out / "file.txt", "config")
assert tracker.log_loss_curve() is None
assert tracker.flush() is True
assert tracker.finish("FAILED") == 0
assert tracker.run_id is None
assert "mlflow" not in sys.modules and "matplotlib" not in sys.modules
"""
    env = os.environ.copy()
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


# ------------------------------------------------------------------------- sqlite


def test_sqlite_default_log_read_back_and_resume(tmp_path, monkeypatch, tracking_logs):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    out = tmp_path / "run"
    settings = TrackingSettings(output_dir=str(out), run_name="sqlite-test", **FAST)
    config_file = tmp_path / "config.yaml"
    config_file.write_text("model:\n  width: 8\n")

    tracker = Tracker(settings)
    tracker.start(
        params=flatten_params({"model": {"width": 8}, "world_size": 2}),
        tags={"vidrec.stage": "pretrain"},
    )
    run_id = tracker.run_id
    assert run_id is not None  # start() waits for the run to exist when the store answers
    for step in range(0, 60, 2):
        tracker.log_metrics({"loss": 4.0 / (step + 1), "lr": 3e-4, "skipped": None}, step=step)
    eval_result = {"recall@1": 0.25, "steps": [1, 2]}
    tracker.log_dict(eval_result, "eval/step_100.json")
    eval_result["recall@1"] = 0.9  # the artifact holds the value at log time
    tracker.log_artifact(config_file, "config")
    curve = tracker.log_loss_curve(keys=("loss", "lr", "never_logged"))
    assert tracker.finish() == 0

    assert curve == out / "loss_curve.png"
    assert curve.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    height, width, _ = matplotlib.image.imread(curve).shape
    assert height > 200 and width > 200
    assert _messages(tracking_logs, "'skipped'") and "is not a number" in tracking_logs.text

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "sqlite-test"
    assert run.data.params == {"model.width": "8", "world_size": "2"}
    assert run.data.tags["vidrec.stage"] == "pretrain"
    assert _history(client, run_id, "loss") == [(s, 4.0 / (s + 1)) for s in range(0, 60, 2)]
    assert [step for step, _ in _history(client, run_id, "lr")] == list(range(0, 60, 2))
    assert "skipped" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} == {"config", "eval", "loss_curve.png"}
    assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/config.yaml"]
    eval_path = client.download_artifacts(run_id, "eval/step_100.json", str(tmp_path))
    assert '"recall@1": 0.25' in Path(eval_path).read_text()
    assert (out / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()

    # A job restarted from a checkpoint continues the run whose id the checkpoint holds.
    resumed = Tracker(settings)
    resumed.start(params={"world_size": 2}, resume_run_id=run_id)
    assert resumed.run_id == run_id
    # steps the run holds (a killed job had logged them past its checkpoint) are not logged
    # again, whichever metric: one point per step; a step past them is
    resumed.log_metrics({"loss": 4.0 / 59, "lr": 3e-4}, step=58)
    resumed.log_metrics({"loss": 0.01, "lr": 3e-4}, step=60)
    assert resumed.finish("KILLED") == 0
    assert client.get_run(run_id).info.status == "KILLED"
    loss = _history(client, run_id, "loss")
    assert [step for step, _ in loss] == [*range(0, 60, 2), 60]
    assert loss[-1] == (60, 0.01)
    assert [step for step, _ in _history(client, run_id, "lr")] == [*range(0, 60, 2), 60]

    # A run id the store does not know (another server, a deleted run): a new run, tagged.
    unknown = Tracker(settings)
    unknown.start(resume_run_id="0" * 32)
    assert unknown.run_id not in (None, "0" * 32)
    assert unknown.finish() == 0
    assert client.get_run(unknown.run_id).data.tags[RESUMED_FROM_TAG] == "0" * 32


# ------------------------------------------------------------------------- mlflow server


def test_server_logging_and_rejections(server, tmp_path, monkeypatch, tracking_logs):
    retries = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    monkeypatch.delenv(retries, raising=False)
    artifact = tmp_path / "deepspeed.json"
    artifact.write_text("{}")
    settings = TrackingSettings(
        tracking_uri=server.uri, experiment="server-test", output_dir=str(tmp_path), **FAST
    )
    tracker = Tracker(settings)
    tracker.start(params={"lr": "0.1", "layers": "4"}, tags={"vidrec.parent_run": "abc"})
    assert tracker.run_id is not None
    assert os.environ[retries] == "0"  # MLflow's own retries off while the tracker runs
    for step in range(5):
        # "bad name!" is not a valid MLflow metric name: the server rejects the whole batch.
        tracker.log_metrics({"loss": 1.0 / (step + 1), "bad name!": 1.0}, step=step)
    tracker.log_params({"lr": "0.2", "batch": "64"})  # changing a param is refused
    tracker.log_artifact(artifact, "config")
    tracker.log_dict({"a": [1, 2]}, "eval/step_5.yaml")
    assert tracker.flush(timeout=20)
    tracker.log_metrics({"loss": 0.1, "bad name!": 2.0}, step=5)
    assert tracker.finish() == 0
    assert retries not in os.environ  # restored for the rest of the process

    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "layers": "4", "batch": "64"}
    assert run.data.tags["vidrec.parent_run"] == "abc"
    assert [step for step, _ in _history(client, tracker.run_id, "loss")] == list(range(6))
    assert set(run.data.metrics) == {"loss"}
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"config", "eval"}
    text = Path(client.download_artifacts(tracker.run_id, "eval/step_5.yaml", str(tmp_path)))
    assert text.read_text() == "a:\n- 1\n- 2\n"
    # Rejections are reported once per record, not retried forever.
    assert len(_messages(tracking_logs, "rejected metric 'bad name!'")) == 1
    assert len(_messages(tracking_logs, "rejected param 'lr'")) == 1
    assert not _messages(tracking_logs, "unreachable")


def test_checkpoint_flush_delivers_now_and_never_waits_on_a_dead_server(server, tmp_path):
    """Metrics buffered under a long flush interval are on the server when
    ``flush_for_checkpoint`` returns; with the server unreachable it returns at once."""
    settings = TrackingSettings(
        tracking_uri=server.uri,
        experiment="checkpoint-flush",
        output_dir=str(tmp_path),
        **(FAST | {"flush_interval_s": 600.0}),
    )
    tracker = Tracker(settings)
    tracker.start()
    tracker.flush(timeout=20)  # the start-up records; from here on only metrics wait
    for step in range(1, 5):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.flush_for_checkpoint("step_00000004")
    client = MlflowClient(server.uri)
    assert [step for step, _ in _history(client, tracker.run_id, "loss")] == [1, 2, 3, 4]
    tracker.finish()

    down = TrackingSettings(
        tracking_uri=f"http://127.0.0.1:{_free_port()}",
        output_dir=str(tmp_path),
        **(FAST | {"checkpoint_timeout_s": 30.0}),
    )
    unreachable = Tracker(down)
    unreachable.start()
    unreachable.log_metrics({"loss": 1.0}, step=1)
    started = time.monotonic()
    assert not unreachable.flush_for_checkpoint("step_00000001")
    assert time.monotonic() - started < 5
    unreachable.finish(timeout=0)


def test_server_outage_mid_run(server, tmp_path, tracking_logs):
    settings = TrackingSettings(
        tracking_uri=server.uri, experiment="outage-test", output_dir=str(tmp_path), **FAST
    )
    tracker = Tracker(settings)
    tracker.start(params={"p": "1"})
    run_id = tracker.run_id
    for step in range(10):
        tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
    assert tracker.flush(timeout=20)

    server.stop()
    try:
        slowest = 0.0
        for step in range(10, 40):
            started = time.perf_counter()
            tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.02)  # let the sender try (and fail) while training goes on
        _wait_for(lambda: _messages(tracking_logs, "unreachable"), 10, "the outage warning")
        tracker.log_dict({"during": "outage"}, "eval/outage.json")

        # A job that starts while the server is down: no run yet, records kept (at most 10).
        # localhost, not 127.0.0.1, so that its warnings can be told apart.
        late_uri = f"http://localhost:{server.port}"
        late_settings = TrackingSettings(
            tracking_uri=late_uri, experiment="late-start", max_queue=10, **FAST
        )
        late = Tracker(late_settings)
        started = time.perf_counter()
        late.start(params={"q": "2"})
        assert time.perf_counter() - started < 5
        assert late.run_id is None
        for step in range(25):
            started = time.perf_counter()
            late.log_metrics({"loss": float(step)}, step=step)
            slowest = max(slowest, time.perf_counter() - started)
        assert late.dropped_metric_points == 15
        assert len(_messages(tracking_logs, "buffer full")) == 1
        assert slowest < 0.05, f"log_metrics blocked for {slowest:.3f} s during the outage"
    finally:
        server.start()

    for step in range(40, 45):
        tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
    assert tracker.finish(timeout=30) == 0
    assert late.finish(timeout=30) == 0

    # One warning for the outage however many calls it spanned, and one when it ended.
    assert len(_messages(tracking_logs, f"{server.uri} is unreachable")) == 1
    assert len(_messages(tracking_logs, f"{server.uri} answers again")) == 1
    assert len(_messages(tracking_logs, f"{late_uri} is unreachable")) == 1

    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    expected = [(step, float(step)) for step in range(45)]
    assert _history(client, run_id, "loss") == expected  # before, during and after
    assert len(_history(client, run_id, "lr")) == 45
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/outage.json"]
    assert DROPPED_TAG not in client.get_run(run_id).data.tags

    late_run = client.get_run(late.run_id)
    assert late_run.info.status == "FINISHED" and late_run.data.params == {"q": "2"}
    # The oldest points were dropped: the newest 10 arrived.
    assert _history(client, late.run_id, "loss") == [(s, float(s)) for s in range(15, 25)]
    assert late_run.data.tags[DROPPED_TAG] == "15"


# ------------------------------------------------------------------------- never answers


@pytest.fixture(params=["refused", "silent"])
def dead_uri(request):
    """A port nobody listens on, or a socket that accepts connections and never answers."""
    if request.param == "refused":
        yield f"http://127.0.0.1:{_free_port()}"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_finish_gives_up_in_time(dead_uri, tmp_path, monkeypatch, tracking_logs):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    settings = TrackingSettings(
        tracking_uri=dead_uri,
        output_dir=str(tmp_path),
        **(FAST | {"request_timeout_s": 1, "start_timeout_s": 1.0}),
    )
    tracker = Tracker(settings)
    started = time.perf_counter()
    tracker.start(params={"a": "1"})
    assert time.perf_counter() - started < 3
    for step in range(20):
        started = time.perf_counter()
        tracker.log_metrics({"loss": 1.0}, step=step)
        assert time.perf_counter() - started < 0.05
    tracker.log_dict({"x": 1}, "x.json")

    started = time.perf_counter()
    undelivered = tracker.finish(timeout=1.0)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"finish took {elapsed:.1f} s"
    # 20 points, the params and the dict, and the run status.
    assert undelivered == 23
    (gave_up,) = _messages(tracking_logs, "gave up")
    assert "20 metric points, 2 other records" in gave_up
    assert tracker.run_id is None
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
