"""Shared fixtures: one Ray runtime per test session, quiet and bounded."""

from __future__ import annotations

import logging
import os

# Before ray/mlflow are imported anywhere: nothing may reach the internet, and Ray Data resource
# starvation must raise instead of hanging for 30 minutes.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """A local Ray runtime with the CI machine's 2 CPUs, shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture()
def cvae_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own embedded MLflow store and job outputs (``CVAE_HOME``)."""
    monkeypatch.setenv("CVAE_HOME", str(tmp_path / "home"))
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: drop an earlier test's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"
