"""The in-process launcher: the shared loop in this process, checkpoints to a logdir.

Adds what an interactive user wants around ``run_training``: progress (a bar on a terminal, log
lines otherwise), TensorBoard scalars, and Ctrl-C that saves a checkpoint and returns a usable
model, as the original did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cvae_model.checkpoint import Checkpoint, TrainState, write_checkpoint_to_logdir
from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.data import TrainingData
from cvae_model.normalization import Normalizer
from cvae_model.progress import Progress
from cvae_model.training import (
    ProgressRecord,
    TrainingSetup,
    ValidationResult,
    evaluate_batches,
    run_training,
    validation_seed,
)
from cvae_model.vae import VAE

__all__ = ["LocalRun", "train_in_process"]

logger = logging.getLogger("cvae")


@dataclass
class LocalRun:
    """Where and how an in-process run writes and shows what it does."""

    logdir: Path
    tb_logging: bool = False
    verbose: bool = True
    on_record: Callable[[ProgressRecord], None] | None = None
    """Called with every validation record (the estimator keeps them as ``history_``)."""


class _LocalCallbacks:
    def __init__(self, save: Callable[[TrainState], None], run: LocalRun, setup: TrainingSetup) -> None:
        self._save = save
        self.run = run
        self.progress = Progress(setup.state.target_step, initial=setup.state.step,
                                 desc="cvae train", unit="steps", enabled=run.verbose)
        self.writer = None
        if run.tb_logging:
            from tensorboardX import SummaryWriter  # installed with ray[train]

            self.writer = SummaryWriter(str(run.logdir))

    def on_step(self, step: int, loss: float) -> None:
        self.progress.update(1)

    def on_validation(self, record: ProgressRecord) -> None:
        if self.run.on_record is not None:
            self.run.on_record(record)
        self.progress.set_note(f"train {record.train_loss:.4g}, val {record.val_loss:.4g}, "
                               f"lr {record.learning_rate:.1e}")
        if self.writer is not None:
            for name, value in record.as_metrics().items():
                self.writer.add_scalar(name, value, record.step)

    def save(self, state: TrainState) -> None:
        self._save(state)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def train_in_process(model: VAE, model_config: ModelConfig, normalizer: Normalizer,
                     data: TrainingData, config: TrainConfig, setup: TrainingSetup,
                     run: LocalRun) -> TrainState:
    """Train ``model`` with the shared loop; checkpoints go to ``run.logdir``.

    Ctrl-C saves a checkpoint of the current step and returns normally, leaving a usable model.
    ``config.seed`` must be resolved (not None).
    """
    assert config.seed is not None
    state = setup.state

    def save(current: TrainState) -> None:
        checkpoint = Checkpoint(model_config, model.state_dict(), normalizer, current, config)
        write_checkpoint_to_logdir(checkpoint, run.logdir, config.keep_checkpoints)

    batches = data.train_batches(config.step_rows, config.seed, state.step, normalizer)

    def evaluate() -> ValidationResult:
        model.eval()
        loss, recon, kl, rows = evaluate_batches(
            model, data.valid_batches(config.batch_size_test, normalizer),
            seed=validation_seed(config.seed, 0))
        model.train()
        rows_or_one = max(rows, 1)
        return ValidationResult(loss / rows_or_one, recon / rows_or_one, kl / rows_or_one, rows)

    callbacks = _LocalCallbacks(save, run, setup)
    model.train()
    try:
        run_training(model, model, setup, batches, evaluate, config, callbacks,
                     feature_scale=normalizer.to_torch().scale)
    except KeyboardInterrupt:
        # As the original: Ctrl-C keeps the model; save it and hand it back usable.
        state.optimizer = setup.optimizer.state_dict()
        state.scheduler = setup.scheduler.state_dict()
        save(state)
        logger.warning("Training interrupted at step %d; checkpoint saved to %s", state.step,
                       run.logdir)
    finally:
        callbacks.close()
        model.eval()
    return state
