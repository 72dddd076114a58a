"""In-process training from a path: ``CompressionVAE(X='~/my_dataset')`` streams through Ray Data.

``StreamingData`` is ``cvae_model.data.TrainingData`` over ``pipeline.prepare``: statistics in
one distributed pass, the split by a hash of each row's id, and training batches streamed epoch
after epoch (``cvae_model.data.stream_batches``), so neither statistics nor training hold the
whole data set in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cvae_model.data import stream_batches
from cvae_model.normalization import FeatureStats, Normalizer
from pipeline.errors import raise_data_errors
from pipeline.prepare import PreparedData, as_source, epoch_batches, prepare
from pipeline.runtime import ensure_ray

__all__ = ["StreamingData"]


class StreamingData:
    """Train/validation splits of a Ray dataset, served as normalized torch batches."""

    def __init__(self, prepared: PreparedData, source: Any, valid_source: Any,
                 train_valid_split: float) -> None:
        self.prepared = prepared
        self.source = source
        """The source this was read from (a Ray launcher re-reads it where the workers are)."""
        self.valid_source = valid_source
        self.train_valid_split = train_valid_split

    @classmethod
    def open(cls, source: Any, valid_source: Any = None, train_valid_split: float = 0.9, *,
             seed: int, dim_feature: int | None = None) -> StreamingData:
        """Read ``source`` (a path, URI or ``SourceSpec``), split it, compute the statistics."""
        ensure_ray()
        prepared = prepare(source, valid_source, train_valid_split, seed=seed,
                           dim_feature=dim_feature)
        return cls(prepared, as_source(source),
                   None if valid_source is None else as_source(valid_source), train_valid_split)

    @property
    def dim_feature(self) -> int:
        return self.prepared.dim_feature

    def train_stats(self) -> FeatureStats:
        return self.prepared.stats

    def valid_rows(self) -> int:
        return self.prepared.valid_rows

    def train_batches(self, batch_size: int, seed: int, start_step: int,
                      normalizer: Normalizer) -> Iterator[torch.Tensor]:
        return stream_batches(epoch_batches(self.prepared.train, seed),
                              self.prepared.train_rows, batch_size, start_step, normalizer)

    def valid_batches(self, batch_size: int, normalizer: Normalizer) -> Iterator[torch.Tensor]:
        norm = normalizer.to_torch()
        with raise_data_errors():
            for batch in self.prepared.valid.iter_batches(batch_size=batch_size,
                                                          batch_format="numpy"):
                features = np.array(batch["features"], dtype=np.float32)  # a writable copy
                yield norm.normalize(torch.from_numpy(features))
