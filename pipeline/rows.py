"""What every reader hands on: a ``Chunk`` of rows, checked the same way whatever the format."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import DataValidationError, show_id

__all__ = ["Chunk", "check_ids", "check_rows"]

logger = logging.getLogger("cvae.data")


@dataclass
class Chunk:
    """Rows read from one unit of work (a run of files, a slice of a row group)."""

    ids: np.ndarray
    """One id per row: a file's path relative to the tree, a parquet id column or position."""
    features: np.ndarray
    """float32, shape (n, d)."""
    labels: np.ndarray | None = None
    """A tree file's folder (relative path), else None."""
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(id, reason) of files or rows skipped by a reader in skip mode."""
    rows_in: int = 0
    """Rows (or files) this chunk covered, kept or skipped."""


def check_ids(ids: np.ndarray, where: str) -> None:
    """Refuse null ids (an output row must be traceable to its input)."""
    if ids.dtype == object:
        nulls = [i for i, value in enumerate(ids) if value is None or value != value]
        if nulls:
            raise DataValidationError(f"{where}: the id of row {nulls[0]} in this block is null "
                                      f"({len(nulls)} null id(s)); every row needs an id")


def check_rows(features: np.ndarray, ids: np.ndarray, where: str,
               skip: bool) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(mask of rows to keep, errors of the rows dropped); raises on NaN/inf unless ``skip``."""
    finite = np.isfinite(features).all(axis=1)
    if finite.all():
        return finite, []
    bad = ids[~finite]
    if not skip:
        raise DataValidationError(
            f"{where}: row id {show_id(bad[0])} contains NaN or infinity ({len(bad)} such row(s) "
            "in this block); fix the data or pass on_error='skip' (--on-error skip)")
    logger.warning("%s: skipped %d row(s) with NaN or infinity: %s", where, len(bad),
                   ", ".join(map(show_id, bad[:10])) + (" ..." if len(bad) > 10 else ""))
    return finite, [(str(i), f"{where}: contains NaN or infinity") for i in bad]
