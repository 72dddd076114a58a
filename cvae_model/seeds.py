"""The one seed rule: every random stream is derived from (seed, stream, ...) with SeedSequence.

A run has one integer seed. ``seed=None`` draws one (``resolve_seed``) and the drawn value is
recorded in the run's ``TrainConfig``, so it can be repeated. Each use of randomness takes its own
stream, so changing, say, the batch order never changes the initial weights:

    SPLIT       train/validation split of in-memory arrays
    INIT        initial weights
    NOISE       a training step's reparameterization noise and dropout (per rank, per step)
    BATCHES     batch order (per epoch)
    VALIDATION  the fixed noise of validation passes (per rank)
"""

from __future__ import annotations

import numpy as np

__all__ = ["BATCHES", "INIT", "NOISE", "SPLIT", "VALIDATION", "derive_seed", "resolve_seed"]

SPLIT, INIT, NOISE, BATCHES, VALIDATION = 0, 1, 2, 3, 4


def derive_seed(seed: int, stream: int, *parts: int) -> int:
    """A 63-bit seed for ``stream`` of ``seed``, mixed with ``parts`` (an epoch, a rank, a step).

    Well mixed: seeds 1 and 2, or steps 10 and 11, give unrelated streams.

    Example:
        >>> derive_seed(0, NOISE, 0, 10) != derive_seed(0, NOISE, 0, 11)
        True
    """
    words = [int(p) & 0xFFFFFFFF for p in (seed, seed >> 32, stream, *parts)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def resolve_seed(seed: int | None) -> int:
    """``seed`` itself, or a fresh non-negative seed drawn from the OS when it is None."""
    if seed is not None:
        return int(seed)
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(33))
