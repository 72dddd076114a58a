"""Data-parallel training on Ray Train: the second launcher of the one training loop.

The driver (``run_distributed_training``) prepares the data (``pipeline.prepare``), builds or
takes the initial model, opens the MLflow run and starts a ``TorchTrainer``. Each worker
(``train_loop_per_worker``) receives a typed ``WorkerConfig`` and the initial model as checkpoint
bytes in Ray's object store, applies the shared resume rules (``setup_training``), feeds its
dataset shard to ``run_training`` (the loop the estimator runs), all-reduces the validation sums
so every worker takes the same schedule and stop decisions, and reports checkpoints (the cvae
format) to Ray Train's storage, which may be an object store (``s3://...``: the filesystem
``pipeline.storage`` resolves is handed to Ray Train, so ``--fs-option`` settings hold there too).
Nothing on the driver's disk crosses to a worker: the initial model (and its normalizer) travels
as checkpoint bytes in Ray's object store, the data as Ray Datasets, and the final model comes
back from the storage as bytes.

Rank 0 alone writes to MLflow, and only to a tracking URI it can reach: a tracking server
(``http(s)://``, ``databricks``, a database URL) directly; a store on the driver's disk (the
embedded ``sqlite:///...`` default, ``file:``) through a small relay actor pinned to the
driver's node, which logs metrics and checkpoint files for it (a worker on another machine
could not open that file).

Batch size is global: ``batch_size // num_workers`` rows on each worker per step, so one step
of N workers equals one in-process step.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from cvae_model.checkpoint import Checkpoint, TrainState
from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.data import TrainingData
from cvae_model.normalization import Normalizer
from cvae_model.seeds import INIT, derive_seed, resolve_seed
from cvae_model.training import RunMode
from cvae_model.vae import VAE
from pipeline.model_uri import checkpoint_files_at
from pipeline.prepare import PreparedData, prepare
from pipeline.runtime import cpu_shares, ensure_ray
from pipeline.storage import Location, resolve
from pipeline.tracking import RunTracker, code_version, cvae_home, flat_params

__all__ = ["DistributedConfig", "DistributedResult", "WorkerConfig", "WorkerTracking",
           "reachable_from_every_node", "run_distributed_training", "train_estimator_on_ray"]

logger = logging.getLogger("cvae.train")

RUN_NAME_TAG = "cvae.ray_run_name"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class DistributedConfig:
    """How and where to run: workers, devices, storage, tracking."""

    num_workers: int = 2
    """Data-parallel Ray Train workers (DDP)."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; otherwise CPU workers and gloo."""
    storage_path: str | None = None
    """Ray Train checkpoints: an absolute path or a URI such as s3://bucket/cvae, reachable from
    every node (default: $CVAE_HOME/ray_results)."""
    run_name: str | None = None
    """Ray Train run name; with --resume, the run to continue (default: a new, dated name)."""
    experiment: str = "cvae"
    """MLflow experiment."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes (SPREAD puts them on different nodes where it can)."""
    track: bool = True
    """Log the run to MLflow (best-effort: an unreachable server never stops training)."""


def reachable_from_every_node(uri: str) -> bool:
    """Whether a tracking URI names a server (every node can reach it), not a store on the
    driver's disk (``sqlite:///path``, ``file:``, a plain path)."""
    if uri.startswith("databricks"):  # "databricks", "databricks-uc", "databricks://profile"
        return True
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("file:") else ""
    return scheme not in ("", "file", "sqlite")


class _TrackingRelay:
    """A zero-CPU actor on the driver's node: logs for rank 0 into a store only that node has."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.tracker = RunTracker.attach(uri, run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)

    def log_files(self, files: Mapping[str, bytes], artifact_path: str | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.tracker.log_artifacts(tmp, artifact_path)


class _RelayedTracker:
    """What rank 0 holds when it logs through the relay: RunTracker's logging calls, forwarded.

    Each call waits for the relay (so a checkpoint's files are logged before training goes on,
    as with a direct tracker) and, like ``RunTracker``, never fails the work."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def _wait(self, what: str, ref: Any) -> None:
        import ray

        try:
            ray.get(ref, timeout=120)
        except Exception as exc:  # the relay died with its driver, or timed out: the work goes on
            logger.warning("MLflow relay: %s failed (%s: %s)", what, type(exc).__name__,
                           str(exc).splitlines()[0][:200] if str(exc) else "")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._wait(f"logging metrics of step {step}", self.relay.log_metrics.remote(dict(metrics), step))

    def log_artifacts(self, folder: str, artifact_path: str | None = None) -> None:
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        self._wait(f"logging {artifact_path}", self.relay.log_files.remote(files, artifact_path))


