"""One Ray Train worker: the shared loop over this worker's shard (see ``pipeline.ray_training``).

Batches follow the same contract as in-process: a cached shard is held in memory, ordered by id,
and served by ``ArrayData`` (with one worker, exactly the in-process batches); a streamed shard
is served by ``stream_batches``, which realigns a resumed run within its epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvae_model.checkpoint import Checkpoint, TrainState, read_checkpoint_files
from cvae_model.data import ArrayData, stream_batches
from cvae_model.normalization import Normalizer
from cvae_model.seeds import BATCHES, derive_seed
from cvae_model.training import (
    ProgressRecord,
    ValidationResult,
    evaluate_batches,
    run_training,
    setup_training,
    validation_seed,
)
from cvae_model.vae import VAE
from pipeline.prepare import CACHE_BYTES
from pipeline.ray_training import HISTORY_FILE, WorkerConfig

__all__ = ["run_worker"]

logger = logging.getLogger("cvae.train")


def _shard_rows(shard: Any) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, features) of a shard, ordered by id (so the order does not depend on blocks)."""
    ids, rows = [], []
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy"):
        ids.append(batch["id"])
        rows.append(np.asarray(batch["features"], dtype=np.float32))
    if not rows:
        return np.zeros(0), np.zeros((0, 0), np.float32)
    order = np.argsort(np.concatenate(ids), kind="stable")
    return np.concatenate(ids)[order], np.concatenate(rows)[order]


