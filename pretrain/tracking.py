"""MLflow experiment tracking that never stops or stalls training.

Only global rank 0 tracks (``Tracker(settings, enabled=is_main)``); on every other rank each
method returns at once and mlflow is never imported.

How it works. ``log_metrics`` and friends only append to in-memory buffers under a lock; one
background thread owns the ``MlflowClient`` and does all of MLflow's work: it creates (or
resumes) the run, then every ``flush_interval_s`` sends the buffered records, metrics in
``log_batch`` calls of up to 1000 points. When the tracking server is down or goes away:

- the thread warns once per outage, keeps the records and retries with exponential backoff
  (``retry_initial_s`` doubling up to ``retry_max_s``); when the server answers again it
  delivers what was kept and says so. If ``start()`` could not reach the server, the run is
  created when it comes back.
- buffered metric points are bounded by ``max_queue``; past it the oldest points are dropped
  and counted (the count is set as the run tag ``vidrec.tracking.dropped_metric_points``).
  Params, tags, dicts and artifact paths are few and are never dropped.
- records the server *rejects* (HTTP 400/404: a changed param value on resume, an invalid
  metric name, a missing file) are dropped one by one with a warning instead of being retried
  forever; a batch rejected as a whole is resent entity by entity, so one bad name costs only
  its own records.
- ``finish()`` waits at most ``finish_timeout_s`` for the buffers to drain and the run status
  to be set, then gives up with a warning naming what was not delivered.
- a continued run (``resume_run_id``) never gets a second point at a step it holds: a job
  killed after its checkpoint had logged steps past it, which the resumed job computes again.

This module is the run's API; the thread and its outage handling are
``pretrain.tracking_sender``.

MLflow's own HTTP retries (7, exponential backoff: minutes per request) and its 120 s request
timeout would hold the thread on one request for that long; for http(s) tracking URIs the
tracker sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` =
``request_timeout_s`` in ``os.environ`` from ``start()`` to ``finish()``. MLflow reads these
per request from the process environment and offers no per-client setting, so other MLflow
calls in this process see them too while a tracker runs; variables already set by the user
are left alone, and ours are removed again at ``finish()``.

MLflow's own async logging (``log_batch(synchronous=False)``) is not used: its queue is
unbounded and a batch that fails is logged and lost, not kept for when the server is back.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import subprocess
import time
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from data_shards.atomic import atomic_write_bytes
from pretrain.tracking_sender import (
    MAX_METRICS_PER_BATCH,
    Outbox,
    Sender,
    http_env_acquire,
    http_env_release,
    output_dir,
)

logger = logging.getLogger(__name__)

# MLflow 3's limits (mlflow.utils.validation; tests/test_tracking.py checks they still agree).
# Copied so that flatten_params, which every rank evaluates, does not import mlflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
DROPPED_TAG = "vidrec.tracking.dropped_metric_points"
_TRUNCATION_MARK = "...[truncated]"
_PLOT_POINTS = 10_000
"""Points per curve in the loss-curve PNG; longer histories are strided so rendering stays
well under a second however long the run."""


@dataclass
class TrackingSettings:
    tracking_uri: str = ""
    """MLflow tracking URI. Empty: ``MLFLOW_TRACKING_URI`` if set, else
    ``sqlite:///<output_dir>/mlflow.db`` (artifacts then go to ``<output_dir>/mlartifacts``)."""
    experiment: str = "vidrec-pretrain"
    """Experiment name; created if missing."""
    run_name: str | None = None
    """Run name; None lets MLflow pick one."""
    output_dir: str = ""
    """Where the default ``mlflow.db`` and ``loss_curve.png`` go; empty: the current
    directory. The training stage points it at its own output directory."""
    flush_interval_s: float = 5.0
    """Seconds between sends of buffered records (sooner when 1000 metric points wait)."""
    max_queue: int = 100_000
    """Metric points kept while MLflow is unreachable; past this the oldest are dropped."""
    request_timeout_s: int = 10
    """Seconds one HTTP request to the tracking server may take (connect, or between bytes)."""
    retry_initial_s: float = 1.0
    """First wait before retrying an unreachable server; doubles after each failure."""
    retry_max_s: float = 60.0
    """Longest wait between retries."""
    start_timeout_s: float = 10.0
    """``start()`` waits up to this long for the run to exist so that ``run_id`` is known
    right away; it returns as soon as the first attempt fails (the server is down)."""
    finish_timeout_s: float = 30.0
    """``finish()`` gives up delivering after this long."""
    checkpoint_timeout_s: float = 10.0
    """At each checkpoint, rank 0 waits up to this long for every record logged so far to
    reach MLflow before ``latest`` moves to it (``flush_for_checkpoint``); 0: no wait."""

    def __post_init__(self):
        timings = (self.flush_interval_s, self.retry_initial_s, self.retry_max_s)
        if min(timings) <= 0:
            raise ValueError("flush_interval_s, retry_initial_s and retry_max_s must be > 0")
        if min(self.start_timeout_s, self.finish_timeout_s, self.checkpoint_timeout_s) < 0:
            raise ValueError(
                "start_timeout_s, finish_timeout_s and checkpoint_timeout_s must be >= 0"
            )
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        # MLflow parses MLFLOW_HTTP_REQUEST_TIMEOUT with int().
        if not isinstance(self.request_timeout_s, int) or self.request_timeout_s < 1:
            raise ValueError("request_timeout_s must be an integer >= 1")


