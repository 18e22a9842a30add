"""The background thread that delivers a tracker's buffered records to MLflow.

``Outbox`` holds what the training side logged (metric points, bounded; params, tags, dicts
and artifact paths, never dropped) under one lock; ``Sender`` is the one thread that owns the
``MlflowClient`` and empties it. Its rule: a failure that retrying can fix (connection refused,
timeouts, 5xx) keeps the records and backs off; a rejection (HTTP 400/404, a missing file)
drops the rejected records alone with a warning, so nothing is retried forever.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One logger for the tracker and its thread: a user filters "pretrain.tracking" for both.
logger = logging.getLogger("pretrain.tracking")

MAX_METRICS_PER_BATCH = 1000
RESUMED_FROM_TAG = "vidrec.tracking.resumed_from"

MetricPoint = tuple[str, float, int, int]
"""(key, value, timestamp in ms, step)."""


class Outbox:
    """What the training side logged and the sender has not delivered yet."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.metrics: collections.deque[MetricPoint] = collections.deque()
        self.records: collections.deque[tuple[str, Any]] = collections.deque()
        self.in_flight = 0
        self.dropped = 0
        self.warned_full = False

    def pending(self) -> int:
        with self.lock:
            return len(self.metrics) + self.in_flight + len(self.records)

    def trim(self) -> bool:
        """Drop the oldest metric points past ``max_queue`` (lock held). True the first time
        this outage."""
        excess = len(self.metrics) - self.max_queue
        if excess <= 0:
            return False
        for _ in range(excess):
            self.metrics.popleft()
        self.dropped += excess
        newly_full, self.warned_full = not self.warned_full, True
        return newly_full


