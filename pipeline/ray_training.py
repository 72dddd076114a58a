"""Data-parallel training on Ray Train: the second launcher of the one training loop.

The driver (``run_distributed_training``) reads and splits the data with ``pipeline.sources``,
computes the normalization statistics in one distributed pass, opens the MLflow run, and starts a
``TorchTrainer``. Each worker (``train_loop_per_worker``) builds the VAE, wraps it in DDP, feeds
its dataset shard to ``cvae_model.training.run_training`` — the same loop the in-process
estimator runs — all-reduces the validation sums so every worker takes the same LR-schedule and
stop decisions, and reports checkpoints (the cvae checkpoint format) to Ray. Rank 0 alone writes
to MLflow.

Batch size is global: ``batch_size`` rows per optimizer step in total, ``batch_size //
num_workers`` on each worker, so one step of N workers equals one in-process step.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cvae_model.checkpoint import (
    Checkpoint,
    TrainState,
    load_checkpoint,
    replace_directory,
    save_checkpoint,
)
from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.data import ArrayData
from cvae_model.normalization import Normalizer
from cvae_model.training import (
    ProgressRecord,
    ValidationResult,
    evaluate_batches,
    make_optimizer,
    make_scheduler,
    run_training,
)
from cvae_model.vae import VAE

__all__ = [
    "DistributedConfig",
    "DistributedResult",
    "run_distributed_training",
    "train_loop_per_worker",
]

logger = logging.getLogger("cvae.train")

RUN_NAME_TAG = "cvae.ray_run_name"
_MATERIALIZE_BYTES = 512 * 1024**2  # smaller training sets are cached in the object store


@dataclass(frozen=True)
class DistributedConfig:
    """How and where to run: workers, devices, storage, tracking."""

    num_workers: int = 2
    use_gpu: bool = False
    storage_path: str | None = None
    """Absolute path or URI for Ray Train checkpoints (default: ``cvae_home()/ray_results``)."""
    run_name: str | None = None
    """Ray Train run name; rerunning with the same name (and storage) resumes it."""
    experiment: str = "cvae"
    """MLflow experiment."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes (SPREAD puts them on different nodes where it can)."""
    materialize: bool | None = None
    """Cache the training split in the object store; None: when it is under 512 MiB."""
    fault_injection: dict[str, Any] | None = field(default=None, compare=False)
    """Testing only: ``{"step": N, "marker": path}`` kills rank 1's process once at step N."""


@dataclass(frozen=True)
class DistributedResult:
    run_id: str
    checkpoint_dir: Path
    """A local copy of the final checkpoint (cvae format)."""
    metrics: dict[str, float]
    step: int
    ray_result_path: str | None


# ---------------------------------------------------------------------------- worker side
def _feature_batches(shard: Any, batch_size: int, normalizer: Normalizer, device: torch.device,
                     seed: int, start_step: int, cache: bool) -> Iterator[torch.Tensor]:
    """Endless normalized batches of exactly ``batch_size`` rows from a Ray dataset shard.

    With ``cache`` (small, materialized data) the shard is read once into this worker's memory and
    reshuffled locally each epoch; a streamed epoch of a small shard costs more in coordination
    than in compute. Otherwise every epoch streams the shard again.
    """
    mean = torch.from_numpy(normalizer.mean).to(device)
    scale = torch.from_numpy(normalizer.scale).to(device)
    if cache:
        rows = [b["features"] for b in shard.iter_torch_batches(batch_size=4096,
                                                                dtypes=torch.float32)]
        if not rows or sum(r.shape[0] for r in rows) < batch_size:
            raise ValueError(f"A worker's training shard has fewer than batch_size/num_workers="
                             f"{batch_size} rows; use fewer workers or a smaller batch_size")
        local = ArrayData(torch.cat(rows).numpy(), np.zeros((0, mean.shape[0]), np.float32))
        for batch in local.train_batches(batch_size, seed, start_step, normalizer):
            yield batch.to(device)
        return
    epoch = start_step
    while True:
        got_any = False
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              dtypes=torch.float32, device=device,
                                              local_shuffle_buffer_size=max(4 * batch_size, 1024),
                                              local_shuffle_seed=seed + epoch):
            got_any = True
            yield (batch["features"] - mean) / scale
        if not got_any:
            raise ValueError(f"A worker's training shard has fewer than batch_size/num_workers="
                             f"{batch_size} rows; use fewer workers or a smaller batch_size")
        epoch += 1


