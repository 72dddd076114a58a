"""The one training loop, shared by the in-process estimator and the Ray Train workers.

The loop knows nothing about where batches come from, how the validation loss is reduced, where
checkpoints go or how progress is shown: the launcher passes a batch iterator, an ``evaluate``
function and a ``TrainingCallbacks`` object. The in-process estimator feeds in-memory batches and
saves to its logdir; a Ray Train worker feeds its dataset shard, all-reduces the validation sums
and reports checkpoints to Ray. Both run exactly this code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from cvae_model.checkpoint import TrainState
from cvae_model.config import TrainConfig
from cvae_model.vae import VAE

__all__ = [
    "NonFiniteTrainingError",
    "ProgressRecord",
    "StepResult",
    "TrainingCallbacks",
    "ValidationResult",
    "evaluate_batches",
    "make_optimizer",
    "make_scheduler",
    "run_training",
    "train_step",
]

ADAM_EPS = 1e-4  # the original's AdamOptimizer(epsilon=1e-4)


class NonFiniteTrainingError(FloatingPointError):
    """Training produced non-finite gradients too many times in a row (or non-finite weights)."""


@dataclass(frozen=True)
class ValidationResult:
    loss: float
    recon: float
    kl: float
    rows: int


@dataclass(frozen=True)
class ProgressRecord:
    """What a validation point reports: logged, shown, and sent to MLflow."""

    step: int
    train_loss: float
    val_loss: float
    val_recon: float
    val_kl: float
    learning_rate: float
    samples_per_s: float

    def as_metrics(self) -> dict[str, float]:
        return {
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_reconstruction": self.val_recon,
            "val_kl": self.val_kl,
            "learning_rate": self.learning_rate,
            "samples_per_s": self.samples_per_s,
        }


class TrainingCallbacks(Protocol):
    def on_validation(self, record: ProgressRecord) -> None:
        """Called after every validation, on every worker."""

    def on_step(self, step: int, loss: float) -> None:
        """Called after every optimizer step (progress bars)."""

    def save(self, state: TrainState) -> None:
        """Persist a checkpoint of the current weights with ``state``."""


@dataclass(frozen=True)
class StepResult:
    loss: float
    applied: bool
    """False when the gradient was non-finite and the step was skipped."""


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=ADAM_EPS)


def make_scheduler(optimizer: torch.optim.Optimizer,
                   config: TrainConfig) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The original's plateau rule: divide the LR by ``lr_scheduling_factor`` once the best
    validation loss is ``lr_scheduling_steps`` validations old."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=1.0 / config.lr_scheduling_factor,
        patience=config.lr_scheduling_steps - 1,
        threshold=0.0,
        cooldown=0,
        min_lr=0.0,
        eps=0.0,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, *,
               keep_prob: float, grad_clip_norm: float, eps: Tensor | None = None) -> StepResult:
    """One optimizer step on batch ``x`` through ``module`` (a VAE, or a DDP-wrapped VAE).

    Backward always runs, so DDP's gradient all-reduce happens on every worker; the step is then
    skipped on all workers alike when the (synchronized) gradient norm is not finite.
    """
    optimizer.zero_grad(set_to_none=True)
    out = module(x, keep_prob, eps)
    out.loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float(out.loss.detach()), applied=False)
    optimizer.step()
    return StepResult(float(out.loss.detach()), applied=True)


@torch.no_grad()
def evaluate_batches(model: VAE, batches: Iterator[Tensor], seed: int = 0) -> tuple[float, float, float, int]:
    """Summed (loss, recon, kl) and row count over ``batches``, noise fixed by ``seed``.

    Fixing the noise makes successive validations comparable, which steadies the LR schedule.
    Returns sums so that workers can add theirs before dividing.
    """
    generator = torch.Generator().manual_seed(seed)
    loss_sum = recon_sum = kl_sum = 0.0
    rows = 0
    for x in batches:
        eps = torch.randn((x.shape[0], model.config.dim_latent), generator=generator, dtype=x.dtype)
        out = model(x, 1.0, eps.to(x.device))
        recon_sum += float(out.recon.sum())
        kl_sum += float(out.kl.sum())
        rows += x.shape[0]
    loss_sum = recon_sum + kl_sum
    return loss_sum, recon_sum, kl_sum, rows


def _check_finite_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteTrainingError(
                f"Parameter {name} holds non-finite values; refusing to write a checkpoint"
            )


def run_training(
    model: VAE,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    state: TrainState,
    batches: Iterator[Tensor],
    evaluate: Callable[[], ValidationResult],
    config: TrainConfig,
    callbacks: TrainingCallbacks,
    world_batch_rows: int | None = None,
) -> TrainState:
    """Train from ``state.step`` to ``state.target_step`` or until the LR schedule converges.

    ``model`` is the bare VAE (checkpointed); ``module`` is what the forward pass runs through
    (the same VAE, or its DDP wrapper). Validates every ``test_every`` steps (step 0 of a fresh
    run included; a resumed run does not repeat the validation of its starting step), applies the plateau rule and the stop-at-minimum-LR rule, saves every
    ``checkpoint_every`` steps and at the end. A ``KeyboardInterrupt`` propagates after the
    caller's handler may save; ``state`` is kept current so it can.
    """
    rows_per_step = world_batch_rows or config.batch_size
    train_losses: list[float] = []  # losses of the steps since the last validation
    nonfinite_in_a_row = 0
    last_saved = state.step
    last_validated = -1
    window = [time.perf_counter(), state.step]  # start time and step of the samples/s window

    def validate() -> ValidationResult:
        nonlocal last_validated
        last_validated = state.step
        result = evaluate()
        now = time.perf_counter()
        rate = (state.step - window[1]) * rows_per_step / max(now - window[0], 1e-9)
        window[:] = [now, state.step]
        train_loss = sum(train_losses) / len(train_losses) if train_losses else float("nan")
        train_losses.clear()
        state.last_val_loss = result.loss
        state.best_val_loss = min(state.best_val_loss, result.loss)
        callbacks.on_validation(ProgressRecord(
            state.step, train_loss, result.loss, result.recon, result.kl, current_lr(optimizer), rate,
        ))
        return result

    def snapshot() -> TrainState:
        _check_finite_weights(model)
        state.optimizer = optimizer.state_dict()
        state.scheduler = scheduler.state_dict()
        return state

    def validate_and_schedule() -> None:
        result = validate()
        if config.lr_scheduling:
            before = current_lr(optimizer)
            scheduler.step(result.loss if math.isfinite(result.loss) else float("inf"))
            after = current_lr(optimizer)
            if after < before and after <= config.lr_scheduling_min:
                state.converged = True

    if state.step == 0 and state.target_step > 0:
        validate_and_schedule()  # the untrained model's loss, as the original logged
    while state.step < state.target_step and not state.converged:
        step = train_step(module, optimizer, next(batches), keep_prob=config.dropout_keep_prob,
                          grad_clip_norm=config.grad_clip_norm)
        if step.applied:
            nonfinite_in_a_row = 0
            train_losses.append(step.loss)
        else:
            nonfinite_in_a_row += 1
            if nonfinite_in_a_row >= config.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"{nonfinite_in_a_row} consecutive steps had non-finite gradients at step "
                    f"{state.step}; try a lower learning_rate or check the data for extreme values"
                )
        state.step += 1
        callbacks.on_step(state.step, step.loss)
        # Validate before checkpointing, so a checkpoint carries the metrics of its own step.
        if state.step % config.test_every == 0:
            validate_and_schedule()
        if state.step % config.checkpoint_every == 0:
            callbacks.save(snapshot())
            last_saved = state.step

    if last_validated != state.step:  # final metrics at the last step, outside the schedule
        validate()
    if last_saved != state.step or state.step == 0:
        callbacks.save(snapshot())
    return state
