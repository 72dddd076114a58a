"""Per-feature statistics of a Ray dataset in one distributed pass.

Each block yields a partial ``FeatureStats`` (count, mean, M2 in float64); the driver merges them
with Chan et al.'s pairwise update, which stays accurate where a sum of squares would cancel.
Only one partial per block ever reaches the driver, so memory does not grow with the rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvae_model.normalization import FeatureStats
from pipeline.sources import raise_data_errors

__all__ = ["compute_stats"]


def _partial(batch: dict[str, np.ndarray], column: str) -> dict[str, np.ndarray]:
    stats = FeatureStats.from_batch(np.asarray(batch[column], dtype=np.float64))
    return {"count": np.array([stats.count]), "mean": stats.mean[None], "m2": stats.m2[None]}


def compute_stats(dataset: Any, column: str = "features") -> FeatureStats:
    """Count, mean and M2 per feature of ``column`` over the whole dataset (streaming)."""
    total: FeatureStats | None = None
    partials = dataset.map_batches(_partial, fn_kwargs={"column": column}, batch_size=4096,
                                   batch_format="numpy")
    with raise_data_errors():
        for part in partials.iter_batches(batch_size=None, batch_format="numpy"):
            for count, mean, m2 in zip(part["count"], part["mean"], part["m2"], strict=True):
                piece = FeatureStats(int(count), np.asarray(mean), np.asarray(m2))
                total = piece if total is None else total.merge(piece)
    if total is None:
        raise ValueError("The dataset has no rows: cannot compute feature statistics")
    return total