class _WorkerCallbacks:
    def __init__(self, model: VAE, normalizer: Normalizer, model_config: ModelConfig,
                 train_config: TrainConfig, rank: int, run_id: str | None, tracking_uri: str | None,
                 fault: dict[str, Any] | None) -> None:
        self.model = model
        self.normalizer = normalizer
        self.model_config = model_config
        self.train_config = train_config
        self.rank = rank
        self.last_metrics: dict[str, float] = {}
        self.fault = fault
        self.client = None
        self.run_id = run_id
        if rank == 0 and run_id:
            import mlflow

            self.client = mlflow.MlflowClient(tracking_uri)

    def on_step(self, step: int, loss: float) -> None:
        fault = self.fault
        if fault and self.rank == 1 and step == fault["step"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(str(step))
            # Ray Train's controller collects reported checkpoints by polling the workers; give
            # it time to register the last one, as a real failure rarely follows one instantly.
            time.sleep(float(fault.get("delay_s", 3.0)))
            logger.warning("fault injection: killing worker rank 1 at step %d", step)
            os.kill(os.getpid(), 9)

    def on_validation(self, record: ProgressRecord) -> None:
        self.last_metrics = {"step": float(record.step), **record.as_metrics()}
        if self.rank != 0:
            return
        logger.info("step %d train %.5g val %.5g lr %.2e %.0f samples/s", record.step,
                    record.train_loss, record.val_loss, record.learning_rate, record.samples_per_s)
        if self.client is not None and self.run_id is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, record.step) for k, v in record.as_metrics().items()
                       if math.isfinite(v)]
            self.client.log_batch(self.run_id, metrics=metrics)

    def save(self, state: TrainState) -> None:
        import ray.train

        metrics = {**self.last_metrics, "step": float(state.step)}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                path = save_checkpoint(Checkpoint(self.model_config, self.model.state_dict(),
                                                  self.normalizer, state, self.train_config),
                                       Path(tmp) / "checkpoint")
                if self.client is not None and self.run_id is not None:
                    self.client.log_artifacts(self.run_id, str(path),
                                              f"checkpoints/checkpoint-{state.step:09d}")
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            # Every rank reports, the same number of times; only rank 0 attaches the checkpoint.
            ray.train.report(metrics, checkpoint=checkpoint)


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point on each worker; ``loop_config`` is built by the driver."""
    import ray.train
    import ray.train.torch

    model_config = ModelConfig.from_dict({**loop_config["model"],
                                          "cells_encoder": tuple(loop_config["model"]["cells_encoder"])})
    train_config = TrainConfig.from_dict(loop_config["train"])
    normalizer = Normalizer(np.asarray(loop_config["norm_mean"], np.float32),
                            np.asarray(loop_config["norm_scale"], np.float32))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    seed = train_config.seed or 0

    torch.manual_seed(seed)  # identical initial weights on every rank (DDP also broadcasts)
    model = VAE(model_config)
    state = TrainState(step=0, target_step=train_config.num_steps)
    restored = ray.train.get_checkpoint()
    saved = None
    if restored is not None:  # a restart after a failure, or a rerun of the same run name
        with restored.as_directory() as directory:
            saved = load_checkpoint(directory)
        if saved.train_state.converged or saved.train_state.step >= saved.train_state.target_step:
            saved.train_state.target_step = saved.train_state.step + train_config.num_steps
    elif loop_config.get("initial_checkpoint"):  # continue a model trained elsewhere
        saved = load_checkpoint(loop_config["initial_checkpoint"])
        saved.train_state.target_step = saved.train_state.step + train_config.num_steps
    if saved is not None:
        model.load_state_dict(saved.state_dict)
        normalizer = saved.normalizer
        state = saved.train_state
        state.converged = False
        logger.info("rank %d resumes at step %d (target %d)", rank, state.step, state.target_step)
    module = ray.train.torch.prepare_model(model)
    bare: VAE = module.module if hasattr(module, "module") else module  # type: ignore[assignment]
    optimizer = make_optimizer(bare, train_config)
    scheduler = make_scheduler(optimizer, train_config)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
    # A different stream per rank and per (re)start keeps dropout and noise independent.
    torch.manual_seed(seed * 1_000_003 + rank * 7919 + state.step)

    per_worker = train_config.batch_size // world
    batches = _feature_batches(ray.train.get_dataset_shard("train"), per_worker, normalizer,
                               device, seed * 101 + rank, state.step,
                               cache=bool(loop_config.get("cache_shard")))
    valid_shard = ray.train.get_dataset_shard("valid")
    mean = torch.from_numpy(normalizer.mean).to(device)
    scale = torch.from_numpy(normalizer.scale).to(device)
    cached_valid: list[torch.Tensor] | None = None
    if loop_config.get("cache_shard"):
        # Small data: hold this worker's validation rows instead of re-streaming them each time.
        cached_valid = [(b["features"] - mean) / scale for b in valid_shard.iter_torch_batches(
            batch_size=train_config.batch_size_test, dtypes=torch.float32, device=device)]

    def evaluate() -> ValidationResult:
        bare.eval()
        rows_iter = iter(cached_valid) if cached_valid is not None else (
            (b["features"] - mean) / scale for b in valid_shard.iter_torch_batches(
                batch_size=train_config.batch_size_test, dtypes=torch.float32, device=device))
        loss, recon, kl, rows = evaluate_batches(bare, rows_iter, seed=rank)
        bare.train()
        loss, recon, kl, rows = _all_reduce_sums([loss, recon, kl, float(rows)], device)
        rows = max(rows, 1.0)
        return ValidationResult(loss / rows, recon / rows, kl / rows, int(rows))

    callbacks = _WorkerCallbacks(bare, normalizer, model_config, train_config, rank,
                                 loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri"),
                                 loop_config.get("fault_injection"))
    bare.train()
    run_training(bare, module, optimizer, scheduler, state, batches, evaluate, train_config,
                 callbacks, world_batch_rows=per_worker * world)


# ---------------------------------------------------------------------------- driver side
def _cpus_per_worker(num_workers: int) -> float:
    """Leave a CPU free for Ray Data's read tasks: workers holding every CPU starve them."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.25, min(1.0, (total - 1.0) / num_workers))


