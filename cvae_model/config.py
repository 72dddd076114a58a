"""Typed configuration of the model and of training.

Both configs are frozen dataclasses: built once (by the estimator or a job), passed down, and
saved with the weights (``asdict``) so a restored model is rebuilt from what it was trained with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

__all__ = [
    "Initializer",
    "ModelConfig",
    "TrainConfig",
    "default_cells_encoder",
]

Initializer = Literal["orthogonal", "truncated_normal", "lecun_normal"]
INITIALIZERS: tuple[str, ...] = get_args(Initializer)
NEIGHBOUR_WEIGHT = 15.0
"""Default weight of the neighbour term, chosen by measurement (README, "Changed defaults"): on
digits (2-D, seed 0) 10-NN accuracy rose with the weight up to 10-15 (0.82 at 0, 0.91 at 2, 0.94
at 10-15) and stayed there to 80, while reconstruction was best around 5-15 (measured while P was
computed on the z-scored rows; not re-tuned since P sees the data's units)."""


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"The '{name}' parameter of {owner} must be an int in the range [{low}, inf). "
            f"Got {value!r} instead."
        )


def _check_positive(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"The '{name}' parameter of {owner} must be a number > 0. Got {value!r} instead."
        )


def default_cells_encoder(dim_feature: int, dim_latent: int) -> tuple[tuple[int, ...], int]:
    """The original CompressionVAE's width rule, reproduced exactly.

    Returns ``(cells_encoder, cells_hidden)``: two encoder widths chosen from powers of two between
    the latent and the feature size, and the width of the mu/log-variance layer and of every IAF
    hidden layer, ``min(cells_encoder[-1], 64)``. For example (784, 2) -> ((512, 128), 64) and
    (64, 2) -> ((64, 32), 32).
    """
    smallest = 2 ** ((dim_latent - 1).bit_length())
    largest = 2 ** dim_feature.bit_length() // 2
    powers = [smallest]
    while powers[-1] <= largest:
        powers.append(powers[-1] * 2)
    index = len(powers) // 2
    try:
        cells = (largest, powers[index + 1])
    except IndexError:  # the original's fallback; unreachable for dim_latent >= 1
        cells = (largest, largest // 2)
    # The original yields a zero width for d=1 ([1, 0]); a layer needs at least one unit.
    cells = tuple(max(c, 1) for c in cells)
    return cells, min(cells[-1], 64)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the VAE with IAF layers; everything needed to rebuild the network."""

    dim_feature: int
    """Number of input features d."""
    dim_latent: int = 2
    """Size k of the embedding."""
    iaf_flow_length: int = 5
    """Number of IAF steps; 0 is a plain diagonal-Gaussian VAE."""
    cells_encoder: tuple[int, ...] | None = None
    """Encoder hidden widths (the decoder mirrors them); None applies the original's rule."""
    cells_hidden: int | None = None
    """Width of the mu/log-variance layer's halves and of the IAF hidden layers; None: the rule."""
    initializer: Initializer = "orthogonal"
    """Weight initializer: 'orthogonal', 'truncated_normal' or 'lecun_normal'."""
    feature_normalization: bool = True
    """Whether features are z-scored with training statistics before the network sees them."""
    initial_s_offset: float = 1.0
    """Added to the IAF gate pre-activation, biasing each step towards keeping z (the original's)."""
    log_var_bound: float = 10.0
    """Soft bound |log sigma^2| < bound on the encoder's variance (the original had none and NaNed)."""

    def __post_init__(self) -> None:
        owner = "CompressionVAE"
        _check_int(owner, "dim_feature", self.dim_feature, 1)
        _check_int(owner, "dim_latent", self.dim_latent, 1)
        _check_int(owner, "iaf_flow_length", self.iaf_flow_length, 0)
        if self.initializer not in INITIALIZERS:
            raise ValueError(
                f"The 'initializer' parameter of {owner} must be one of {list(INITIALIZERS)}. "
                f"Got {self.initializer!r} instead."
            )
        default_cells, _ = default_cells_encoder(self.dim_feature, self.dim_latent)
        cells = default_cells if self.cells_encoder is None else tuple(self.cells_encoder)
        if not cells or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cells):
            raise ValueError(
                f"The 'cells_encoder' parameter of {owner} must be a non-empty list of positive "
                f"ints. Got {self.cells_encoder!r} instead."
            )
        hidden = min(cells[-1], 64) if self.cells_hidden is None else self.cells_hidden
        _check_int(owner, "cells_hidden", hidden, 1)
        _check_positive(owner, "log_var_bound", self.log_var_bound)
        # Frozen: resolved values are written through object.__setattr__ once, here.
        object.__setattr__(self, "cells_encoder", tuple(int(c) for c in cells))
        object.__setattr__(self, "cells_hidden", int(hidden))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cells_encoder"] = list(self.cells_encoder or ())
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown ModelConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the original's ``train()`` parameters plus the batch sizes and safety knobs."""

    learning_rate: float = 1e-3
    """Initial Adam learning rate."""
    num_steps: int = 50_000
    """Optimizer steps to take in one ``train()`` call / one training run (not an absolute cap)."""
    dropout_keep_prob: float = 1.0
    """Keep probability of dropout in training steps (1.0 disables dropout).

    The original's default was 0.75; on scikit-learn's digits that gives a 10-NN accuracy of the
    2-D embedding of 0.63 against 0.83 without dropout (see README, "Changed defaults")."""
    test_every: int = 50
    """Validate on the whole validation split every this many steps."""
    lr_scheduling: bool = True
    """Reduce the LR on a validation plateau and stop once it reaches ``lr_scheduling_min``."""
    lr_scheduling_steps: int = 10
    """Plateau window, counted in validations (the original's 5 stops training too early)."""
    lr_scheduling_factor: float = 5.0
    """The LR is divided by this on a plateau."""
    lr_scheduling_min: float = 1e-5
    """Training stops once a decrease brings the LR to or below this."""
    checkpoint_every: int = 2000
    """Write a checkpoint every this many steps (and always at the end)."""
    batch_size: int = 64
    """Rows per optimizer step (global: split across Ray Train workers); raised to
    neighbour_batch_size while the neighbour term is on."""
    batch_size_test: int = 64
    """Rows per validation forward pass (memory only: the whole split is always evaluated)."""
    grad_clip_norm: float = 100.0
    """Global gradient-norm clip; protects against the rare huge gradient."""
    max_nonfinite_steps: int = 20
    """Consecutive non-finite losses tolerated (each skipped) before training aborts."""
    keep_checkpoints: int = 2
    """Checkpoints kept in a logdir (the original kept 2)."""
    seed: int | None = None
    """Seed of batch order, dropout and noise; None draws one."""
    neighbour_weight: float = NEIGHBOUR_WEIGHT
    """Weight of the neighbour-preserving term KL(P||Q) added to the negative ELBO (parametric
    t-SNE inside the VAE, as scvis): P from the input rows of a batch, Q from their embedding.
    0 trains the original objective exactly (see README, "Changed defaults")."""
    neighbour_perplexity: float = 10.0
    """Perplexity of the input affinities P (t-SNE's; capped at (rows - 1) / 3 of the batch).
    Within a batch of 512 rows, 10 gave better neighbourhoods than t-SNE's usual 30."""
    neighbour_batch_size: int = 512
    """Least rows per step while the neighbour term is on (global: gathered across Ray Train
    workers for the term): its affinities need hundreds of rows, so a step takes
    max(batch_size, neighbour_batch_size) rows, for the ELBO and the term alike."""
    neighbour_dof: float | None = None
    """Degrees of freedom of the Student-t kernel of Q; None: max(dim_latent - 1, 1) (1, the
    Cauchy kernel of t-SNE, for a 2-D embedding)."""
    neighbour_scale: float = 5.0
    """Q is computed on ``neighbour_scale`` times the embedding (a Student-t kernel of length
    1 / neighbour_scale): t-SNE spreads clusters over tens of units, the VAE's N(0, I) prior
    over a few; at 1 the two fight and the ELBO gives up a latent dimension."""

    def __post_init__(self) -> None:
        owner = "CompressionVAE.train"
        _check_positive(owner, "learning_rate", self.learning_rate)
        _check_int(owner, "num_steps", self.num_steps, 0)
        if not 0.0 < self.dropout_keep_prob <= 1.0:
            raise ValueError(
                f"The 'dropout_keep_prob' parameter of {owner} must be in (0, 1]. "
                f"Got {self.dropout_keep_prob!r} instead."
            )
        _check_int(owner, "test_every", self.test_every, 1)
        _check_int(owner, "lr_scheduling_steps", self.lr_scheduling_steps, 1)
        if not self.lr_scheduling_factor > 1:
            raise ValueError(
                f"The 'lr_scheduling_factor' parameter of {owner} must be > 1. "
                f"Got {self.lr_scheduling_factor!r} instead."
            )
        _check_positive(owner, "lr_scheduling_min", self.lr_scheduling_min)
        _check_int(owner, "checkpoint_every", self.checkpoint_every, 1)
        _check_int(owner, "batch_size", self.batch_size, 1)
        _check_int(owner, "batch_size_test", self.batch_size_test, 1)
        _check_positive(owner, "grad_clip_norm", self.grad_clip_norm)
        _check_int(owner, "max_nonfinite_steps", self.max_nonfinite_steps, 1)
        _check_int(owner, "keep_checkpoints", self.keep_checkpoints, 1)
        weight = self.neighbour_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"The 'neighbour_weight' parameter of {owner} must be a finite number "
                             f">= 0 (0 turns the neighbour term off). Got {weight!r} instead.")
        _check_positive(owner, "neighbour_perplexity", self.neighbour_perplexity)
        _check_int(owner, "neighbour_batch_size", self.neighbour_batch_size, 2)
        if self.neighbour_dof is not None:
            _check_positive(owner, "neighbour_dof", self.neighbour_dof)
        _check_positive(owner, "neighbour_scale", self.neighbour_scale)

    @property
    def neighbours_on(self) -> bool:
        """Whether the neighbour term is part of the objective."""
        return self.neighbour_weight > 0

    @property
    def step_rows(self) -> int:
        """Rows a step takes (all workers together): batch_size, and at least
        neighbour_batch_size while the neighbour term is on."""
        if not self.neighbours_on:
            return self.batch_size
        return max(self.batch_size, self.neighbour_batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config ``to_dict`` wrote. One saved before the neighbour term existed was trained
        with the original objective, so its ``neighbour_weight`` is 0, not today's default."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("neighbour_weight", 0.0)
        return cls(**values)
