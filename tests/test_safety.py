"""What a user's job must survive: a second job racing it to the same output, MLflow going away
mid-run, and Ray's token authentication left on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import ray.cloudpickle as cloudpickle
from conftest import REPO, SMALL_MODEL
from server_helpers import free_port, running_mlflow_server

from cvae_model.config import TrainConfig
from pipeline.outputs import MANIFEST, CommittedOutput, OutputExistsError, read_manifest
from pipeline.ray_training import DistributedConfig, run_distributed_training

# Ray workers cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _write_part(output: CommittedOutput, text: str) -> dict[str, Any]:
    path = output.write_file("part-0.txt", text.encode())
    return {"parts": [{"path": path, "rows": 1}]}


def test_the_commit_rechecks_what_it_replaces(tmp_path: Path) -> None:
    """Two jobs start while the output does not exist; the one finishing second must not
    replace the first one's output unless it was started with overwrite."""
    target = tmp_path / "out"
    with CommittedOutput(str(target), overwrite=False) as first, \
            CommittedOutput(str(target), overwrite=False) as second:
        first.commit(_write_part(first, "first"))
        with pytest.raises(OutputExistsError, match=r"out already exists; pass --overwrite"):
            second.commit(_write_part(second, "second"))
    manifest = read_manifest(target)
    assert manifest["attempt"] == first.attempt
    assert (target / manifest["parts"][0]["path"]).read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the loser's attempt is removed

    with CommittedOutput(str(target), overwrite=True) as third, \
            CommittedOutput(str(target), overwrite=True) as fourth:
        third.commit(_write_part(third, "third"))
        fourth.commit(_write_part(fourth, "fourth"))  # both asked to replace: the last one wins
    assert read_manifest(target)["attempt"] == fourth.attempt
    assert (target / MANIFEST).is_file()


class KillServerAt:
    """A training callback that SIGKILLs the MLflow server's process group once, at a step."""

    def __init__(self, step: int, pid: int) -> None:
        self.step, self.pid = step, pid

    def on_step(self, step: int, loss: float) -> None:
        if step == self.step:
            os.killpg(self.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_finishes_when_the_mlflow_server_dies_mid_run(
        ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        digits: tuple[np.ndarray, np.ndarray]) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    X = digits[0]
    config = TrainConfig(num_steps=200, batch_size=64, test_every=50, checkpoint_every=50,
                         lr_scheduling=False, seed=3)
    port = free_port()
    with running_mlflow_server(tmp_path / "server", port=port) as (uri, proc):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        result = run_distributed_training(
            X, SMALL_MODEL, config, DistributedConfig(num_workers=1, run_name="outage"),
            callbacks=[KillServerAt(120, proc.pid)])
        assert proc.poll() is not None  # the server really died during training
    # Training went on to the end, and its final checkpoint came back through Ray.
    assert result.checkpoint.train_state.step == 200
    assert [r["step"] for r in result.history if "val_loss" in r][-1] == 200
    # What MLflow got before the outage is there; nothing after it, and nothing failed.
    with running_mlflow_server(tmp_path / "server", port=port) as (uri, _):
        client = mlflow.MlflowClient(uri)
        steps = sorted(m.step for m in client.get_metric_history(result.run_id, "val_loss"))
        assert steps == [0, 50, 100]
        assert client.get_run(result.run_id).info.status == "RUNNING"  # its end was not heard


def _embed_command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.embed", "--model", str(model), "--data", str(data),
            "--output", str(out), "--num-actors", "1", "--batch-size", "512", *extra]


@pytest.mark.timeout(180)
def test_a_complete_embed_exits_0_whatever_tracking_did(
        ray_session: Any, trained: Path, parquet: Path, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "MLFLOW_TRACKING_URI": dead, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    done = subprocess.run(_embed_command(trained, parquet, tmp_path / "z", "--column", "x",
                                         "--id-column", "key"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_manifest(tmp_path / "z")["rows_out"] == 5000
    assert f"MLflow at {dead}" in done.stderr and "the work goes on" in done.stderr


@pytest.mark.timeout(180)
def test_no_track_leaves_mlflow_alone(ray_session: Any, trained: Path, parquet: Path,
                                      tmp_path: Path) -> None:
    """``--no-track``: the output is written and no MLflow store is opened or created."""
    home = tmp_path / "cvae"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, CVAE_HOME=str(home))
    done = subprocess.run(_embed_command(trained, parquet, tmp_path / "z", "--column", "x",
                                         "--id-column", "key", "--no-track"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_manifest(tmp_path / "z")["rows_out"] == 5000
    assert not (home / "mlflow.db").exists() and not (home / "artifacts").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_job_keeps_rays_token_authentication(trained: Path, parquet: Path, tmp_path: Path) -> None:
    """With no RAY_AUTH_MODE and no RAY_ADDRESS, the job starts its own local Ray with Ray's
    default, token authentication: the token is written where Ray keeps it, and Ray says so."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(HOME=str(home), CVAE_HOME=str(tmp_path / "cvae"))
    done = subprocess.run(_embed_command(trained, parquet, tmp_path / "z", "--column", "x",
                                         "--id-column", "key", "--no-track"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_manifest(tmp_path / "z")["rows_out"] == 5000
    token = home / ".ray" / "auth_token"
    assert token.is_file() and len(token.read_text().strip()) >= 16
    assert "Token authentication is enabled" in done.stderr + done.stdout
