"""Distributed training on Ray Train: equivalence with the in-process loop, resume rules across
launchers, fault recovery, --resume, refusals, MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import ray.cloudpickle as cloudpickle
import torch
from conftest import REPO
from ray_helpers import KillRankOneAt, assert_same_step, run_on_two_workers, small_vae

from cvae_model import CompressionVAE
from cvae_model.checkpoint import load_checkpoint
from cvae_model.config import TrainConfig
from cvae_model.training import make_optimizer, train_step
from pipeline.ray_training import DistributedConfig, run_distributed_training
from pipeline.tracking import tracking_uri

# Ray workers cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODEL_ARGS = {"dim_latent": 2, "iaf_flow_length": 2, "cells_encoder": (32, 16)}


def _equivalence_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    model = small_vae()
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
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8)).astype(np.float32)
    eps = rng.normal(size=(8, 2)).astype(np.float32)
    out = run_on_two_workers(_equivalence_worker, x, eps, "equivalence", tmp_path)
    model = small_vae()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-2))
    train_step(model, optimizer, torch.from_numpy(x), keep_prob=1.0, grad_clip_norm=100.0,
               eps=torch.from_numpy(eps))
    assert_same_step(out, model, initial)


def _weights_and_adam(estimator: CompressionVAE) -> tuple[dict[str, np.ndarray], int, float]:
    state = estimator.model_.state_dict()
    adam = estimator.state_.optimizer
    steps = {int(s["step"]) for s in adam["state"].values()}
    assert len(steps) == 1
    return ({k: v.numpy().copy() for k, v in state.items()}, steps.pop(),
            float(adam["param_groups"][0]["lr"]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_continues_across_launchers_exactly(
        ray_session: Any, cvae_home: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """N steps in process then M on Ray Train (1 worker), and the reverse, equal N + M steps in
    process: the same step, optimizer state, learning rate and batch (and noise) sequence."""
    X = digits[0][:600]
    train_args = {"lr_scheduling": False, "test_every": 40, "verbose": False}
    params = {"random_state": 3, "batch_size": 32, **MODEL_ARGS}

    straight = CompressionVAE(X, logdir=tmp_path / "straight", **params).train(num_steps=60, **train_args)
    expected, adam_steps, lr = _weights_and_adam(straight)
    assert adam_steps == 60

    for first, then in ((0, 1), (1, 0)):
        split = CompressionVAE(X, logdir=tmp_path / f"split{first}", num_workers=first, **params)
        split.train(num_steps=40, **train_args)
        split.set_params(num_workers=then)
        split.train(num_steps=20, **train_args)
        weights, steps, split_lr = _weights_and_adam(split)
        assert (split.state_.step, steps, split_lr) == (60, 60, lr)
        for name, value in expected.items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
        saved = load_checkpoint(tmp_path / f"split{first}" / "checkpoint-000000060")
        assert saved.train_config is not None and saved.train_config.seed == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_training_matches_in_process_and_is_tracked(
        ray_session: Any, cvae_home: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = digits
    train, valid = X[:1500], X[1500:]
    steps = 600
    local = CompressionVAE(train, X_valid=valid, logdir=tmp_path / "local", random_state=0,
                           **MODEL_ARGS)  # type: ignore[arg-type]
    local.train(num_steps=steps, lr_scheduling=False, test_every=100, verbose=False)
    local_val = local.history_[-1]["val_loss"]

    config = TrainConfig(num_steps=steps, batch_size=64, test_every=100, checkpoint_every=300,
                         lr_scheduling=False, seed=0)
    result = run_distributed_training(train, MODEL_ARGS, config,
                                      DistributedConfig(num_workers=2, run_name="accuracy"),
                                      valid_source=valid)
    ray_val = result.metrics["val_loss"]
    assert result.checkpoint.train_state.step == steps
    assert abs(ray_val - local_val) <= 0.05 * local_val, (ray_val, local_val)
    assert [h["step"] for h in result.history] == list(range(0, steps + 1, 100))

    # MLflow: from a fresh process, params, metric history and artifacts are all there.
    script = f"""