def resolve_tracking_uri(settings: TrackingSettings) -> str:
    """The URI the tracker logs to (see ``TrackingSettings.tracking_uri``)."""
    if settings.tracking_uri:
        return settings.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{output_dir(settings).as_posix()}/mlflow.db"


def flatten_params(params: Mapping[str, Any], sep: str = ".") -> dict[str, str]:
    """Nested config → flat MLflow params: ``{"a": {"b": 1}}`` → ``{"a.b": "1"}``.

    Lists of plain values stay one readable value (``"[0.9, 0.95]"``); lists holding dicts or
    lists are indexed (``sources.0.path``). Dataclasses count as dicts. Values longer than
    MLflow accepts are cut and marked; keys longer than it accepts are cut and given a short
    hash so that they stay distinct.
    """
    flat: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                visit(f"{prefix}{sep}{key}" if prefix else str(key), item)
        elif isinstance(value, (list, tuple)) and any(
            isinstance(item, (Mapping, list, tuple)) or is_dataclass(item) for item in value
        ):
            for index, item in enumerate(value):
                visit(f"{prefix}{sep}{index}" if prefix else str(index), item)
        else:
            if isinstance(value, tuple):
                value = list(value)
            flat[_fit_key(prefix)] = _fit_value(str(value), MAX_PARAM_VAL_LENGTH)

    for key, value in params.items():
        visit(str(key), value)
    return flat


