"""Shared by the registry and serving tests: two small fitted models, an embedded store, and
publishing / loading them as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import REPO

from cvae_model import CompressionVAE
from cvae_model.checkpoint import load_checkpoint
from pipeline.registry import client_for, log_cvae_model, register
from pipeline.tracking import ensure_experiment

EXPERIMENT = "registry-test"


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(200, 10)).astype(np.float32)


def train_tiny(data: np.ndarray, logdir: Path, seed: int) -> CompressionVAE:
    """A 10 -> 2 estimator trained for 50 steps (about a second)."""
    model = CompressionVAE(data, logdir=logdir, random_state=seed, dim_latent=2,
                           iaf_flow_length=1, cells_encoder=[16, 8])
    return model.train(num_steps=50, test_every=25, verbose=False)


@pytest.fixture(scope="module")
def trained(data: np.ndarray, tmp_path_factory: pytest.TempPathFactory
            ) -> list[tuple[CompressionVAE, Path]]:
    """Two fitted estimators (seeds 0 and 1) and their saved checkpoint directories."""
    root = tmp_path_factory.mktemp("trained")
    out = []
    for seed in (0, 1):
        model = train_tiny(data, root / f"logdir-{seed}", seed)
        out.append((model, model.save(root / f"checkpoint-{seed}")))
    return out


def use_store(home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point ``CVAE_HOME`` and ``MLFLOW_TRACKING_URI`` at an embedded store under ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("CVAE_HOME", str(home))
    uri = f"sqlite:///{home.resolve() / 'mlflow.db'}"  # the embedded default, spelled out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def publish(model: CompressionVAE, checkpoint: Path, name: str, aliases: list[str]) -> str:
    """Log + register in an MLflow run, as a training job does; the new version."""
    client_for()  # MLflow's current store: the one tracking_uri() names
    mlflow.set_experiment(experiment_id=ensure_experiment(EXPERIMENT))
    with mlflow.start_run() as run:
        mlflow.log_metric("val_loss", model.history_[-1]["val_loss"])
        info = log_cvae_model(load_checkpoint(checkpoint))
    version = register(info.model_uri, name, aliases, run_id=run.info.run_id)
    return str(version.version)


def embed_in_fresh_process(uri: str, X: np.ndarray, tmp: Path) -> dict[str, np.ndarray]:
    """Embeddings by ``CompressionVAE.load(uri)`` and by ``mlflow.pyfunc.load_model(uri)`` in a
    new Python process that sees only the environment (the tracking URI)."""
    np.save(tmp / "x.npy", X)
    script = (
        "import sys, numpy as np, mlflow\n"
        "from cvae_model import CompressionVAE\n"
        "uri, x = sys.argv[1], np.load(sys.argv[2])\n"
        "np.save(sys.argv[3], CompressionVAE.load(uri).embed(x))\n"
        "np.save(sys.argv[4], mlflow.pyfunc.load_model(uri).predict(x))\n")
    outputs = [tmp / "z_estimator.npy", tmp / "z_pyfunc.npy"]
    subprocess.run([sys.executable, "-c", script, uri, str(tmp / "x.npy"), *map(str, outputs)],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=90)
    return {"estimator": np.load(outputs[0]), "pyfunc": np.load(outputs[1])}
