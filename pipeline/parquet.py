"""Parquet data sets: features from a tensor/list column or from scalar columns, ids from a column.

``open_parquet`` reads only footers (row counts, schema) and the first row when the schema does
not fix the width; row groups are the units of work, and their global first-row positions (files
in path order) are the default ids, stable whatever the number of workers. ``ParquetReader.read``
reads one row group in slices, so memory does not depend on how large the writer made them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataValidationError, show_id
from pipeline.rows import Chunk, check_ids, check_rows
from pipeline.storage import Location

__all__ = ["ParquetColumns", "ParquetReader", "ParquetSet", "open_parquet"]

logger = logging.getLogger("cvae.data")

ROWS_PER_SLICE = 8192


@dataclass(frozen=True)
class ParquetColumns:
    """Which columns hold the features and the id."""

    column: str | None = None
    columns: tuple[str, ...] | None = None
    id_column: str | None = None

    @property
    def names(self) -> list[str]:
        return ([self.column] if self.column else list(self.columns or ())) + (
            [self.id_column] if self.id_column else [])


def _storage_type(arrow_type: pa.DataType) -> pa.DataType:
    """The physical type behind an extension type (fixed_shape_tensor, Ray's tensor types)."""
    return getattr(arrow_type, "storage_type", arrow_type)


def _is_number(arrow_type: pa.DataType) -> bool:
    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
            or pa.types.is_boolean(arrow_type))


def _is_nested(arrow_type: pa.DataType) -> bool:
    t = _storage_type(arrow_type)
    return pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)


def _null_row(col: pa.Array, ids: np.ndarray) -> str:
    return show_id(ids[int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])])


def _array(table: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    """One column as a single array: a record batch's as it is, a table's chunks joined (a copy
    only when there are several: ``combine_chunks`` copies even a single chunk)."""
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _scalar_matrix(table: pa.Table | pa.RecordBatch, names: tuple[str, ...], where: str,
                   ids: np.ndarray) -> np.ndarray:
    parts = []
    for name in names:
        col = _array(table, name)
        if not _is_number(col.type):
            raise DataValidationError(f"{where}: column {name!r} has type {col.type}; expected numbers")
        if col.null_count:
            raise DataValidationError(f"{where}: column {name!r} is null at row id "
                                      f"{_null_row(col, ids)}")
        parts.append(col.to_numpy().astype(np.float32))
    return np.stack(parts, axis=1)


def feature_matrix(table: pa.Table | pa.RecordBatch, cols: ParquetColumns, where: str,
                   ids: np.ndarray, width: int | None) -> np.ndarray:
    """The features of a parquet slice as float32 (n, d), whatever the column layout.

    ``width`` is the expected number of features (None: take it from the first row). A float32
    tensor or fixed-size-list column without nulls comes back as a zero-copy, read-only view of
    the Arrow buffer (no copy of the features between the parquet decoder and torch).
    """
    if cols.columns:
        return _scalar_matrix(table, cols.columns, where, ids)
    name = cols.column
    col = _array(table, name)
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    if not _is_nested(col.type):
        raise DataValidationError(
            f"{where}: column {name!r} has type {col.type}; expected a fixed_shape_tensor, "
            "fixed_size_list or list of numbers (or pass scalar columns with --columns)")
    if col.null_count:
        raise DataValidationError(f"{where}: column {name!r} is null at row id {_null_row(col, ids)}")
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        found = col.type.list_size
        if width is not None and found != width:
            raise DataValidationError(f"{where}: column {name!r} has {found} features per row, "
                                      f"expected {width} (as in the first file)")
    else:
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        expected = width if width is not None else (int(lengths[0]) if n else 0)
        if n and (lengths != expected).any():
            bad = int(np.flatnonzero(lengths != expected)[0])
            raise DataValidationError(
                f"{where}: column {name!r} holds a list of length {int(lengths[bad])} at row id "
                f"{show_id(ids[bad])}; expected {expected} (as in the first row)")
    values = col.flatten()
    if isinstance(values, pa.ExtensionArray):
        values = values.storage
    while _is_nested(values.type):  # a multi-dimensional tensor stored as nested lists
        values = values.flatten()
    if not _is_number(values.type):
        raise DataValidationError(f"{where}: column {name!r} holds {values.type}; expected numbers")
    if values.null_count:
        raise DataValidationError(f"{where}: column {name!r} has a null element")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1)