@dataclass(frozen=True)
class WorkerTracking:
    """Rank 0's way to the MLflow run: the tracking URI itself, or a relay actor for it."""

    uri: str
    run_id: str
    relay: Any = None
    """A ``_TrackingRelay`` actor when ``uri`` is a store on the driver's disk."""

    def attach(self) -> Any:
        """A tracker with ``log_metrics`` and ``log_artifacts``, usable on any node."""
        return RunTracker.attach(self.uri, self.run_id) if self.relay is None else _RelayedTracker(self.relay)

    @classmethod
    def start(cls, uri: str, run_id: str) -> WorkerTracking:
        """Direct for a server; else a relay on this (the driver's) node."""
        if reachable_from_every_node(uri):
            return cls(uri, run_id)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        relay = ray.remote(num_cpus=0)(_TrackingRelay).options(scheduling_strategy=here).remote(uri, run_id)
        return cls(uri, run_id, relay)

    def stop(self) -> None:
        if self.relay is not None:
            import ray

            ray.kill(self.relay)


@dataclass(frozen=True)
class WorkerConfig:
    """What every Ray Train worker receives."""

    model_config: ModelConfig
    train_config: TrainConfig
    """With its seed resolved."""
    initial: Any
    """An ObjectRef to the initial checkpoint's files (``Checkpoint.to_files``)."""
    mode: RunMode
    previous: TrainConfig | None
    """The config the initial model was last trained with (the LR-schedule rule needs it)."""
    train_rows: int
    cached: bool
    """Training split materialized: each worker holds its shard in memory."""
    tracking: WorkerTracking | None
    """Where rank 0 logs (``tracking.attach()``), or None."""
    callbacks: tuple[Any, ...] = ()
    """Extra ``TrainingCallbacks``-like objects called on every rank (on_step/on_validation)."""
    threads: int = 1


@dataclass(frozen=True)
class DistributedResult:
    run_id: str | None
    checkpoint: Checkpoint
    """The final model (in memory; write it where it is needed)."""
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    run_name: str = ""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point on each worker."""
    from pipeline.ray_worker import run_worker

    run_worker(loop_config["worker"])


# ---------------------------------------------------------------------------- driver side
def _storage(dist: DistributedConfig, run_name: str, resume: bool) -> Location:
    """The storage location; refuses a reused run name without ``resume`` and a missing one with it."""
    storage = dist.storage_path or str(cvae_home() / "ray_results")
    location = resolve(storage)
    run = location.join(run_name)
    if run.exists() and not resume:
        raise ValueError(f"A Ray Train run named {run_name!r} already exists in {location.uri}; "
                         "pass --resume to continue it, or choose a new --run-name")
    if resume and not run.exists():
        raise ValueError(f"--resume: there is no run named {run_name!r} in {location.uri}")
    return location


def _read_result(checkpoint: Any, storage: Location) -> tuple[Checkpoint, list[dict[str, float]]]:
    """The final checkpoint and history, read from Ray Train's storage into memory."""
    path, base = checkpoint.path.rstrip("/"), storage.path.rstrip("/")
    uri = storage.uri + path[len(base):] if path.startswith(base + "/") else path
    place = Location(checkpoint.filesystem, path, uri)
    history_file = place.join(HISTORY_FILE)
    history = json.loads(history_file.read_bytes()) if history_file.exists() else []
    return Checkpoint.from_files(checkpoint_files_at(place), place.uri), history


def _initial(prepared: PreparedData, model_args: dict[str, Any], seed: int,
             initial: Checkpoint | None) -> Checkpoint:
    if initial is not None:
        return initial
    config = ModelConfig(dim_feature=prepared.dim_feature, **model_args)
    normalizer = (Normalizer.from_stats(prepared.stats) if config.feature_normalization
                  else Normalizer.identity(config.dim_feature))
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(seed, INIT))
        model = VAE(config)
    return Checkpoint(config, model.state_dict(), normalizer, TrainState())


def _resources(dist: DistributedConfig, cached: bool) -> tuple[dict[str, float], int]:
    """CPUs per worker and torch threads. Cached data needs no read tasks while training, so
    the workers share every CPU; streamed data leaves one CPU to Ray Data's reads."""
    cpus, threads = cpu_shares(dist.num_workers, reserve=0.0 if cached else 1.0)
    resources = {"CPU": cpus}
    if dist.use_gpu:
        resources["GPU"] = 1.0
    return resources, threads


