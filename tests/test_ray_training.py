"""Distributed training on Ray Train: equivalence, accuracy, fault recovery, resume, MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ray.cloudpickle as cloudpickle
import mlflow
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from cvae_model import CompressionVAE
from cvae_model.checkpoint import CHECKPOINT_FILES
from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.training import make_optimizer, train_step
from cvae_model.vae import VAE
from pipeline.ray_training import DistributedConfig, run_distributed_training

REPO = Path(__file__).resolve().parents[1]
# Ray workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODEL_ARGS = {"dim_latent": 2, "iaf_flow_length": 2, "cells_encoder": (32, 16)}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def _equivalence_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=8, dim_latent=2, iaf_flow_length=2, cells_encoder=(16, 8)))
    module = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(module, TrainConfig(learning_rate=1e-2))
    x = torch.tensor(config["x"])[rank * 4:(rank + 1) * 4]
    eps = torch.tensor(config["eps"])[rank * 4:(rank + 1) * 4]
    train_step(module, optimizer, x, keep_prob=1.0, grad_clip_norm=100.0, eps=eps)
    if rank == 0:
        np.savez(config["out"], **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    ray.train.report({"done": 1})


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_workers_one_step_equals_one_in_process_step_of_twice_the_batch(
        ray_session: Any, tmp_path: Path) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8)).astype(np.float32)
    eps = rng.normal(size=(8, 2)).astype(np.float32)
    out = tmp_path / "ddp.npz"
    TorchTrainer(_equivalence_worker,
                 train_loop_config={"x": x.tolist(), "eps": eps.tolist(), "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=2,
                                                        resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(name="equivalence",
                                                storage_path=str(tmp_path / "ray"))).fit()
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=8, dim_latent=2, iaf_flow_length=2, cells_encoder=(16, 8)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-2))
    train_step(model, optimizer, torch.from_numpy(x), keep_prob=1.0, grad_clip_norm=100.0,
               eps=torch.from_numpy(eps))
    with np.load(out) as ddp:
        for name, value in model.state_dict().items():
            np.testing.assert_allclose(ddp[name], value.numpy(), atol=1e-5, rtol=0, err_msg=name)
            assert not torch.equal(initial[name], value) or "mask" in name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_training_matches_in_process_and_is_tracked(
        ray_session: Any, cvae_home: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = digits
    train, valid = X[:1500], X[1500:]
    steps, batch = 600, 64
    local = CompressionVAE(train, X_valid=valid, logdir=tmp_path / "local", random_state=0,
                           **MODEL_ARGS)  # type: ignore[arg-type]
    local.train(num_steps=steps, lr_scheduling=False, test_every=100, verbose=False)
    local_val = local.history_[-1]["val_loss"]

    config = TrainConfig(num_steps=steps, batch_size=batch, test_every=100, checkpoint_every=300,
                         lr_scheduling=False, seed=0)
    result = run_distributed_training(train, MODEL_ARGS, config,
                                      DistributedConfig(num_workers=2, run_name="accuracy"),
                                      valid_source=valid)
    ray_val = result.metrics["val_loss"]
    assert result.step == steps
    assert abs(ray_val - local_val) <= 0.05 * local_val, (ray_val, local_val)

    # The checkpoint is the one format, loadable by the estimator.
    assert set(os.listdir(result.checkpoint_dir)) == CHECKPOINT_FILES
    estimator = CompressionVAE.load(result.checkpoint_dir)
    assert estimator.embed(valid).shape == (len(valid), 2)

    # MLflow: from a fresh process, params, metric history and artifacts are all there.
    script = f"""
