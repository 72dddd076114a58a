"""MLflow: where runs go, and the one run lifecycle of training and of the jobs.

Embedded default: with no ``MLFLOW_TRACKING_URI`` set, runs and the model registry live in a
SQLite database and artifacts in a folder, both under ``./cvae_runs`` (``CVAE_HOME`` moves it).
With ``MLFLOW_TRACKING_URI`` set (``http://host:5000``, ``sqlite:///...``), that server or store is
used as it is.

Tracking never decides the fate of the work: every ``RunTracker`` call is retried, then logged
as a warning; once the server has failed ``MAX_FAILURES`` calls in a row tracking stops for that
run (one warning) and the work goes on. A run ends FINISHED, FAILED (an exception) or KILLED
(Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "RunTracker",
    "code_version",
    "configure_client_retries",
    "cvae_home",
    "ensure_experiment",
    "flat_params",
    "tracking_uri",
]

logger = logging.getLogger("cvae.tracking")

T = TypeVar("T")
RETRIES = 2
MAX_FAILURES = 3


def cvae_home() -> Path:
    """Folder of the embedded MLflow store and of default job outputs (``$CVAE_HOME`` or ./cvae_runs)."""
    return Path(os.environ.get("CVAE_HOME", "cvae_runs")).expanduser().resolve()


def _embedded_uri() -> str:
    return f"sqlite:///{cvae_home() / 'mlflow.db'}"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store under ``cvae_home()``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    cvae_home().mkdir(parents=True, exist_ok=True)
    return _embedded_uri()


def configure_client_retries() -> None:
    """Bound MLflow's own HTTP retries (by default ~2 minutes per call against a dead server),
    so ``RunTracker`` notices an outage in seconds. Explicit settings in the environment win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _default_artifact_location(experiment: str) -> str | None:
    """Artifacts of the embedded store go under cvae_home(), not MLflow's CWD-relative ./mlruns."""
    if tracking_uri() != _embedded_uri():
        return None  # a server or another store decides (e.g. --artifacts-destination)
    return (cvae_home() / "artifacts" / experiment).as_uri()


def ensure_experiment(name: str, client: Any = None) -> str:
    """The id of experiment ``name`` in ``tracking_uri()`` (created if new)."""
    import mlflow

    client = client or mlflow.MlflowClient(tracking_uri())
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_default_artifact_location(name))
    except Exception:  # created concurrently by another process
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def code_version() -> str:
    """The git commit of the code, or the package version outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cvae")
    except PackageNotFoundError:
        return "unknown"


def flat_params(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """Config dicts as MLflow params (``model.dim_latent`` ...), values as strings."""
    return {f"{prefix}.{k}": str(v) for k, v in values.items()}


class RunTracker:
    """One MLflow run, best-effort. Create with ``start`` (new, or found again by a tag) or
    ``attach`` (a run another process started, e.g. on a Ray worker)."""

    def __init__(self, uri: str | None = None, enabled: bool = True) -> None:
        self.uri = uri or (tracking_uri() if enabled else "")
        self.enabled = enabled
        self.run_id: str | None = None
        self.failures = 0
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import mlflow

            configure_client_retries()
            self._client = mlflow.MlflowClient(self.uri)
        return self._client

    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        if not self.enabled:
            return None
        for attempt in range(RETRIES + 1):
            try:
                result = fn()
                self.failures = 0
                return result
            except Exception as exc:
                error = exc
                if attempt < RETRIES:
                    time.sleep(0.5 * (attempt + 1))
        self.failures += 1
        logger.warning("MLflow at %s: %s failed (%s: %s); the work goes on", self.uri, what,
                       type(error).__name__, str(error).splitlines()[0][:200])
        if self.failures >= MAX_FAILURES:
            logger.warning("MLflow at %s failed %d calls in a row: tracking stops for run %s",
                           self.uri, self.failures, self.run_id)
            self.enabled = False
        return None

    @classmethod
    def attach(cls, uri: str, run_id: str) -> RunTracker:
        tracker = cls(uri)
        tracker.run_id = run_id
        return tracker

    def start(self, experiment: str, *, run_name: str | None = None,
              tags: Mapping[str, str] | None = None,
              find_tag: tuple[str, str] | None = None) -> RunTracker:
        """Create a run (or, with ``find_tag``, continue the latest run carrying that tag)."""
        def create() -> str:
            experiment_id = ensure_experiment(experiment, self.client)
            if find_tag is not None:
                key, value = find_tag
                found = self.client.search_runs(
                    [experiment_id], filter_string=f"tags.`{key}` = '{value}'",
                    order_by=["attributes.start_time DESC"], max_results=1)
                if found:
                    self.client.update_run(found[0].info.run_id, status="RUNNING")
                    return found[0].info.run_id
            run = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
            return run.info.run_id

        self.run_id = self._call(f"starting a run in experiment {experiment!r}", create)
        self.enabled = self.enabled and self.run_id is not None
        return self

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:  # before importing mlflow (~1 s) for nothing
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        self._call("logging parameters", lambda: self.client.log_batch(self.run_id, params=items))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:  # before importing mlflow (~1 s) for nothing
            return
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        self._call(f"logging metrics of step {step}",
                   lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:  # before importing mlflow (~1 s) for nothing
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("setting tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._call(f"logging artifact {os.fspath(path)}", lambda: self.client.log_artifact(
            self.run_id, os.fspath(path), artifact_path))

    def log_artifacts(self, folder: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._call(f"logging artifacts of {os.fspath(folder)}", lambda: self.client.log_artifacts(
            self.run_id, os.fspath(folder), artifact_path))

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self._call(f"logging {name}", lambda: self.client.log_dict(self.run_id, dict(data), name))

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        if self.run_id is not None:
            self._call(f"ending run {self.run_id} as {status}",
                       lambda: self.client.set_terminated(self.run_id, status))

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")
