"""Training data as the in-process loop sees it: batches of normalized rows.

``ArrayData`` serves arrays held in memory. ``pipeline.local_data.StreamingData`` serves the same
interface from Ray Data readers for data sets larger than memory; the estimator works with either.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from cvae_model.normalization import FeatureStats, Normalizer

__all__ = ["ArrayData", "TrainingData", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers, well mixed (so seed 1 and seed 2 give unrelated streams)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class TrainingData(Protocol):
    """What the estimator needs from a training set."""

    @property
    def dim_feature(self) -> int: ...

    def train_stats(self) -> FeatureStats:
        """Per-feature statistics of the training split."""

    def train_batches(self, batch_size: int, seed: int, start_step: int,
                      normalizer: Normalizer) -> Iterator[torch.Tensor]:
        """Endless normalized training batches; the batch of step s depends only on (seed, s)."""

    def valid_batches(self, batch_size: int, normalizer: Normalizer) -> Iterator[torch.Tensor]:
        """One pass over the whole validation split, normalized."""

    def valid_rows(self) -> int: ...


class ArrayData:
    """Train and validation arrays in memory (float32, shape (n, d))."""

    def __init__(self, train: np.ndarray, valid: np.ndarray) -> None:
        self.train = train
        self.valid = valid
        self._normalized: tuple[Normalizer, torch.Tensor, np.ndarray] | None = None

    @property
    def dim_feature(self) -> int:
        return int(self.train.shape[1])

    def train_stats(self) -> FeatureStats:
        return FeatureStats.from_batch(self.train)

    def valid_rows(self) -> int:
        return int(self.valid.shape[0])

    def _normalize(self, normalizer: Normalizer) -> tuple[torch.Tensor, np.ndarray]:
        # Normalize once per normalizer rather than per batch.
        if self._normalized is None or self._normalized[0] is not normalizer:
            self._normalized = (normalizer, torch.from_numpy(normalizer.transform(self.train)),
                                normalizer.transform(self.valid))
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
            generator = torch.Generator().manual_seed(derive_seed(seed, 3, epoch))
            order = torch.randperm(n, generator=generator)
            for i in range(index, per_epoch):
                yield data[order[i * size:(i + 1) * size]]
                step += 1

    def valid_batches(self, batch_size: int, normalizer: Normalizer) -> Iterator[torch.Tensor]:
        _, valid = self._normalize(normalizer)
        for start in range(0, valid.shape[0], batch_size):
            yield torch.from_numpy(valid[start:start + batch_size])