class Sender:
    """Creates (or continues) the run, then sends ``outbox`` every ``flush_interval_s`` until
    ``stop``; see the ``pretrain.tracking`` module docstring for the outage rules."""

    def __init__(self, settings, tracking_uri: str, outbox: Outbox, run_id: str | None):
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.outbox = outbox
        self.run_id = run_id
        self.run_ready = False
        self.final_status: str | None = None
        self.terminated = False
        self.abandoned = False
        self.refused = False
        """True once the store refused to create the run: tracking is off for the job."""
        self.outage_since: float | None = None
        self.wake = threading.Event()
        self.first_attempt = threading.Event()
        self._client = None
        self._rejected_keys: set[str] = set()
        self._held_steps: dict[str, int] = {}
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, status: str, timeout: float) -> None:
        """Deliver what is buffered, set the run's ``status``, end the thread; give up after
        ``timeout`` s (``abandoned``)."""
        self.final_status = status
        self.wake.set()
        self._thread.join(timeout)
        self.abandoned = self._thread.is_alive()

    def warn_full(self) -> None:
        logger.warning(
            "MLflow buffer full (%d metric points): dropping the oldest until %s answers",
            self.outbox.max_queue,
            self.tracking_uri,
        )

    # --------------------------------------------------------------------- the thread

    def _work(self) -> None:
        backoff = self.settings.retry_initial_s
        try:
            while not self.abandoned:
                # Cleared before looking for work, so a wake-up sent meanwhile is not lost.
                self.wake.clear()
                # Read before delivering: stop() sets the status after the last record was
                # buffered, so a drain that starts after this read sends everything.
                stopping = self.final_status is not None
                try:
                    if not self._deliver() or self.abandoned:
                        return
                    self._note_recovered()
                    if stopping:
                        self.terminated = self._send_or_drop("run status", self._set_status)
                        return
                except Exception as err:
                    self.first_attempt.set()
                    self._note_outage(err)
                    delay = backoff
                    if self.final_status is not None:
                        # stop() is waiting: retry often until its deadline.
                        delay = min(delay, 1.0)
                    backoff = min(backoff * 2, self.settings.retry_max_s)
                    self.wake.wait(delay)
                    continue
                backoff = self.settings.retry_initial_s
                self.wake.wait(self.settings.flush_interval_s)
        except BaseException:
            logger.exception("MLflow tracker thread stopped by an unexpected error")
        finally:
            self.first_attempt.set()

    def _deliver(self) -> bool:
        """Send everything buffered. Raises on a transient failure; False when tracking gave
        up for good (the run cannot be created)."""
        outbox = self.outbox
        if not self.run_ready:
            try:
                self._ensure_run()
            except Exception as err:
                if not is_rejection(err):
                    raise
                logger.error(
                    "MLflow at %s refused to create the run (%s); tracking is off for this "
                    "job, training goes on",
                    self.tracking_uri,
                    short_error(err),
                )
                self.refused = True
                with outbox.lock:
                    outbox.metrics.clear()
                    outbox.records.clear()
                return False
            finally:
                self.first_attempt.set()
        while not self.abandoned:
            with outbox.lock:
                if not outbox.records:
                    break
                kind, payload = outbox.records[0]
            self._send_record(kind, payload)
            with outbox.lock:
                outbox.records.popleft()
        while not self.abandoned:
            with outbox.lock:
                batch = []
                while outbox.metrics and len(batch) < MAX_METRICS_PER_BATCH:
                    point = outbox.metrics.popleft()
                    if point[0] not in self._rejected_keys and not self._held(point):
                        batch.append(point)
                outbox.in_flight = len(batch)
            if not batch:
                break
            try:
                self._send_metrics(batch)
            except BaseException:
                with outbox.lock:
                    outbox.metrics.extendleft(reversed(batch))
                    newly_full = outbox.trim()
                if newly_full:
                    self.warn_full()
                raise
            finally:
                outbox.in_flight = 0
        return True

    def _held(self, point: MetricPoint) -> bool:
        """True for a step the continued run holds already: a job killed after its
        checkpoint had logged the steps past it, which its resume computes (with exact resume,
        to the same values) and would otherwise log a second time."""
        key, _, _, step = point
        return step <= self._held_steps.get(key, -1)

    def _set_status(self) -> None:
        self._client.set_terminated(self.run_id, self.final_status)

    def _ensure_run(self) -> None:
        from mlflow import MlflowClient

        if self._client is None:
            if not self.settings.tracking_uri and self.tracking_uri.startswith("sqlite:"):
                output_dir(self.settings).mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        tags = {}
        if self.run_id is not None:
            try:
                client.update_run(self.run_id, status="RUNNING")
                # MLflow keeps each metric's latest point, the one at its highest step.
                latest = client.get_run(self.run_id).data.to_proto().metrics
                self._held_steps = {metric.key: metric.step for metric in latest}
                self.run_ready = True
                logger.info("MLflow: continuing run %s at %s", self.run_id, self.tracking_uri)
                return
            except Exception as err:
                if not is_rejection(err):
                    raise
                logger.warning(
                    "MLflow: cannot continue run %s (%s); starting a new run",
                    self.run_id,
                    short_error(err),
                )
                tags[RESUMED_FROM_TAG] = self.run_id
        run = client.create_run(
            self._experiment_id(), run_name=self.settings.run_name, tags=tags or None
        )
        self.run_id = run.info.run_id
        self.run_ready = True
        logger.info(
            "MLflow: run %s (%s) in experiment %r at %s",
            run.info.run_id,
            run.info.run_name,
            self.settings.experiment,
            self.tracking_uri,
        )

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        client, name = self._client, self.settings.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            if not self.settings.tracking_uri and self.tracking_uri.startswith("sqlite:"):
                # MLflow's default would be ./mlruns in whatever directory the job starts in.
                location = (output_dir(self.settings) / "mlartifacts").absolute().as_uri()
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException as err:
                # Another job created it in between.
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            logger.warning("MLflow: experiment %r was deleted; restoring it", name)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _send_record(self, kind: str, payload: Any) -> None:
        from mlflow.entities import Param, RunTag

        client, run_id = self._client, self.run_id
        if kind == "params":
            self._send_entities("param", [Param(k, v) for k, v in payload], "params")
        elif kind == "tags":
            self._send_entities("tag", [RunTag(k, v) for k, v in payload], "tags")
        elif kind == "text":
            text, artifact_file = payload
            self._send_or_drop(
                f"artifact {artifact_file}", lambda: client.log_text(run_id, text, artifact_file)
            )
        elif kind == "artifact":
            path, artifact_path = payload
            self._send_or_drop(
                f"artifact {path}", lambda: client.log_artifact(run_id, path, artifact_path)
            )

    def _send_metrics(self, batch: list[MetricPoint]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in batch]
        self._send_entities("metric", metrics, "metrics")

    def _send_entities(self, what: str, entities: list, field: str) -> None:
        """``log_batch`` of params, tags or metrics. A rejected batch is resent per key so
        that one bad name or changed param costs only its own records. Resending points that
        did arrive is harmless: MLflow stores an identical metric point once."""
        client, run_id = self._client, self.run_id
        try:
            client.log_batch(run_id, **{field: entities})
            return
        except Exception as err:
            if not is_rejection(err):
                raise
        by_key: dict[str, list] = {}
        for entity in entities:
            by_key.setdefault(entity.key, []).append(entity)
        for key, group in by_key.items():
            sent = self._send_or_drop(
                f"{what} {key!r}", lambda group=group: client.log_batch(run_id, **{field: group})
            )
            if not sent and what == "metric":
                # Later points of this name would be rejected too: skip them from now on.
                self._rejected_keys.add(key)

    def _send_or_drop(self, what: str, send: Callable[[], Any]) -> bool:
        """Run ``send``; if MLflow rejects it, warn and drop it (False). Transient errors
        propagate, so the record stays buffered."""
        try:
            send()
            return True
        except Exception as err:
            if not is_rejection(err):
                raise
            logger.warning("MLflow rejected %s (%s); dropped", what, short_error(err))
            return False

    def _note_outage(self, err: Exception) -> None:
        if self.outage_since is not None:
            logger.debug("MLflow still unreachable: %s", short_error(err))
            return
        self.outage_since = time.monotonic()
        logger.warning(
            "MLflow at %s is unreachable (%s); training goes on, records are kept (up to %d "
            "metric points) and retried in the background",
            self.tracking_uri,
            short_error(err),
            self.outbox.max_queue,
        )

    def _note_recovered(self) -> None:
        if self.outage_since is None:
            return
        logger.warning(
            "MLflow at %s answers again after %.0f s; buffered records delivered "
            "(%d metric points dropped so far)",
            self.tracking_uri,
            time.monotonic() - self.outage_since,
            self.outbox.dropped,
        )
        self.outage_since = None
        self.outbox.warned_full = False