def run_distributed_training(
    source: Any, model_args: dict[str, Any], train_config: TrainConfig, dist: DistributedConfig,
    *, train_valid_split: float = 0.9, valid_source: Any = None, resume: bool = False,
    initial: Checkpoint | None = None, callbacks: Sequence[Any] = (),
) -> DistributedResult:
    """Train a CompressionVAE on Ray Train with ``dist.num_workers`` DDP workers.

    ``source``: a path or URI, a ``SourceSpec`` or an array; ``model_args``: ModelConfig fields
    other than ``dim_feature``. ``initial`` continues that model (its architecture and
    normalizer) for ``num_steps`` more steps. ``resume`` continues the Ray run named
    ``dist.run_name`` from its latest checkpoint and logs into the same MLflow run.
    ``callbacks`` run on every worker (``on_step``/``on_validation``; tests inject faults).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray()
    if train_config.batch_size % dist.num_workers:
        raise ValueError(f"batch_size={train_config.batch_size} must be divisible by "
                         f"num_workers={dist.num_workers} (batch_size is global)")
    if resume and not dist.run_name:
        raise ValueError("resume needs the run_name of the run to continue")
    config = replace(train_config, seed=resolve_seed(train_config.seed))
    run_name = dist.run_name or f"cvae-{time.strftime('%Y%m%d-%H%M%S')}-{config.seed % 10000:04d}"
    storage = _storage(dist, run_name, resume)
    width = initial.model_config.dim_feature if initial is not None else None
    prepared = prepare(source, valid_source, train_valid_split, seed=config.seed,
                       dim_feature=width, min_valid_rows=dist.num_workers)
    start = _initial(prepared, model_args, config.seed, initial)
    tracker = RunTracker(enabled=dist.track).start(
        dist.experiment, run_name=run_name, find_tag=(RUN_NAME_TAG, run_name) if resume else None,
        tags={RUN_NAME_TAG: run_name, "cvae.data_source": prepared.description,
              "cvae.train_rows": str(prepared.train_rows),
              "cvae.feature_dim": str(start.model_config.dim_feature),
              "cvae.code_version": code_version(), "cvae.launcher": "ray_train"})
    with tracker:
        if not resume:
            tracker.log_params({**flat_params("model", start.model_config.to_dict()),
                                **flat_params("train", config.to_dict()),
                                **flat_params("dist", asdict(dist)),
                                "data.train_valid_split": train_valid_split})
            tracker.log_dict({"model": start.model_config.to_dict(), "train": config.to_dict()},
                             "config.json")
        resources, threads = _resources(dist, prepared.cached)
        tracking = (WorkerTracking.start(tracker.uri, tracker.run_id)
                    if tracker.enabled and tracker.run_id else None)
        worker = WorkerConfig(
            start.model_config, config, ray.put(start.to_files()),
            "continue" if initial is not None else "new", start.train_config,
            prepared.train_rows, prepared.cached, tracking, tuple(callbacks), threads)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"worker": worker},
            torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                resources_per_worker=resources, placement_strategy=dist.placement_strategy),
            run_config=ray.train.RunConfig(
                # A path without a scheme and the filesystem object: Ray Train then uses cvae's
                # resolved filesystem (with --fs-option settings) instead of building its own.
                name=run_name, storage_path=storage.path,
                storage_filesystem=None if storage.is_local else storage.filesystem,
                failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints)),
            datasets={"train": prepared.train, "valid": prepared.valid})
        try:
            result = trainer.fit()
        finally:
            if tracking is not None:
                tracking.stop()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run {run_name} finished without a checkpoint")
        final, history = _read_result(result.checkpoint, storage)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return DistributedResult(tracker.run_id, final, metrics, history, run_name)


def train_estimator_on_ray(initial: Checkpoint, data: TrainingData, config: TrainConfig,
                           num_workers: int) -> tuple[Checkpoint, list[dict[str, float]]]:
    """The estimator's ``num_workers`` path: continue ``initial`` on the estimator's data."""
    from cvae_model.data import ArrayData
    from pipeline.streaming import StreamingData

    if isinstance(data, ArrayData):
        source, valid, split = data.train, data.valid, 1.0
    elif isinstance(data, StreamingData):
        source, valid, split = data.source, data.valid_source, data.train_valid_split
    else:
        raise TypeError(f"Cannot train {type(data).__name__} on Ray")
    result = run_distributed_training(source, {}, config, DistributedConfig(num_workers=num_workers),
                                      train_valid_split=split, valid_source=valid, initial=initial)
    return result.checkpoint, result.history