@dataclass(frozen=True)
class ParquetReader:
    """Reads items of a parquet set: (file, row group, first-row position) -> Chunks."""

    root: Location
    cols: ParquetColumns
    width: int
    skip: bool

    def _open(self, file: str) -> pq.ParquetFile:
        try:
            parquet = pq.ParquetFile(self.root.filesystem.open_input_file(file))
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataValidationError(f"{file}: not a readable parquet file ({exc})") from exc
        missing = [c for c in self.cols.names if c not in parquet.schema_arrow.names]
        if missing:
            raise DataValidationError(f"{file}: no column {missing[0]!r}; the columns are "
                                      f"{parquet.schema_arrow.names}")
        return parquet

    def read(self, item: dict[str, Any]) -> Iterator[Chunk]:
        file, group, position = str(item["file"]), int(item["row_group"]), int(item["offset"])
        where = f"{file} (row group {group})"
        for piece in self._open(file).iter_batches(batch_size=ROWS_PER_SLICE, row_groups=[group],
                                                   columns=self.cols.names):
            if self.cols.id_column:
                id_col = piece.column(self.cols.id_column)
                ids = (np.asarray(id_col.to_pylist(), dtype=object) if id_col.null_count
                       else id_col.to_numpy(zero_copy_only=False))
                check_ids(ids, where)
            else:
                ids = np.arange(position, position + piece.num_rows, dtype=np.int64)
            position += piece.num_rows
            rows = feature_matrix(piece, self.cols, where, ids, self.width)
            keep, errors = check_rows(rows, ids, where, self.skip)
            if errors:
                ids, rows = ids[keep], rows[keep]
            # All rows kept (the usual case): no boolean-mask copy of the features.
            yield Chunk(ids, rows, None, errors, piece.num_rows)


@dataclass(frozen=True)
class ParquetSet:
    root: Location
    files: Sequence[str]
    """Filesystem paths of the data files, sorted."""
    reader: ParquetReader
    rows: int
    row_groups: list[tuple[str, int, int, int]]
    """(file, row group, first-row position, rows) of every non-empty row group."""

    @property
    def width(self) -> int:
        return self.reader.width

    def items(self) -> list[dict[str, Any]]:
        return [{"index": i, "file": f, "row_group": g, "offset": o, "rows": n}
                for i, (f, g, o, n) in enumerate(self.row_groups)]


def _resolve_columns(schema: pa.Schema, cols: ParquetColumns, first: str) -> ParquetColumns:
    """``cols`` checked against the first file's schema, or the feature columns guessed."""
    missing = [c for c in cols.names if c not in schema.names]
    if missing:
        raise DataValidationError(f"{first}: no column {missing[0]!r}; the columns are {schema.names}")
    for name in cols.columns or ():
        if not _is_number(schema.field(name).type):
            raise DataValidationError(f"{first}: column {name!r} has type "
                                      f"{schema.field(name).type}; expected numbers")
    if cols.column or cols.columns:
        return cols
    # No column named: the single tensor/list column, else the floating-point columns. Integer
    # columns are ids, labels or counts far more often than features: left out, with a warning.
    nested = [f.name for f in schema if _is_nested(f.type)]
    if len(nested) == 1:
        return replace(cols, column=nested[0])
    others = [f for f in schema if f.name != cols.id_column and _is_number(f.type)]
    floats = tuple(f.name for f in others if pa.types.is_floating(f.type))
    if nested or not floats:
        raise DataValidationError(f"{first}: say which column holds the features "
                                  f"(--column NAME or --columns A,B,...); the columns are {schema.names}")
    left_out = [f.name for f in others if not pa.types.is_floating(f.type)]
    if left_out:
        logger.warning("%s: using the %d floating-point columns as features; left out the "
                       "integer/boolean column(s) %s (name them in --columns to use them)",
                       first, len(floats), ", ".join(left_out))
    return replace(cols, columns=floats)


def _width(root: Location, files: Sequence[str], cols: ParquetColumns, schema: pa.Schema) -> int:
    """Features per row: from the schema when it fixes them, else from the first row."""
    if cols.columns:
        return len(cols.columns)
    arrow_type = _storage_type(schema.field(cols.column).type)
    width, fixed = 1, False
    while pa.types.is_fixed_size_list(arrow_type):
        width, fixed = width * arrow_type.list_size, True
        arrow_type = _storage_type(arrow_type.value_type)
    if fixed and _is_number(arrow_type):
        return width
    for file in files:
        parquet = pq.ParquetFile(root.filesystem.open_input_file(file))
        for group in range(parquet.metadata.num_row_groups):
            if parquet.metadata.row_group(group).num_rows:
                sample = parquet.read_row_group(group, columns=[cols.column]).slice(0, 1)
                return int(feature_matrix(sample, cols, file, np.zeros(1, np.int64), None).shape[1])
    raise DataValidationError(f"{root.uri}: the parquet data set has no rows")


def open_parquet(root: Location, files: Sequence[str], cols: ParquetColumns,
                 skip: bool = False) -> ParquetSet:
    """Read the footers of ``files`` (filesystem paths, sorted): a file or a directory's files."""
    if not files:
        raise DataValidationError(f"{root.uri}: no .parquet files found")
    groups, offset = [], 0
    schema = None
    for file in files:
        try:
            meta = pq.ParquetFile(root.filesystem.open_input_file(file)).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataValidationError(f"{file}: not a readable parquet file ({exc})") from exc
        schema = schema or meta.schema.to_arrow_schema()
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if rows:
                groups.append((file, group, offset, rows))
            offset += rows
    if offset == 0:
        raise DataValidationError(f"{root.uri}: the parquet data set has no rows")
    cols = _resolve_columns(schema, cols, files[0])
    reader = ParquetReader(root, cols, _width(root, files, cols, schema), skip)
    return ParquetSet(root, files, reader, offset, groups)
