"""The one training loop and the one set of resume rules, shared by every launcher.

``setup_training`` decides how a run starts (a new model, another ``num_steps`` on a trained one,
or an interrupted run resumed), ``run_training`` takes the steps. Neither knows where batches come
from, how the validation loss is reduced, where checkpoints go or how progress is shown: the
launcher passes a batch iterator, an ``evaluate`` function and a ``TrainingCallbacks`` object.
The in-process launcher (``cvae_model.local``) and the Ray Train workers
(``pipeline.ray_training``) differ only there.

Randomness depends only on (seed, rank, step): each step's noise and dropout come from a
generator seeded with ``derive_seed(seed, NOISE, rank, step)``, and batches are a function of
(seed, step), so a run stopped at step s and resumed anywhere continues exactly as if it had not
stopped.

The objective is the negative ELBO plus, when ``TrainConfig.neighbour_weight > 0``, the weighted
neighbour term ``KL(P || Q)`` of ``cvae_model.neighbours`` over the step's rows (``NeighbourTerm``;
the term itself draws no randomness). With weight 0 a step is exactly the original objective's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from cvae_model.allocator import keep_freed_memory
from cvae_model.checkpoint import TrainState
from cvae_model.compiling import compile_for_training
from cvae_model.config import TrainConfig
from cvae_model.gradients import clip_gradients
from cvae_model.neighbours import joint_affinities, neighbour_kl
from cvae_model.seeds import NOISE, VALIDATION, derive_seed
from cvae_model.vae import VAE

__all__ = [
    "NeighbourTerm",
    "NonFiniteTrainingError",
    "ProgressRecord",
    "RunMode",
    "StepResult",
    "TrainingCallbacks",
    "TrainingSetup",
    "ValidationResult",
    "evaluate_batches",
    "make_optimizer",
    "make_scheduler",
    "neighbour_term",
    "run_training",
    "setup_training",
    "train_step",
]

ADAM_EPS = 1e-4  # the original's AdamOptimizer(epsilon=1e-4)
RunMode = Literal["new", "continue", "resume"]
"""new: a fresh model; continue: ``num_steps`` more on a trained model (a second ``train()``,
a model handed to Ray); resume: the same run after an interruption, to its original target."""


class NonFiniteTrainingError(FloatingPointError):
    """Training produced non-finite values: gradients too many times in a row, weights, or a
    validation loss (usually data far outside the training range)."""


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
    train_neighbour_kl: float | None = None
    """Mean KL(P || Q) of the training steps since the last validation (None: the term is off)."""

    def as_metrics(self) -> dict[str, float]:
        metrics = {"train_loss": self.train_loss, "val_loss": self.val_loss,
                   "val_reconstruction": self.val_recon, "val_kl": self.val_kl,
                   "learning_rate": self.learning_rate, "samples_per_s": self.samples_per_s}
        if self.train_neighbour_kl is not None:
            metrics["train_neighbour_kl"] = self.train_neighbour_kl
        return metrics


class TrainingCallbacks(Protocol):
    def on_validation(self, record: ProgressRecord) -> None:
        """Called after every validation, on every worker."""

    def on_step(self, step: int, loss: float) -> None:
        """Called after every optimizer step (progress, tests' fault injection)."""

    def save(self, state: TrainState) -> None:
        """Persist a checkpoint of the current weights with ``state``."""


@dataclass(frozen=True)
class StepResult:
    loss: float
    """The step's objective: negative ELBO, plus the weighted neighbour term when it is on."""
    applied: bool
    """False when the gradient was non-finite and the step was skipped."""
    neighbour_kl: float | None = None
    """The unweighted KL(P || Q) of the step (None without the neighbour term)."""


@dataclass(frozen=True)
class NeighbourTerm:
    """The neighbour term of one step: ``weight * KL(P || Q)`` over the rows of the batch.

    P: ``joint_affinities`` of the input rows times ``feature_scale`` at ``perplexity``; Q:
    Student-t affinities with ``dof`` of their embedding, the vector ``VAE.embed`` returns, times
    ``scale``.
    """

    weight: float
    perplexity: float
    dof: float
    scale: float = 1.0
    gather: Callable[[Tensor], Tensor] | None = None
    """Concatenates every worker's rows along dim 0, passing gradients back to each worker's
    own rows (Ray Train DDP), so the term sees the global batch; None in a single process."""
    feature_scale: Tensor | None = None
    """Per-feature factors applied to the (normalized) rows before their affinities: the
    normalizer's scale, so that P sees the rows in the data's own units, as UMAP and t-SNE see
    the user's X. z-scoring inflates rarely-lit features: on digits the 10-NN accuracy of the
    rows themselves is 0.955 raw and 0.937 z-scored, and the embeddings followed (3 seeds:
    0.953-0.955 against 0.942-0.947). None: the rows as the batch holds them."""


def neighbour_term(config: TrainConfig, dim_latent: int,
                   gather: Callable[[Tensor], Tensor] | None = None,
                   feature_scale: Tensor | None = None) -> NeighbourTerm | None:
    """The term as ``config`` defines it for a model of ``dim_latent``, or None when it is off.

    The same at every step: a linear warm-up of the weight over the first 1,000 steps measured
    no better on digits (10-NN 0.941 against 0.942, reconstruction MSE 7.26 against 7.03)."""
    if not config.neighbours_on:
        return None
    dof = config.neighbour_dof if config.neighbour_dof is not None else max(dim_latent - 1, 1)
    return NeighbourTerm(float(config.neighbour_weight), float(config.neighbour_perplexity),
                         float(dof), float(config.neighbour_scale), gather, feature_scale)


@dataclass
class TrainingSetup:
    """What ``setup_training`` decided: the optimizer, the schedule and the state to train from."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    state: TrainState


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    # fused=True: one kernel per parameter instead of a chain of foreach passes over the
    # moments; Adam's memory traffic over 1-4M parameters is a large part of a small model's
    # step (benchmarks/train_throughput.py: +25-30% steps/s at batch 64 on CPU). Same update.
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=ADAM_EPS,
                            fused=fused or None)



def make_scheduler(optimizer: torch.optim.Optimizer,
                   config: TrainConfig) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The original's plateau rule: divide the LR by ``lr_scheduling_factor`` once the best
    validation loss is ``lr_scheduling_steps`` validations old."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=1.0 / config.lr_scheduling_factor,
        patience=config.lr_scheduling_steps - 1, threshold=0.0, cooldown=0, min_lr=0.0, eps=0.0)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


_SCHEDULE_SETTINGS = ("factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lrs",
                      "eps", "mode")


def setup_training(model: VAE, config: TrainConfig, saved: TrainState | None,
                   previous: TrainConfig | None, mode: RunMode) -> TrainingSetup:
    """The resume rules, the same for every launcher.

    - Optimizer moments always continue from ``saved`` when it holds them.
    - ``resume`` of an unfinished run restores the LR schedule and keeps the run's target step.
    - Otherwise (``new``, ``continue``, or resuming a run that had finished) the run trains
      ``config.num_steps`` more steps; the LR schedule continues unless the learning rate
      differs from ``previous`` or the last run had converged, when it restarts at
      ``config.learning_rate``. The schedule's settings always come from ``config``.
    """
    state = copy.deepcopy(saved) if saved is not None else TrainState()
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
    unfinished = state.step < state.target_step and not state.converged
    restart = (not state.scheduler or state.converged or previous is None
               or previous.learning_rate != config.learning_rate)
    if mode == "resume" and unfinished and state.scheduler:
        restart = False
    else:
        state.target_step = state.step + config.num_steps
    if restart:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate
    else:
        settings = {name: getattr(scheduler, name) for name in _SCHEDULE_SETTINGS}
        scheduler.load_state_dict({**state.scheduler, **settings})
    state.converged = False
    return TrainingSetup(optimizer, scheduler, state)


def _vae_of(module: nn.Module) -> VAE:
    """The VAE inside ``module``: itself, or wrapped by DDP, the compile hook or torch.compile
    (their ``module`` / ``_orig_mod``)."""
    while not isinstance(module, VAE):
        inner = getattr(module, "module", None)
        if inner is None:
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"train_step trains a VAE, bare or wrapped by DDP or torch.compile; "
                            f"got {type(module).__name__}")
        module = inner
    return module


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, *,
               keep_prob: float, grad_clip_norm: float, eps: Tensor | None = None,
               generator: torch.Generator | None = None,
               neighbours: NeighbourTerm | None = None) -> StepResult:
    """One optimizer step on batch ``x`` through ``module``: a VAE, or one wrapped by DDP, the
    compile hook or ``torch.compile`` (anything else raises TypeError).

    The objective is the negative ELBO of ``x``, plus ``weight * KL(P || Q)`` over the rows of
    ``x`` (gathered from every worker when ``neighbours.gather`` is set) with ``neighbours``.
    Backward always runs, so DDP's gradient all-reduce happens on every worker; the
    step is then skipped on all workers alike when the (synchronized) gradient norm is not finite.
    Without dropout the noise ``eps`` is drawn here, before the forward: it is the generator's
    first draw either way, and a forward that draws nothing compiles as one graph.
    """
    optimizer.zero_grad(set_to_none=True)
    if eps is None and keep_prob >= 1.0:
        eps = _vae_of(module).draw_noise(x.shape[:-1], generator)
    kl: Tensor | None = None
    if neighbours is None:
        out = module(x, keep_prob, eps, generator)
        loss = out.loss
    else:
        # The embedding is computed inside forward: DDP must see every use of the weights.
        out = module(x, keep_prob, eps, generator, x)
        z, rows = out.embedding, x
        if neighbours.gather is not None:
            z = neighbours.gather(z)
            with torch.no_grad():
                rows = neighbours.gather(x)
        if neighbours.feature_scale is not None:
            rows = rows * neighbours.feature_scale
        kl = neighbour_kl(joint_affinities(rows, neighbours.perplexity), z * neighbours.scale,
                          neighbours.dof)
        loss = out.loss + neighbours.weight * kl
    loss.backward()
    applied = clip_gradients(optimizer, grad_clip_norm)
    if applied:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    # Read back to Python only now: a .item() before backward would stall a GPU's queue.
    return StepResult(float(loss.detach()), applied=applied,
                      neighbour_kl=None if kl is None else float(kl.detach()))


@torch.no_grad()
def evaluate_batches(model: VAE, batches: Iterator[Tensor], seed: int = 0) -> tuple[float, float, float, int]:
    """Summed (loss, recon, kl) and row count over ``batches``, noise fixed by ``seed``.

    Fixing the noise makes successive validations comparable, which steadies the LR schedule.
    Returns sums so that workers can add theirs before dividing. Raises
    ``NonFiniteTrainingError`` naming the feature when a row's loss is not finite.
    """
    generator = torch.Generator().manual_seed(seed)
    recon_sum = kl_sum = 0.0
    rows = 0
    for x in batches:
        eps = torch.randn((x.shape[0], model.config.dim_latent), generator=generator, dtype=x.dtype)
        out = model(x, 1.0, eps.to(x.device))
        per_row = out.recon + out.kl
        if not bool(torch.isfinite(per_row).all()):
            bad = int(torch.nonzero(~torch.isfinite(per_row))[0])
            feature = int(x[bad].abs().argmax())
            raise NonFiniteTrainingError(
                f"The validation loss of a row is not finite: its feature {feature} is "
                f"{float(x[bad, feature]):.3g} after normalization, far outside the training "
                "data's range; remove or clip such rows")
        recon_sum += float(out.recon.sum())
        kl_sum += float(out.kl.sum())
        rows += x.shape[0]
    return recon_sum + kl_sum, recon_sum, kl_sum, rows


def validation_seed(seed: int, rank: int) -> int:
    return derive_seed(seed, VALIDATION, rank)


def _check_finite_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteTrainingError(
                f"Parameter {name} holds non-finite values; refusing to write a checkpoint")


def run_training(model: VAE, module: nn.Module, setup: TrainingSetup, batches: Iterator[Tensor],
                 evaluate: Callable[[], ValidationResult], config: TrainConfig,
                 callbacks: TrainingCallbacks, *, rank: int = 0,
                 world_batch_rows: int | None = None,
                 gather: Callable[[Tensor], Tensor] | None = None,
                 feature_scale: Tensor | None = None) -> TrainState:
    """Train from ``setup.state.step`` to its target step or until the LR schedule converges.

    ``model`` is the bare VAE (checkpointed); ``module`` is what the forward pass runs through
    (the same VAE, or its DDP wrapper). ``batches`` yield ``config.step_rows`` rows per step
    (this worker's share of them); the neighbour term sees every worker's through ``gather``,
    each row times ``feature_scale`` (the normalizer's scale: the data's units).
    Validates every ``test_every`` steps (step 0 of a fresh run included), applies the plateau
    rule and the stop-at-minimum-LR rule, saves every ``checkpoint_every`` steps and at the end.
    A ``KeyboardInterrupt`` propagates after ``setup.state`` was kept current, so the caller can
    save it. On the CPU it first tells glibc's malloc to keep freed memory, for the rest of the
    process (``cvae_model.allocator``; ``CVAE_MALLOC_TUNING=0`` leaves malloc alone).
    """
    optimizer, scheduler, state = setup.optimizer, setup.scheduler, setup.state
    if config.seed is None:
        raise ValueError("run_training needs a resolved seed (cvae_model.seeds.resolve_seed)")
    rows_per_step = world_batch_rows or config.step_rows
    device = next(model.parameters()).device
    if device.type == "cpu":  # no page faults for each step's tensors (cvae_model.allocator)
        keep_freed_memory()
    generator = torch.Generator(device=device)
    if module is model:  # not under DDP (several workers): compile there is untested
        module = compile_for_training(module, config)
    train_losses: list[float] = []  # losses of the steps since the last validation
    neighbour_kls: list[float] = []
    term = neighbour_term(config, model.config.dim_latent, gather, feature_scale)
    nonfinite_in_a_row = 0
    last_saved, last_validated = state.step, -1
    window = [time.perf_counter(), state.step]  # start time and step of the samples/s window

    def validate() -> ValidationResult:
        nonlocal last_validated
        last_validated = state.step
        result = evaluate()
        if result.rows == 0:
            raise ValueError("The validation split has no rows: nothing to validate on")
        now = time.perf_counter()
        rate = (state.step - window[1]) * rows_per_step / max(now - window[0], 1e-9)
        window[:] = [now, state.step]
        train_loss = sum(train_losses) / len(train_losses) if train_losses else float("nan")
        train_losses.clear()
        kl_mean = None
        if config.neighbours_on:
            kl_mean = sum(neighbour_kls) / len(neighbour_kls) if neighbour_kls else float("nan")
        neighbour_kls.clear()
        state.last_val_loss = result.loss
        state.best_val_loss = min(state.best_val_loss, result.loss)
        callbacks.on_validation(ProgressRecord(state.step, train_loss, result.loss, result.recon,
                                               result.kl, current_lr(optimizer), rate, kl_mean))
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
            scheduler.step(result.loss)
            after = current_lr(optimizer)
            if after < before and after <= config.lr_scheduling_min:
                state.converged = True

    if state.step == 0 and state.target_step > 0:
        validate_and_schedule()  # the untrained model's loss, as the original logged
    while state.step < state.target_step and not state.converged:
        generator.manual_seed(derive_seed(config.seed, NOISE, rank, state.step))
        step = train_step(module, optimizer, next(batches), keep_prob=config.dropout_keep_prob,
                          grad_clip_norm=config.grad_clip_norm, generator=generator,
                          neighbours=term)
        if step.applied:
            nonfinite_in_a_row = 0
            train_losses.append(step.loss)
            if step.neighbour_kl is not None:
                neighbour_kls.append(step.neighbour_kl)
        else:
            nonfinite_in_a_row += 1
            if nonfinite_in_a_row >= config.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"{nonfinite_in_a_row} consecutive steps had non-finite gradients at step "
                    f"{state.step}; try a lower learning_rate or check the data for extreme values")
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