import json, mlflow, numpy as np
from pipeline.tracking import tracking_uri
mlflow.set_tracking_uri(tracking_uri())
c = mlflow.MlflowClient()
run = c.get_run({result.run_id!r})
hist = c.get_metric_history(run.info.run_id, "val_loss")
arts = [a.path for a in c.list_artifacts(run.info.run_id)]
ckpts = [a.path for a in c.list_artifacts(run.info.run_id, "checkpoints")]
cfg = json.load(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.json")))
norm = np.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="normalization.npz"))
print(json.dumps({{"status": run.info.status, "params": run.data.params, "steps": [m.step for m in hist],
  "arts": arts, "ckpts": ckpts, "dim_latent": cfg["model"]["dim_latent"], "mean_len": len(norm["mean"]),
  "tags": run.data.tags}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ})
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["status"] == "FINISHED"
    assert info["params"]["model.dim_latent"] == "2"
    assert info["params"]["train.num_steps"] == str(steps)
    assert info["params"]["dist.num_workers"] == "2"
    assert sorted(set(info["steps"])) == list(range(0, steps + 1, 100))
    assert {"config.json", "normalization.npz", "checkpoints"} <= set(info["arts"])
    assert info["ckpts"] == ["checkpoints/checkpoint-000000300", "checkpoints/checkpoint-000000600"]
    assert info["dim_latent"] == 2 and info["mean_len"] == 64
    assert info["tags"]["cvae.feature_dim"] == "64" and info["tags"]["cvae.train_rows"] == "1500"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_restarts_from_the_latest_checkpoint(
        ray_session: Any, cvae_home: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = digits
    config = TrainConfig(num_steps=300, batch_size=64, test_every=50, checkpoint_every=100,
                         lr_scheduling=False, seed=0)
    marker = tmp_path / "killed"
    result = run_distributed_training(
        X, MODEL_ARGS, config,
        DistributedConfig(num_workers=2, run_name="fault", max_failures=1,
                          fault_injection={"step": 150, "marker": str(marker)}))
    assert marker.read_text() == "150"  # the worker really died at step 150
    assert result.step == 300
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(result.run_id, "val_loss")]
    # Continuous and each step once: it resumed at the step-100 checkpoint. A restart from
    # scratch would have logged steps 0-100 twice; a lost checkpoint would leave a gap.
    assert sorted(steps) == list(range(0, 301, 50))
    assert CompressionVAE.load(result.checkpoint_dir).embed(X[:10]).shape == (10, 2)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_killed_driver_resumes_with_resume_flag(ray_session: Any, cvae_home: Path,
                                                tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npy"
    np.save(data, rng.normal(size=(600, 16)).astype(np.float32))
    tree = tmp_path / "tree"
    for i, row in enumerate(np.load(data)):
        (tree / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        np.save(tree / f"d{i % 5}" / f"{i}.npy", row)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "CVAE_HOME": str(cvae_home)}
    args = [sys.executable, "-m", "jobs.train", "--data", str(tree), "--num-workers", "2",
            "--num-steps", "600", "--checkpoint-every", "100", "--test-every", "50",
            "--no-lr-scheduling", "--run-name", "resumable", "--cells-encoder", "16,8",
            "--iaf-flow-length", "1", "--seed", "0", "--quiet"]
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    storage = cvae_home / "ray_results" / "resumable"
    deadline = time.time() + 180
    snapshot = storage / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        # A checkpoint counts for a resume once Ray Train's controller has recorded it in its
        # snapshot, which can lag the checkpoint directory's appearance.
        try:
            return "checkpoint_" in snapshot.read_text()
        except OSError:
            return False

    while time.time() < deadline and not registered():
        time.sleep(0.25)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert registered(), "no checkpoint before the kill"

    mlflow.set_tracking_uri(f"sqlite:///{cvae_home / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = mlflow.search_runs(experiment_names=["cvae"], output_format="list")[0]
    killed_at = max(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert killed_at < 600

    second = subprocess.run([*args, "--resume"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout[second.stdout.index("{"):])
    assert summary["mlflow_run_id"] == run.info.run_id  # the same MLflow run continues
    assert summary["step"] == 600
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted({m.step for m in history}) == list(range(0, 601, 50))
    # Resumed from a checkpoint (>= 200), not from scratch: step 0 was validated only once.
    assert [m.step for m in history].count(0) == 1
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_estimator_trains_through_ray_train_with_num_workers(
        ray_session: Any, cvae_home: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = digits
    estimator = CompressionVAE(X, logdir=tmp_path / "run", random_state=0, num_workers=2,
                               **MODEL_ARGS)  # type: ignore[arg-type]
    before = estimator.embed(X[:20])
    estimator.train(num_steps=100, test_every=50, checkpoint_every=100, lr_scheduling=False)
    assert estimator.state_.step == 100
    assert (tmp_path / "run" / "checkpoint-000000100").is_dir()
    assert not np.array_equal(before, estimator.embed(X[:20]))
    # A second call continues the same model on Ray for 50 more steps.
    estimator.train(num_steps=50, test_every=50, checkpoint_every=100, lr_scheduling=False)
    assert estimator.state_.step == 150
    restored = CompressionVAE(logdir=tmp_path / "run")
    assert np.array_equal(restored.embed(X[:20]), estimator.embed(X[:20]))