def environment_params() -> dict[str, str]:
    """Installed versions of the main packages and the git commit of this source tree."""
    params = {}
    for package in ("torch", "deepspeed", "transformers", "webdataset", "av", "mlflow"):
        try:
            params[f"versions.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            params[f"versions.{package}"] = "not installed"
    params["git_commit"] = _git_commit()
    return params


class Tracker:
    """One MLflow run, logged from a background thread (see the module docstring).

    All methods are safe to call from the training loop: they buffer and return. With
    ``enabled=False`` every method returns at once and ``run_id`` stays None.
    """

    def __init__(self, settings: TrackingSettings, enabled: bool = True):
        self.settings = settings
        self.enabled = enabled
        self.tracking_uri: str | None = None
        self._outbox = Outbox(settings.max_queue)
        self._sender: Sender | None = None
        self._open = False
        self._history: dict[str, tuple[array, array]] = {}
        self._warned_values: set[str] = set()
        self._http_env_held = False
        self._pid = os.getpid()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None until the run exists (or when disabled)."""
        return self._sender.run_id if self._sender else None

    @property
    def dropped_metric_points(self) -> int:
        """Metric points dropped because the buffer was full during an outage."""
        return self._outbox.dropped

    @property
    def _accepting(self) -> bool:
        return self._open and not self._sender.refused

    def start(
        self,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        resume_run_id: str | None = None,
    ) -> None:
        """Start the background thread: create the run (or continue ``resume_run_id``) and
        log ``params`` and ``tags``. Never raises because MLflow is unreachable."""
        if not self.enabled:
            return
        if self._sender is not None:
            raise RuntimeError("Tracker.start() was already called")
        # Imported here, on the caller's thread, so that the background thread never imports
        # a module concurrently with the training thread.
        import mlflow  # noqa: F401

        self.tracking_uri = resolve_tracking_uri(self.settings)
        if self.tracking_uri.startswith(("http://", "https://")):
            http_env_acquire(self.settings.request_timeout_s)
            self._http_env_held = True
        self._sender = Sender(self.settings, self.tracking_uri, self._outbox, resume_run_id)
        self._open = True
        self.log_params(params or {})
        tags = [
            (_fit_key(str(k)), _fit_value(str(v), MAX_TAG_VAL_LENGTH))
            for k, v in (tags or {}).items()
        ]
        self._buffer(("tags", c) for c in _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH))
        self._sender.start()
        atexit.register(self._finish_at_exit)
        self._sender.first_attempt.wait(self.settings.start_timeout_s)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one point per metric at ``step``. Pass Python numbers: ``float()`` of a
        CUDA tensor would make the training step wait for the GPU."""
        if not self._accepting:
            return
        timestamp = int(time.time() * 1000)
        step = int(step)
        points = []
        for key, value in metrics.items():
            try:
                points.append((key, float(value), timestamp, step))
            except (TypeError, ValueError):
                if key not in self._warned_values:
                    self._warned_values.add(key)
                    logger.warning("metric %r: %r is not a number; not logged", key, value)
        outbox = self._outbox
        with outbox.lock:
            for key, value, _, _ in points:
                steps, values = self._history.setdefault(key, (array("q"), array("d")))
                steps.append(step)
                values.append(value)
            outbox.metrics.extend(points)
            newly_full = outbox.trim()
            wake = len(outbox.metrics) >= MAX_METRICS_PER_BATCH
        if newly_full:
            self._sender.warn_full()
        if wake and self._sender.outage_since is None:
            self._sender.wake.set()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Buffer params (values cut to MLflow's limit; see ``flatten_params`` for nesting)."""
        if not self._accepting:
            return
        items = [
            (_fit_key(str(k)), _fit_value(str(v), MAX_PARAM_VAL_LENGTH)) for k, v in params.items()
        ]
        self._buffer(("params", c) for c in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Log ``obj`` as a JSON (or, for ``.yaml``/``.yml`` names, YAML) artifact. It is
        serialized now, so later changes to ``obj`` do not leak into the artifact."""
        if not self._accepting:
            return
        try:
            text = json.dumps(obj, indent=2, default=_plain)
            if artifact_file.endswith((".yaml", ".yml")):
                import yaml

                text = yaml.safe_dump(json.loads(text), sort_keys=False)
        except (TypeError, ValueError) as err:
            logger.warning("log_dict(%s): cannot serialize (%s); not logged", artifact_file, err)
            return
        self._buffer([("text", (text, artifact_file))])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (under ``artifact_path`` in the run). It is read when it is sent, so
        it must stay in place until ``finish()``."""
        if not self._accepting:
            return
        path = Path(local_path).absolute()
        if not path.is_file():
            logger.warning("log_artifact: %s is not a file; not logged", path)
            return
        self._buffer([("artifact", (str(path), artifact_path))])

    def log_loss_curve(
        self, keys: Iterable[str] = ("loss",), filename: str = "loss_curve.png"
    ) -> Path | None:
        """Plot the logged history of ``keys`` (one panel each, log y when all values are
        positive) into ``output_dir/filename`` and log it as an artifact. Returns the path,
        or None when none of the keys has been logged."""
        if not self.enabled or self._sender is None:
            return None
        keys = list(keys)
        with self._outbox.lock:
            series = {
                key: (list(self._history[key][0]), list(self._history[key][1]))
                for key in keys
                if key in self._history
            }
        if not series:
            logger.info("loss curve: none of %s was logged; no plot", list(keys))
            return None
        path = output_dir(self.settings) / filename
        try:
            atomic_write_bytes(path, _render_curves(series))
        except Exception:
            # A plotting or disk problem must not end the run at its very end.
            logger.warning("loss curve: could not write %s", path, exc_info=True)
            return None
        if self._accepting:
            self._buffer([("artifact", (str(path.absolute()), None))])
        return path

    def flush(self, timeout: float | None = None, *, stop_on_outage: bool = False) -> bool:
        """Wake the sender and wait until everything buffered is delivered (at most
        ``timeout`` s, default ``finish_timeout_s``). True if it was. ``stop_on_outage``:
        give up at once while the server is known to be unreachable."""
        sender = self._sender
        if not self.enabled or sender is None:
            return True
        deadline = time.monotonic() + (
            self.settings.finish_timeout_s if timeout is None else timeout
        )
        sender.wake.set()
        while self._outbox.pending() or not sender.run_ready:
            if time.monotonic() >= deadline or not sender.is_alive():
                return False
            if stop_on_outage and sender.outage_since is not None:
                return False
            time.sleep(0.02)
        return True

    def flush_for_checkpoint(self, tag: str) -> bool:
        """Before checkpoint ``tag`` becomes ``latest``: deliver every metric logged so far, so
        that a job killed after the checkpoint (SIGKILL skips every exit hook) has tracked
        each step the checkpoint holds, and its restart does not redo them. Bounded by
        ``checkpoint_timeout_s``, and no wait at all during an outage: training never stalls
        on MLflow. True if everything was delivered."""
        if self.flush(self.settings.checkpoint_timeout_s, stop_on_outage=True):
            return True
        if self._accepting:
            logger.warning(
                "checkpoint %s: MLflow at %s has not received every metric up to it (%d "
                "records still buffered); they stay buffered and are sent later",
                tag,
                self.tracking_uri,
                self._outbox.pending(),
            )
        return False

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> int:
        """Deliver what is buffered, set the run's status, stop the thread. Waits at most
        ``timeout`` s (default ``finish_timeout_s``) and returns how many records were not
        delivered (metric points, other records, and the status update itself)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        sender, outbox = self._sender, self._outbox
        if not self.enabled or sender is None or sender.final_status is not None:
            return 0
        atexit.unregister(self._finish_at_exit)
        timeout = self.settings.finish_timeout_s if timeout is None else timeout
        started = time.monotonic()
        self._open = False
        with outbox.lock:
            if outbox.dropped:
                outbox.records.append(("tags", [(DROPPED_TAG, str(outbox.dropped))]))
        sender.stop(status, timeout)
        with outbox.lock:
            metric_points = len(outbox.metrics) + outbox.in_flight
            records = len(outbox.records)
        undelivered = metric_points + records + (0 if sender.terminated else 1)
        if self._http_env_held:
            self._http_env_held = False
            http_env_release()
        if undelivered:
            logger.warning(
                "MLflow at %s: gave up after %.1f s with %d metric points, %d other records and "
                "the run status (%s, %s) undelivered",
                self.tracking_uri,
                time.monotonic() - started,
                metric_points,
                records,
                status,
                "set" if sender.terminated else "not set",
            )
        if outbox.dropped:
            logger.warning("MLflow: %d metric points were dropped during outages", outbox.dropped)
        return undelivered

    def _buffer(self, records: Iterable[tuple[str, Any]]) -> None:
        with self._outbox.lock:
            self._outbox.records.extend(records)

    def _finish_at_exit(self) -> None:
        # A training script that dies with an exception never reaches finish(); mark the run
        # FAILED and deliver what is buffered. A forked child inherits this hook: not its run.
        if os.getpid() == self._pid and self._sender.final_status is None:
            logger.warning("Tracker.finish() was not called; marking MLflow run as FAILED")
            self.finish("FAILED", timeout=min(self.settings.finish_timeout_s, 10.0))


# ------------------------------------------------------------------------- helpers


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _fit_value(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def _fit_key(key: str) -> str:
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{key[: MAX_ENTITY_KEY_LENGTH - 9]}~{digest}"


def _plain(value: Any) -> Any:
    """JSON fallback: numpy/torch scalars by value, anything else as text."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


def _render_curves(series: Mapping[str, tuple[list[int], list[float]]]) -> bytes:
    """PNG bytes: one panel per key, shared step axis."""
    # The object-oriented API renders with Agg without touching pyplot's global state, so it
    # is safe next to whatever backend the caller's process selected.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 2.4 * len(series)), layout="constrained")
    axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, (steps, values)) in zip(axes, series.items(), strict=True):
        stride = max(1, math.ceil(len(steps) / _PLOT_POINTS))
        steps, values = steps[::stride], values[::stride]
        ax.plot(steps, values, linewidth=1.0)
        finite = [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel("step")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