import json, mlflow
from pipeline.tracking import tracking_uri
c = mlflow.MlflowClient(tracking_uri())
run = c.get_run({result.run_id!r})
hist = c.get_metric_history(run.info.run_id, "val_loss")
arts = [a.path for a in c.list_artifacts(run.info.run_id)]
ckpts = [a.path for a in c.list_artifacts(run.info.run_id, "checkpoints")]
print(json.dumps({{"status": run.info.status, "params": run.data.params, "steps": [m.step for m in hist],
  "arts": arts, "ckpts": ckpts, "tags": run.data.tags}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ})
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["status"] == "FINISHED"
    assert info["params"]["model.dim_latent"] == "2" and info["params"]["train.seed"] == "0"
    assert info["params"]["train.num_steps"] == str(steps)
    assert info["params"]["dist.num_workers"] == "2"
    assert sorted(set(info["steps"])) == list(range(0, steps + 1, 100))
    assert {"config.json", "checkpoints"} <= set(info["arts"])
    assert info["ckpts"] == ["checkpoints/checkpoint-000000300", "checkpoints/checkpoint-000000600"]
    assert info["tags"]["cvae.feature_dim"] == "64" and info["tags"]["cvae.train_rows"] == "1500"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_restarts_from_the_latest_checkpoint(
        ray_session: Any, cvae_home: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = digits
    # The original objective: this test is about the restart, and 64-row steps keep it short.
    config = TrainConfig(num_steps=300, batch_size=64, test_every=50, checkpoint_every=100,
                         lr_scheduling=False, seed=None, neighbour_weight=0.0)
    marker = tmp_path / "killed"
    result = run_distributed_training(
        X, MODEL_ARGS, config, DistributedConfig(num_workers=2, run_name="fault", max_failures=1),
        callbacks=[KillRankOneAt(150, str(marker))])
    assert marker.read_text() == "150"  # the worker really died at step 150
    assert result.checkpoint.train_state.step == 300
    client = mlflow.MlflowClient(tracking_uri())
    steps = [m.step for m in client.get_metric_history(result.run_id, "val_loss")]
    # Continuous and each step once: it resumed at the step-100 checkpoint. A restart from
    # scratch would have logged steps 0-100 twice; a lost checkpoint would leave a gap.
    assert sorted(steps) == list(range(0, 301, 50))
    # seed=None drew a seed, recorded with the run and in the checkpoint (it no longer means 0).
    seed = result.checkpoint.train_config.seed
    assert isinstance(seed, int) and client.get_run(result.run_id).data.params["train.seed"] == str(seed)


@pytest.mark.timeout(120)
def test_an_empty_validation_split_is_refused_on_ray(ray_session: Any, cvae_home: Path,
                                                     digits: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"The validation split \(train_valid_split=1.0 of an "
                                         r"in-memory array \(1797, 64\)\) has 0 row\(s\)"):
        run_distributed_training(digits[0], MODEL_ARGS, TrainConfig(num_steps=10),
                                 DistributedConfig(num_workers=2), train_valid_split=1.0)
    tiny = digits[0][:3]
    with pytest.raises(ValueError, match=r"has 1 row\(s\); at least 2 are needed.*fewer workers"):
        run_distributed_training(tiny, MODEL_ARGS, TrainConfig(num_steps=10, batch_size=2),
                                 DistributedConfig(num_workers=2), valid_source=tiny[:1])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_killed_driver_resumes_and_a_reused_name_is_refused(ray_session: Any, cvae_home: Path,
                                                            tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tree = tmp_path / "tree"
    for i, row in enumerate(rng.normal(size=(600, 16)).astype(np.float32)):
        (tree / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        np.save(tree / f"d{i % 5}" / f"{i}.npy", row)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "CVAE_HOME": str(cvae_home)}
    args = [sys.executable, "-m", "jobs.train", "--data", str(tree), "--num-workers", "2",
            "--num-steps", "600", "--checkpoint-every", "100", "--test-every", "50",
            "--no-lr-scheduling", "--run-name", "resumable", "--cells-encoder", "16,8",
            "--iaf-flow-length", "1", "--neighbour-weight", "0", "--quiet"]
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    snapshot = cvae_home / "ray_results" / "resumable" / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        # A checkpoint counts for a resume once Ray Train's controller has recorded it in its
        # snapshot, which can lag the checkpoint directory's appearance.
        try:
            return "checkpoint_" in snapshot.read_text()
        except OSError:
            return False

    deadline = time.time() + 180
    while time.time() < deadline and not registered():
        time.sleep(0.25)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert registered(), "no checkpoint before the kill"

    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert ("A Ray Train run named 'resumable' already exists" in again.stderr
            and "pass --resume to continue it, or choose a new --run-name" in again.stderr)

    client = mlflow.MlflowClient(f"sqlite:///{cvae_home / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("cvae").experiment_id])[0]
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
    # Resumed from a checkpoint, not from scratch: step 0 was validated only once.
    assert [m.step for m in history].count(0) == 1
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert summary["seed"] == int(client.get_run(run.info.run_id).data.params["train.seed"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_estimator_trains_through_ray_train_with_num_workers(
        ray_session: Any, cvae_home: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = digits
    estimator = CompressionVAE(X, logdir=tmp_path / "run", random_state=0, num_workers=2,
                               **MODEL_ARGS)  # type: ignore[arg-type]
    estimator.train(num_steps=100, test_every=50, checkpoint_every=100, lr_scheduling=False)
    assert estimator.state_.step == 100
    assert (tmp_path / "run" / "checkpoint-000000100").is_dir()
    assert [h["step"] for h in estimator.history_] == [0, 50, 100]
    restored = CompressionVAE(logdir=tmp_path / "run")
    assert np.array_equal(restored.embed(X[:20]), estimator.embed(X[:20]))
