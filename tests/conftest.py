"""Shared fixtures: one Ray runtime per session, the digits, a small trained model, a tree, a parquet."""

from __future__ import annotations

import logging
import os
import tempfile
import time

# Before ray/mlflow are imported anywhere: nothing may reach the internet, and Ray Data resource
# starvation must raise instead of hanging for 30 minutes. Token authentication is turned off for
# this suite's own local runtime only (tests that check a user's job start theirs without this).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Nothing a test runs may write into the checkout's cvae_runs/ (a run name left there by an
# earlier session would be refused as reused): the session's own home, unless a test sets one.
os.environ.setdefault("CVAE_HOME", tempfile.mkdtemp(prefix="cvae-test-home-"))

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


def wait_for_first_part(folder: Path, output: str, seconds: float = 120) -> bool:
    """Wait until a job writing ``folder/output`` has written a part into its hidden attempt
    (``.OUTPUT.tmp-*/parts-*/*.parquet``); whether one appeared within ``seconds``."""
    pattern = f".{output}.tmp-*/parts-*/*.parquet"
    deadline = time.time() + seconds
    while time.time() < deadline:
        if any(folder.glob(pattern)):
            return True
        time.sleep(0.02)
    return any(folder.glob(pattern))


SMALL_MODEL = {"dim_latent": 2, "iaf_flow_length": 2, "cells_encoder": [32, 16]}
"""A model that trains in about a second and exercises the flow."""


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """A local Ray runtime with the CI machine's 2 CPUs, shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module's fits: on the 2-core CI machine with its other core
    busy, two threads wait on each other at every op (measured: 300 digits steps 4 ms each alone,
    300 ms each so)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def cvae_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own embedded MLflow store and job outputs (``CVAE_HOME``)."""
    monkeypatch.setenv("CVAE_HOME", str(tmp_path / "home"))
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: drop an earlier test's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (1797, 64) float32 features and their labels."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


@pytest.fixture(scope="session")
def rows() -> np.ndarray:
    """5,000 rows of 16 features on a 4-D subspace: quick to learn, unlike noise."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=(5000, 4)) @ rng.normal(size=(4, 16))).astype(np.float32)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    """The logdir of a small model trained on ``rows`` for 40 steps (two checkpoints kept)."""
    from cvae_model import CompressionVAE

    logdir = tmp_path_factory.mktemp("trained") / "logdir"
    CompressionVAE(rows[:1000], logdir=logdir, random_state=0, **SMALL_MODEL).train(
        num_steps=40, test_every=20, checkpoint_every=20, verbose=False)
    return logdir


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    """``rows`` as a tree of 5,000 .npy files in nested folders."""
    root = tmp_path_factory.mktemp("tree")
    for i, row in enumerate(rows):
        folder = root / f"shard{i % 10}" / f"sub{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i}.npy", row)
    return root


@pytest.fixture(scope="session")
def parquet(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    """``rows`` as 4 parquet files: ``key`` (k0 ... k4999) and ``x`` (fixed_shape_tensor)."""
    folder = tmp_path_factory.mktemp("parquet")
    for part in range(4):
        chunk = slice(part * 1250, (part + 1) * 1250)
        pq.write_table(pa.table({
            "key": pa.array([f"k{i}" for i in range(chunk.start, chunk.stop)]),
            "x": pa.FixedShapeTensorArray.from_numpy_ndarray(rows[chunk])}),
            folder / f"{part}.parquet", row_group_size=500)
    return folder
