"""Training data as the loop sees it: endless normalized batches whose order depends on (seed, step).

Two implementations of one contract (``TrainingData``):

- ``ArrayData``: rows in memory. Step s takes batch ``s % per_epoch`` of the permutation of epoch
  ``s // per_epoch``, so any step's batch is known without replaying the ones before it.
- ``StreamedBatches`` (via ``stream_batches``): rows streamed epoch by epoch from a reader that
  shuffles per (seed, epoch); a resumed run skips the batches of its epoch already taken.

The in-process estimator uses either (arrays, or ``pipeline.streaming`` for a path); a Ray Train
worker uses ``ArrayData`` over its cached shard or ``stream_batches`` over a streamed one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

from cvae_model.normalization import FeatureStats, Normalizer
from cvae_model.seeds import BATCHES, SPLIT, derive_seed

__all__ = ["ArrayData", "TrainingData", "split_arrays", "stream_batches", "too_few_rows"]


class TrainingData(Protocol):
    """What a launcher needs from a training set."""

    @property
    def dim_feature(self) -> int: ...

    def train_stats(self) -> FeatureStats:
        """Per-feature statistics of the training split."""

    def train_batches(self, batch_size: int, seed: int, start_step: int,
                      normalizer: Normalizer) -> Iterator[torch.Tensor]:
        """Endless normalized training batches of ``batch_size`` rows, from step ``start_step``."""

    def valid_batches(self, batch_size: int, normalizer: Normalizer) -> Iterator[torch.Tensor]:
        """One pass over the whole validation split, normalized."""

    def valid_rows(self) -> int: ...


def too_few_rows(split: str, where: str, rows: int, needed: int, hint: str) -> ValueError:
    """The one message for a split too small to train or validate on."""
    return ValueError(f"The {split} split ({where}) has {rows} row(s); at least {needed} are "
                      f"needed. {hint}")


def split_arrays(data: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows of an in-memory array: a seeded permutation, exact fraction."""
    n = data.shape[0]
    n_train = int(fraction * n)
    hint = "Pass X_valid, more rows, or another train_valid_split."
    where = f"train_valid_split={fraction} of {n} rows"
    if n_train < 1:
        raise too_few_rows("training", where, n_train, 1, hint)
    if n - n_train < 1:
        raise too_few_rows("validation", where, n - n_train, 1, hint)
    order = np.random.default_rng(derive_seed(seed, SPLIT)).permutation(n)
    return data[order[:n_train]], data[order[n_train:]]


class ArrayData:
    """Train and validation arrays in memory (float32, shape (n, d))."""

    def __init__(self, train: np.ndarray, valid: np.ndarray) -> None:
        self.train = train
        self.valid = valid
        self._normalized: tuple[Normalizer, torch.Tensor, torch.Tensor] | None = None

    @property
    def dim_feature(self) -> int:
        return int(self.train.shape[1])

    def train_stats(self) -> FeatureStats:
        return FeatureStats.from_batch(self.train)

    def valid_rows(self) -> int:
        return int(self.valid.shape[0])

    def _normalize(self, normalizer: Normalizer) -> tuple[torch.Tensor, torch.Tensor]:
        # Normalize once per normalizer rather than per batch.
        if self._normalized is None or self._normalized[0] is not normalizer:
            norm = normalizer.to_torch()
            self._normalized = (normalizer, norm.normalize(torch.from_numpy(self.train)),
                                norm.normalize(torch.from_numpy(self.valid)))
        return self._normalized[1], self._normalized[2]

    def train_batches(self, batch_size: int, seed: int, start_step: int,
                      normalizer: Normalizer) -> Iterator[torch.Tensor]:
        """Shuffled full batches; step s is batch s % per_epoch of epoch s // per_epoch, so a
        resumed run sees the batches an uninterrupted one would have."""
        data, _ = self._normalize(normalizer)
        n = data.shape[0]
        size = min(batch_size, n)
        per_epoch = max(n // size, 1)
        step = start_step
        while True:
            epoch, index = divmod(step, per_epoch)
            generator = torch.Generator().manual_seed(derive_seed(seed, BATCHES, epoch))
            order = torch.randperm(n, generator=generator)
            for i in range(index, per_epoch):
                yield data[order[i * size:(i + 1) * size]]
                step += 1

    def valid_batches(self, batch_size: int, normalizer: Normalizer) -> Iterator[torch.Tensor]:
        _, valid = self._normalize(normalizer)
        for start in range(0, valid.shape[0], batch_size):
            yield valid[start:start + batch_size]


def stream_batches(epoch_batches: Callable[[int, int], Iterator[np.ndarray]], rows: int,
                   batch_size: int, start_step: int, normalizer: Normalizer,
                   device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Endless normalized batches of exactly ``batch_size`` rows from a streamed source.

    ``epoch_batches(epoch, batch_size)`` yields one shuffled pass (its order drawn from the
    epoch) over ``rows`` rows as float32 arrays; the last, short batch of a pass is dropped so
    every step has the same size. A run resumed at ``start_step`` starts at epoch
    ``start_step // per_epoch`` and skips the batches of that epoch already taken.
    """
    size = min(batch_size, rows)
    if size < 1:
        raise too_few_rows("training", "the streamed source", rows, 1, "Point the source at more data.")
    per_epoch = max(rows // size, 1)
    epoch, skip = divmod(start_step, per_epoch)
    norm = normalizer.to_torch(device)
    while True:
        taken = 0
        for index, batch in enumerate(epoch_batches(epoch, size)):
            if batch.shape[0] < size:
                continue
            taken += 1
            if index >= skip:
                rows = np.ascontiguousarray(batch, dtype=np.float32)
                rows = rows if rows.flags.writeable else rows.copy()  # Arrow views are read-only
                yield norm.normalize(torch.from_numpy(rows).to(device))
        if taken == 0:
            raise too_few_rows("training", "one pass of the stream", rows, size,
                               f"A pass gave no full batch of {size} rows; lower batch_size.")
        skip = 0
        epoch += 1
