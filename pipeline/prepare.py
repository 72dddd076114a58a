"""Training data preparation, shared by the streaming estimator path and the Ray launcher.

read -> split (by a stable hash of each row's id) -> cache small sets in Ray's object store ->
statistics of the training split -> checks. The result holds Ray Datasets of ``id`` and
``features``; launchers turn them into batches (``epoch_batches`` for a whole dataset, the Ray
worker for its shard).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvae_model.data import too_few_rows
from cvae_model.normalization import FeatureStats
from cvae_model.seeds import BATCHES, derive_seed
from pipeline.errors import raise_data_errors
from pipeline.sources import OpenedSource, SourceSpec, open_source, read_source
from pipeline.split import split_by_id
from pipeline.stats import EmptyDatasetError, compute_stats

__all__ = ["CACHE_BYTES", "PreparedData", "as_source", "epoch_batches", "prepare"]

CACHE_BYTES = 512 * 1024**2
"""Training sets smaller than this are cached in the object store (read once, replayed)."""


def as_source(value: Any) -> SourceSpec | np.ndarray:
    """A path or URI as a ``SourceSpec``; specs and arrays as they are."""
    if isinstance(value, (str, os.PathLike)):
        return SourceSpec(path=os.fspath(value))
    return value


def _describe(source: SourceSpec | np.ndarray) -> str:
    return source.path if isinstance(source, SourceSpec) else f"an in-memory array {source.shape}"


@dataclass
class PreparedData:
    """The two splits as Ray Datasets (columns ``id``, ``features``) and what is known of them."""

    train: Any
    valid: Any
    stats: FeatureStats
    """Statistics of the training split (count, mean, M2 per feature)."""
    valid_rows: int
    cached: bool
    """True when the training split is materialized in Ray's object store."""
    description: str
    """The source, for messages and tags."""

    @property
    def train_rows(self) -> int:
        return int(self.stats.count)

    @property
    def dim_feature(self) -> int:
        return int(self.stats.mean.shape[0])


def _estimated_bytes(source: SourceSpec | np.ndarray | OpenedSource) -> int:
    if isinstance(source, OpenedSource):
        return source.rows * source.width * 4
    return int(np.asarray(source).shape[0] * np.asarray(source).shape[1] * 4)


def prepare(source: Any, valid_source: Any = None, train_valid_split: float = 0.9, *,
            seed: int, dim_feature: int | None = None, min_valid_rows: int = 1,
            cache: bool | None = None) -> PreparedData:
    """Read, split, cache and describe a training source (Ray must be initialized).

    ``source``/``valid_source``: a path or URI, a ``SourceSpec`` or an array. Without
    ``valid_source`` a row goes to training iff ``pipeline.split.is_train_row(id, split, seed)``.
    Raises ``ValueError`` naming the split when the training split is empty or the validation
    split has fewer than ``min_valid_rows`` rows (a Ray run needs one per worker), and the
    estimator's message when the width differs from ``dim_feature``.
    """
    spec = as_source(source)
    opened = open_source(spec) if isinstance(spec, SourceSpec) else spec
    dataset = read_source(opened).select_columns(["id", "features"])
    if valid_source is not None:
        valid_spec = as_source(valid_source)
        train, valid = dataset, read_source(valid_spec).select_columns(["id", "features"])
        valid_where = _describe(valid_spec)
    else:
        train, valid = split_by_id(dataset, train_valid_split, seed=seed)
        valid_where = f"train_valid_split={train_valid_split} of {_describe(spec)}"
    width = opened.width if isinstance(opened, OpenedSource) else opened.shape[1]
    if dim_feature is not None and width != dim_feature:
        raise ValueError(f"X has {width} features, but CompressionVAE is expecting "
                         f"{dim_feature} features as input.")
    cached = _estimated_bytes(opened) < CACHE_BYTES if cache is None else cache
    with raise_data_errors():
        if cached:  # read once; later epochs replay a reproducible order from the object store
            train = train.materialize()
        valid = valid.materialize()  # validated every test_every steps: always cached
        valid_rows = valid.count()
    if valid_rows < min_valid_rows:
        raise too_few_rows("validation", valid_where, valid_rows, min_valid_rows,
                           "Lower train_valid_split, pass a validation source, or use fewer workers.")
    try:
        stats = compute_stats(train)
    except EmptyDatasetError:
        raise too_few_rows("training", f"train_valid_split={train_valid_split} of {_describe(spec)}",
                           0, 1, "Raise train_valid_split or point the source at more data.") from None
    return PreparedData(train, valid, stats, valid_rows, cached, _describe(spec))


def epoch_batches(dataset: Any, seed: int) -> Callable[[int, int], Iterator[np.ndarray]]:
    """A function (epoch, batch_size) -> one shuffled pass over ``dataset``'s features.

    Blocks are visited in an order drawn from (seed, epoch) and rows mixed in a local buffer;
    the order is reproducible for a materialized dataset.
    """
    def one_epoch(epoch: int, batch_size: int) -> Iterator[np.ndarray]:
        shuffled = dataset.select_columns(["features"]).randomize_block_order(
            seed=derive_seed(seed, BATCHES, epoch, 0) % 2**31)
        with raise_data_errors():
            for batch in shuffled.iter_batches(
                    batch_size=batch_size, batch_format="numpy",
                    local_shuffle_buffer_size=max(8 * batch_size, 4096),
                    local_shuffle_seed=derive_seed(seed, BATCHES, epoch, 1) % 2**31):
                yield np.asarray(batch["features"], dtype=np.float32)

    return one_epoch
