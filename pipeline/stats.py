"""Per-feature statistics of a Ray dataset in one distributed pass.

Each block yields a partial ``FeatureStats`` (count, mean, M2 in float64); the driver merges them
with Chan et al.'s pairwise update, which stays accurate where a sum of squares would cancel.
Only one partial per block ever reaches the driver, so memory does not grow with the rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvae_model.normalization import FeatureStats
from pipeline.errors import DataValidationError, raise_data_errors
from pipeline.sources import skipped_rows

__all__ = ["EmptyDatasetError", "StatsReport", "compute_stats", "compute_stats_report"]

logger = logging.getLogger("cvae.data")

_ROWS_PER_PARTIAL = 4096


class EmptyDatasetError(DataValidationError):
    """The dataset (or its side of a split) has no rows to compute statistics over."""


@dataclass(frozen=True)
class StatsReport:
    """The result of one statistics pass."""

    stats: FeatureStats
    """Count, mean and M2 per feature over the rows that were read."""
    skipped: int
    """Rows (or files) dropped by sources with ``on_error="skip"`` while this pass ran.

    Counted where the rows are read, so it covers the whole source even when the pass runs over
    one side of ``split_by_id``. Concurrent executions of other skipping datasets add to it."""


def _partial(batch: dict[str, np.ndarray], column: str) -> dict[str, np.ndarray]:
    if column not in batch:
        raise DataValidationError(f"The dataset has no column {column!r}; its columns are "
                                  f"{sorted(batch)}")
    values = batch[column]
    if values.dtype == object:  # ragged or list cells: stack them, or name the column
        try:
            values = np.stack(values)
        except ValueError as exc:
            raise DataValidationError(f"column {column!r} holds rows of different lengths "
                                      f"({exc})") from exc
    if values.ndim != 2 or not (np.issubdtype(values.dtype, np.number)
                                or values.dtype == np.bool_):
        raise DataValidationError(f"column {column!r} has dtype {values.dtype} and shape "
                                  f"{values.shape[1:]} per row; expected a numeric vector")
    stats = FeatureStats.from_batch(values)
    return {"count": np.array([stats.count], np.int64), "mean": stats.mean[None],
            "m2": stats.m2[None]}


def compute_stats_report(dataset: Any, column: str = "features") -> StatsReport:
    """Statistics of ``column`` and the number of non-finite rows skipped while reading.

    Raises ``DataValidationError`` (unwrapped from Ray's task errors) naming the file, column or
    row of bad data, and ``DataValidationError`` when the dataset has no rows.
    """
    before = skipped_rows()
    partials = dataset.map_batches(
        _partial, fn_kwargs={"column": column}, batch_size=_ROWS_PER_PARTIAL,
        batch_format="numpy")
    total: FeatureStats | None = None
    with raise_data_errors():
        # batch_size=None: one small batch per block of partials; merged as they arrive.
        for part in partials.iter_batches(batch_size=None, batch_format="numpy"):
            for count, mean, m2 in zip(part["count"], part["mean"], part["m2"], strict=True):
                piece = FeatureStats(int(count), np.asarray(mean, np.float64),
                                     np.asarray(m2, np.float64))
                total = piece if total is None else total.merge(piece)
    skipped = skipped_rows() - before
    if total is None or total.count == 0:
        raise EmptyDatasetError(f"The dataset has no rows in column {column!r} (after "
                                  f"skipping {skipped} bad rows): cannot compute "
                                  "feature statistics")
    if skipped:
        logger.warning("Skipped %d bad row(s) or file(s) while reading; statistics are over "
                       "the remaining %d rows", skipped, total.count)
    return StatsReport(total, skipped)


def compute_stats(dataset: Any, column: str = "features") -> FeatureStats:
    """Count, mean and M2 per feature of ``column`` (float (n, d)) in one streaming pass.

    Merging partials is exact up to float64 rounding, in any order. Rows skipped as bad
    are logged (``cvae.data`` logger, WARNING); ``compute_stats_report`` also returns them.

    Example:
        >>> stats = compute_stats(read_source(np.eye(3)))  # doctest: +SKIP
        >>> stats.count, stats.mean  # doctest: +SKIP
        (3, array([0.333, 0.333, 0.333]))
    """
    return compute_stats_report(dataset, column).stats