def _find_run(experiment_id: str, run_name: str) -> str | None:
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def run_distributed_training(
    source: Any,
    model_args: dict[str, Any],
    train_config: TrainConfig,
    dist: DistributedConfig,
    *,
    train_valid_split: float = 0.9,
    valid_source: Any = None,
    resume: bool = False,
    initial_checkpoint: str | os.PathLike[str] | None = None,
) -> DistributedResult:
    """Train a CompressionVAE on Ray Train with ``dist.num_workers`` DDP workers.

    ``source`` is a ``pipeline.sources.SourceSpec`` or an array; ``model_args`` are ModelConfig
    fields other than ``dim_feature`` (dim_latent, iaf_flow_length, cells_encoder, initializer,
    feature_normalization). The MLflow run gets every parameter, metrics at each validation,
    the config and normalization as artifacts, every checkpoint, and tags describing the data.
    With ``resume`` the Ray run of the same ``run_name`` continues from its latest checkpoint
    and logs into the same MLflow run. ``initial_checkpoint`` (a cvae checkpoint directory on
    storage every worker can read) continues that model for ``num_steps`` more steps, with its
    architecture and normalization.
    """
    import mlflow
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.sources import read_source
    from pipeline.split import split_by_id
    from pipeline.stats import compute_stats
    from pipeline.tracking import code_version, cvae_home, ensure_experiment, flat_params, tracking_uri

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set (ray job submit), else starts a local runtime
    # Progress is our per-validation log line (step, loss, samples/s); Ray Data's per-split
    # bars would interleave with it from every worker.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if train_config.batch_size % dist.num_workers:
        raise ValueError(f"batch_size={train_config.batch_size} must be divisible by "
                         f"num_workers={dist.num_workers} (batch_size is global)")
    run_name = dist.run_name or f"cvae-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    storage = dist.storage_path or str(cvae_home() / "ray_results")
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))

    dataset = read_source(source)
    if valid_source is not None:
        train_ds, valid_ds = dataset, read_source(valid_source)
    else:
        train_ds, valid_ds = split_by_id(dataset, train_valid_split, seed=train_config.seed or 0)
    train_ds = train_ds.select_columns(["features"])
    valid_ds = valid_ds.select_columns(["features"])
    stats = compute_stats(train_ds)  # raises, naming the source, when the split is empty
    if initial_checkpoint is not None:
        initial = load_checkpoint(initial_checkpoint)
        model_config, normalizer = initial.model_config, initial.normalizer
        if model_config.dim_feature != stats.mean.shape[0]:
            raise ValueError(f"The data has {stats.mean.shape[0]} features, but the model in "
                             f"{initial_checkpoint} expects {model_config.dim_feature}")
    else:
        model_config = ModelConfig(dim_feature=int(stats.mean.shape[0]), **model_args)
        normalizer = (Normalizer.from_stats(stats) if model_config.feature_normalization
                      else Normalizer.identity(model_config.dim_feature))
    materialize = dist.materialize
    if materialize is None:
        materialize = stats.count * model_config.dim_feature * 4 < _MATERIALIZE_BYTES
    if materialize:
        train_ds, valid_ds = train_ds.materialize(), valid_ds.materialize()

    experiment_id = ensure_experiment(dist.experiment)
    client = mlflow.MlflowClient()
    run_id = _find_run(experiment_id, run_name) if resume else None
    if run_id is None:
        run = client.create_run(experiment_id, run_name=run_name, tags={
            RUN_NAME_TAG: run_name,
            "cvae.data_source": str(getattr(source, "path", "in-memory array")),
            "cvae.train_rows": str(stats.count),
            "cvae.feature_dim": str(model_config.dim_feature),
            "cvae.code_version": code_version(),
            "cvae.launcher": "ray_train",
        })
        run_id = run.info.run_id
        params = {**flat_params("model", model_config.to_dict()),
                  **flat_params("train", train_config.to_dict()),
                  **flat_params("dist", {k: v for k, v in asdict(dist).items()
                                         if k != "fault_injection"}),
                  "data.train_valid_split": str(train_valid_split)}
        items = list(params.items())
        for start in range(0, len(items), 90):  # MLflow takes at most 100 params per batch
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 90]])
        client.log_dict(run_id, {"model": model_config.to_dict(), "train": train_config.to_dict()},
                        "config.json")
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "normalization.npz", **normalizer.to_arrays(),
                     count=np.int64(stats.count), std=stats.std)
            client.log_artifact(run_id, str(Path(tmp) / "normalization.npz"))
    else:
        client.update_run(run_id, status="RUNNING")

    loop_config = {
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "norm_mean": normalizer.mean.tolist(),
        "norm_scale": normalizer.scale.tolist(),
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri(),
        "fault_injection": dist.fault_injection,
        "cache_shard": materialize,
        "initial_checkpoint": (os.path.abspath(initial_checkpoint)
                               if initial_checkpoint is not None else None),
    }
    resources = {"CPU": _cpus_per_worker(dist.num_workers)}
    if dist.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=dist.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train_config.keep_checkpoints),
        ),
        datasets={"train": train_ds, "valid": valid_ds},
    )
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        client.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"Ray Train run {run_name} finished without a checkpoint")
    local = cvae_home() / "models" / run_name
    with result.checkpoint.as_directory() as directory:
        src = Path(directory) / "checkpoint"
        tmp_copy = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp_copy, ignore_errors=True)
        shutil.copytree(src if src.is_dir() else directory, tmp_copy)
        replace_directory(tmp_copy, local)
    final = load_checkpoint(local)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items()
               if isinstance(v, (int, float))}
    client.set_terminated(run_id, status="FINISHED")
    return DistributedResult(run_id, local, metrics, final.train_state.step,
                             getattr(result, "path", None))
