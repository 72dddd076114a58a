"""Train/validation split by a stable hash of each row's id.

A row's side depends only on (seed, id): not on the run, the process, the number of workers or
how rows are grouped into blocks, so the split of a growing data set stays put for old rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["is_train_row", "split_by_id"]

_HASH_KEY = "cvae-split-0001!"
"""16 bytes, fixed forever: the SipHash key of ``pandas.util.hash_array`` (changing it moves rows)."""


def _check_fraction(train_fraction: float) -> None:
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")


def is_train_row(ids: np.ndarray, train_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask, shape (n,): True where the row with that id belongs to the training side.

    The rule: the 64-bit SipHash (fixed key) of the string ``f"{seed}:{id}"`` lies below
    ``train_fraction * 2**64``. Ids are compared as strings, so ``7`` and ``np.int64(7)`` agree.

    Example:
        >>> is_train_row(np.array(["a.npy", "b.npy"]), 1.0).tolist()
        [True, True]
    """
    _check_fraction(train_fraction)
    keys = np.array([f"{seed}:{i}" for i in np.asarray(ids).tolist()], dtype=object)
    if train_fraction >= 1.0:
        return np.ones(len(keys), dtype=bool)
    hashed = pd.util.hash_array(keys, hash_key=_HASH_KEY, categorize=False)
    return hashed < np.uint64(int(train_fraction * 2.0**64))


def _take(batch: dict[str, np.ndarray], fraction: float, seed: int,
          train: bool) -> dict[str, np.ndarray]:
    if "id" not in batch:
        raise ValueError(f"split_by_id needs an 'id' column; the dataset has {sorted(batch)}")
    mask = is_train_row(batch["id"], fraction, seed)
    if not train:
        mask = ~mask
    return {name: values[mask] for name, values in batch.items()}


def split_by_id(dataset: Any, train_fraction: float, *,
                seed: int = 0) -> tuple[Any, Any]:
    """(train, validation) views of ``dataset`` (which needs an ``id`` column).

    A row goes to train iff ``is_train_row`` says so; about ``train_fraction`` of the rows do.
    Both views are lazy: each reads the source when executed (materialize the small one if it
    is iterated often).
    """
    _check_fraction(train_fraction)
    kwargs = {"fraction": train_fraction, "seed": seed}
    train = dataset.map_batches(_take, fn_kwargs={**kwargs, "train": True},
                                batch_format="numpy")
    valid = dataset.map_batches(_take, fn_kwargs={**kwargs, "train": False},
                                batch_format="numpy")
    return train, valid
