"""Train/validation split by a stable hash of each row's id.

A row's side depends only on (seed, id): not on the run, the process, the number of workers or
how rows are grouped into blocks, so the split of a growing data set stays put for old rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["is_train_row", "split_by_id"]

_HASH_KEY = "cvae-split-0001!"  # 16 bytes, fixed: pandas' siphash key


def is_train_row(ids: np.ndarray, train_fraction: float, seed: int = 0) -> np.ndarray:
    """True where the 64-bit hash of ``f"{seed}:{id}"`` falls below ``train_fraction``."""
    keys = np.array([f"{seed}:{i}" for i in np.asarray(ids).tolist()], dtype=object)
    hashed = pd.util.hash_array(keys, hash_key=_HASH_KEY, categorize=False)
    return (hashed.astype(np.float64) / 2.0**64) < train_fraction


def _take(batch: dict[str, np.ndarray], fraction: float, seed: int,
          train: bool) -> dict[str, np.ndarray]:
    mask = is_train_row(batch["id"], fraction, seed)
    if not train:
        mask = ~mask
    return {name: values[mask] for name, values in batch.items()}


def split_by_id(dataset: Any, train_fraction: float, *, seed: int = 0) -> tuple[Any, Any]:
    """(train, validation) datasets; ``train_fraction`` of the ids, in expectation, train."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    train = dataset.map_batches(_take, fn_kwargs={"fraction": train_fraction, "seed": seed,
                                                  "train": True}, batch_format="numpy")
    valid = dataset.map_batches(_take, fn_kwargs={"fraction": train_fraction, "seed": seed,
                                                  "train": False}, batch_format="numpy")
    return train, valid
