"""In-process training from a path: ``CompressionVAE(X='~/my_dataset')`` streams through Ray Data.

``StreamingData`` implements ``cvae_model.data.TrainingData`` over the readers in
``pipeline.sources``: statistics in one distributed pass, the split by a hash of each row's id,
and training batches streamed epoch after epoch, so neither statistics nor training hold the whole
data set in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cvae_model.data import derive_seed
from cvae_model.normalization import FeatureStats, Normalizer

__all__ = ["StreamingData"]

_CACHE_BYTES = 512 * 1024**2


def _as_source(value: Any) -> Any:
    from pipeline.sources import SourceSpec

    if isinstance(value, (str, os.PathLike)):
        return SourceSpec(path=os.fspath(value))
    return value


class StreamingData:
    """Train/validation splits of a Ray dataset, served as normalized torch batches."""

    def __init__(self, train: Any, valid: Any, stats: FeatureStats, valid_count: int,
                 source: Any = None, valid_source: Any = None) -> None:
        self.source = source
        """The source spec this was read from (the Ray Train launcher re-reads it)."""
        self.valid_source = valid_source
        self.train = train
        self.valid = valid
        self._stats = stats
        self._valid_count = valid_count

    @classmethod
    def open(cls, source: Any, valid_source: Any = None, train_valid_split: float = 0.9, *,
             seed: int = 0, dim_feature: int | None = None) -> StreamingData:
        """Read ``source`` (a path or ``SourceSpec``), split it, and compute the statistics."""
        import ray

        from pipeline.sources import read_source
        from pipeline.split import split_by_id
        from pipeline.stats import compute_stats

        if not ray.is_initialized():
            ray.init()
        dataset = read_source(_as_source(source))
        if valid_source is not None:
            train, valid = dataset, read_source(_as_source(valid_source))
        else:
            train, valid = split_by_id(dataset, train_valid_split, seed=seed)
        train = train.select_columns(["features"])
        valid = valid.select_columns(["features"])
        try:
            stats = compute_stats(train)
        except ValueError as exc:
            raise ValueError(f"The training split of {source} is empty (train_valid_split="
                             f"{train_valid_split}): {exc}") from exc
        if stats.count * stats.mean.shape[0] * 4 < _CACHE_BYTES:
            # Small enough to cache: epochs then replay a reproducible order (resume relies on it)
            # without re-reading the files.
            train = train.materialize()
        found = int(stats.mean.shape[0])
        if dim_feature is not None and found != dim_feature:
            raise ValueError(f"X has {found} features, but CompressionVAE is expecting "
                             f"{dim_feature} features as input.")
        # Validation runs every test_every steps: cache it in the object store when it is small
        # rather than re-reading its files each time.
        valid = valid.materialize()
        valid_count = valid.count()
        if valid_count == 0:
            raise ValueError(f"The validation split of {source} is empty; lower train_valid_split "
                             f"(now {train_valid_split}) or pass X_valid")
        return cls(train, valid, stats, valid_count, _as_source(source),
                   None if valid_source is None else _as_source(valid_source))

    @property
    def dim_feature(self) -> int:
        return int(self._stats.mean.shape[0])

    def train_stats(self) -> FeatureStats:
        return self._stats

    def valid_rows(self) -> int:
        return self._valid_count

    def train_batches(self, batch_size: int, seed: int, start_step: int,
                      normalizer: Normalizer) -> Iterator[torch.Tensor]:
        from pipeline.sources import iter_feature_batches

        size = min(batch_size, self._stats.count)
        per_epoch = max(self._stats.count // size, 1)
        epoch, skip = divmod(start_step, per_epoch)
        mean, scale = torch.from_numpy(normalizer.mean), torch.from_numpy(normalizer.scale)
        while True:
            # Full batches only, so every step has the same size; `skip` realigns a resumed run.
            for index, batch in enumerate(iter_feature_batches(
                    self.train, size, seed=derive_seed(seed, 3), epoch=epoch)):
                if index < skip or batch.shape[0] < size:
                    continue
                yield (torch.from_numpy(np.ascontiguousarray(batch)) - mean) / scale
            skip = 0
            epoch += 1

    def valid_batches(self, batch_size: int, normalizer: Normalizer) -> Iterator[torch.Tensor]:
        mean, scale = torch.from_numpy(normalizer.mean), torch.from_numpy(normalizer.scale)
        for batch in self.valid.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield (torch.from_numpy(np.ascontiguousarray(batch["features"], dtype=np.float32))
                   - mean) / scale