def output_dir(settings) -> Path:
    """Where the default sqlite store, its artifacts and the loss curve go."""
    return Path(settings.output_dir or ".").absolute()


def is_rejection(err: BaseException) -> bool:
    """True when retrying cannot help: MLflow answered that the request is invalid or names
    something that does not exist (HTTP 400/404), or a local file is missing. Everything else
    (connection refused, timeouts, 5xx, 429, auth that may come back) counts as an outage."""
    from mlflow.exceptions import MlflowException
    from requests import HTTPError

    if isinstance(err, MlflowException):
        return err.get_http_status_code() in (400, 404)
    if isinstance(err, HTTPError) and err.response is not None:
        status = err.response.status_code
        return 400 <= status < 500 and status not in (401, 403, 408, 429)
    return isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError))


def short_error(err: BaseException, limit: int = 300) -> str:
    """One-line error text. MLflow's connection errors run to ~1000 characters with the
    endpoint at the start and the cause ("Connection refused") at the end: keep both."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


# MLflow reads its HTTP settings from os.environ on every request. Trackers that run at the
# same time share one override; the last one to finish removes what the first one set.
_http_env_lock = threading.Lock()
_http_env_users = 0
_http_env_set: list[str] = []


def http_env_acquire(request_timeout_s: int) -> None:
    global _http_env_users
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    with _http_env_lock:
        if _http_env_users == 0:
            # Zero retries: the sender retries itself, with backoff, without blocking anyone;
            # MLflow's backoff factor and jitter only matter between its own retries.
            for variable, value in (
                (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 0),
                (MLFLOW_HTTP_REQUEST_TIMEOUT, request_timeout_s),
            ):
                if not variable.defined:
                    variable.set(value)
                    _http_env_set.append(variable.name)
        _http_env_users += 1


def http_env_release() -> None:
    global _http_env_users
    with _http_env_lock:
        _http_env_users -= 1
        if _http_env_users == 0:
            for name in _http_env_set:
                os.environ.pop(name, None)
            _http_env_set.clear()
