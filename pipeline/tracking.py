"""MLflow set-up and run logging shared by every job.

Embedded default: with no ``MLFLOW_TRACKING_URI`` set, runs and the model registry live in a
SQLite database and artifacts in a folder, both under ``./cvae_runs`` (``CVAE_HOME`` moves it).
With ``MLFLOW_TRACKING_URI`` set (``http://host:5000``, ``sqlite:///...``), that server or store is
used as it is.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_EXPERIMENT",
    "cvae_home",
    "code_version",
    "ensure_experiment",
    "tracking_uri",
]

DEFAULT_EXPERIMENT = "cvae"


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


def _default_artifact_location(experiment: str) -> str | None:
    """Artifacts of the embedded store go under cvae_home(), not MLflow's CWD-relative ./mlruns."""
    # (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so compare values, not presence.)
    if tracking_uri() != _embedded_uri():
        return None  # a server or another store decides (e.g. --default-artifact-root)
    return (cvae_home() / "artifacts" / experiment).as_uri()


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at ``tracking_uri()`` and return the id of experiment ``name`` (created if new)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
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


def flat_params(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    """Config dicts as MLflow params (``model.dim_latent`` ...), values as strings."""
    return {f"{prefix}.{k}": str(v) for k, v in values.items()}