def _train_batches(cfg: WorkerConfig, shard: Any, rank: int, world: int, per_worker: int,
                   start_step: int, normalizer: Normalizer, device: torch.device) -> Iterator[torch.Tensor]:
    seed = cfg.train_config.seed
    assert seed is not None
    if cfg.cached:
        _, rows = _shard_rows(shard)
        local = ArrayData(rows, rows[:0])
        return (b.to(device) for b in local.train_batches(per_worker, seed, start_step, normalizer))

    def epoch(number: int, size: int) -> Iterator[np.ndarray]:
        for batch in shard.iter_batches(batch_size=size, batch_format="numpy",
                                        local_shuffle_buffer_size=max(8 * size, 4096),
                                        local_shuffle_seed=derive_seed(seed, BATCHES, rank, number) % 2**31):
            yield batch["features"]

    return stream_batches(epoch, cfg.train_rows // world, per_worker, start_step, normalizer, device)


class _WorkerCallbacks:
    def __init__(self, cfg: WorkerConfig, model: VAE, normalizer: Normalizer, rank: int,
                 history: list[dict[str, float]]) -> None:
        self.cfg, self.model, self.normalizer, self.rank = cfg, model, normalizer, rank
        self.history = history
        self.last_metrics: dict[str, float] = {}
        self.tracker = cfg.tracking.attach() if rank == 0 and cfg.tracking is not None else None

    def on_step(self, step: int, loss: float) -> None:
        for callback in self.cfg.callbacks:
            callback.on_step(step, loss)

    def on_validation(self, record: ProgressRecord) -> None:
        for callback in self.cfg.callbacks:
            getattr(callback, "on_validation", lambda r: None)(record)
        self.last_metrics = {"step": float(record.step), **record.as_metrics()}
        if self.rank != 0:
            return
        self.history.append(self.last_metrics)
        logger.info("step %d train %.5g val %.5g lr %.2e %.0f samples/s", record.step,
                    record.train_loss, record.val_loss, record.learning_rate, record.samples_per_s)
        if self.tracker is not None:
            self.tracker.log_metrics(record.as_metrics(), record.step)

    def save(self, state: TrainState) -> None:
        import ray.train

        metrics = {**self.last_metrics, "step": float(state.step)}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                files = Checkpoint(self.model.config, self.model.state_dict(), self.normalizer,
                                   state, self.cfg.train_config).to_files()
                for name, data in files.items():
                    (Path(tmp) / name).write_bytes(data)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(self.history))
                if self.tracker is not None:
                    self.tracker.log_artifacts(tmp, f"checkpoints/checkpoint-{state.step:09d}")
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # Every rank reports, the same number of times; only rank 0 attaches the checkpoint.
            ray.train.report(metrics, checkpoint=checkpoint)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each worker the gradient of its own rows.

    Every worker computes the same neighbour loss from the gathered rows, so the gradient that
    reaches a worker's rows is summed over the workers' losses (an all-reduce); DDP then averages
    the parameter gradients over the workers, and the two together give exactly the gradient of
    one loss over the global batch, as in process. (torch.distributed.nn's all_gather needs
    reduce_scatter, which gloo lacks.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.rows, ctx.rank = group, x.shape[0], dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None


class _RowGather:
    """Concatenates every worker's rows (same count on each) for the neighbour term.

    Its collectives run in a process group of their own, so they never interleave with DDP's
    gradient all-reduce, which runs while backward is still under way."""

    def __init__(self, world: int) -> None:
        import torch.distributed as dist

        self.world = world
        self.group = dist.new_group()  # DDP's backend; every rank calls this, in the same order

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherRows.apply(x, self.group, self.world)


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _start(cfg: WorkerConfig) -> tuple[Checkpoint, str, Any, list[dict[str, float]]]:
    """(checkpoint, mode, previous config, history) to start from: Ray's latest checkpoint of
    this run (a restart or --resume) or the driver's initial model."""
    import ray
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        return Checkpoint.from_files(ray.get(cfg.initial), "the initial model"), cfg.mode, cfg.previous, []
    with restored.as_directory() as directory:
        checkpoint = Checkpoint.from_files(read_checkpoint_files(directory), restored.path)
        history_file = Path(directory) / HISTORY_FILE
        history = json.loads(history_file.read_text()) if history_file.exists() else []
    return checkpoint, "resume", checkpoint.train_config, history


def run_worker(cfg: WorkerConfig) -> None:
    """Build the model from its checkpoint, apply the resume rules, run the shared loop."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(cfg.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    checkpoint, mode, previous, history = _start(cfg)
    if mode == "resume" and previous is not None and previous.seed is not None:
        # The same run, the same seed (a resumed job may have drawn a new one).
        cfg = dataclasses.replace(cfg, train_config=dataclasses.replace(cfg.train_config,
                                                                        seed=previous.seed))
    config = cfg.train_config
    model = checkpoint.build_model().to(device)
    normalizer = checkpoint.normalizer
    setup = setup_training(model, config, checkpoint.train_state, previous, mode)  # type: ignore[arg-type]
    logger.info("rank %d starts at step %d (target %d, %s)", rank, setup.state.step,
                setup.state.target_step, mode)
    module = ray.train.torch.prepare_model(model, move_to_device=False)
    # This worker's share of a step's rows (config.step_rows: batch_size, raised to
    # neighbour_batch_size with the neighbour term, which gathers every share: _RowGather).
    per_worker = config.step_rows // world
    gather = _RowGather(world) if config.neighbours_on and world > 1 else None
    batches = _train_batches(cfg, ray.train.get_dataset_shard("train"), rank, world, per_worker,
                             setup.state.step, normalizer, device)
    valid_shard = ray.train.get_dataset_shard("valid")
    norm = normalizer.to_torch(device)

    def valid_batches() -> Iterator[torch.Tensor]:
        for batch in valid_shard.iter_batches(batch_size=config.batch_size_test, batch_format="numpy"):
            yield norm.normalize(torch.from_numpy(np.array(batch["features"], np.float32)).to(device))

    small = cfg.train_rows * model.config.dim_feature * 4 < CACHE_BYTES
    cached_valid = list(valid_batches()) if small else None

    def evaluate() -> ValidationResult:
        model.eval()
        sums = evaluate_batches(model, iter(cached_valid) if cached_valid is not None
                                else valid_batches(), seed=validation_seed(config.seed, rank))
        model.train()
        loss, recon, kl, rows = _all_reduce_sums(list(sums), device)
        return ValidationResult(loss / max(rows, 1), recon / max(rows, 1), kl / max(rows, 1),
                                int(rows))

    callbacks = _WorkerCallbacks(cfg, model, normalizer, rank, history)
    model.train()
    run_training(model, module, setup, batches, evaluate, config, callbacks, rank=rank,
                 world_batch_rows=per_worker * world, gather=gather, feature_scale=norm.scale)
