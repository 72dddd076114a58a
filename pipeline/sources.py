"""Ray Data readers: ``.npy`` trees, parquet data sets and arrays as one kind of dataset.

Every source becomes a Ray Dataset with an ``id`` column and a float32 ``features`` column of
shape (d,) per row (numpy batches are (n, d)); ``.npy`` trees also get a ``label`` (the parent
folder). The driver only lists files and reads parquet footers; rows are read in Ray tasks,
streaming, and validated as they are read: every error names the file, column or row.

``ray.data.read_numpy`` is not used for trees: it splits a (d,) file into d scalar rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DataValidationError",
    "SourceSpec",
    "add_source_arguments",
    "feature_dim",
    "iter_feature_batches",
    "raise_data_errors",
    "read_source",
    "source_from_args",
]

logger = logging.getLogger("cvae.data")

_FILES_PER_BATCH = 256
_ROWS_PER_ARRAY_BLOCK = 8192


class DataValidationError(ValueError):
    """Bad input data; the message names the file, column or row and what was expected."""


_WRAPPED = re.compile(r"DataValidationError: ([^\n]+)")


@contextlib.contextmanager
def raise_data_errors() -> Iterator[None]:
    """Re-raise a ``DataValidationError`` that Ray wrapped in a task error, as itself.

    Ray Data reports a failed read task as ``RayTaskError(UserCodeException)`` whose text holds
    the original error; the user should see only what was wrong with which file or row.
    """
    try:
        yield
    except DataValidationError:
        raise
    except Exception as exc:
        match = _WRAPPED.search(str(exc))
        if match is None:
            raise
        raise DataValidationError(match.group(1).strip()) from None


@dataclass(frozen=True)
class SourceSpec:
    """Where the rows come from and how to read them."""

    path: str
    """A directory tree of ``.npy`` files (one example each), or a parquet file or directory."""
    column: str | None = None
    """Parquet: the features column (fixed_shape_tensor, fixed_size_list or list of numbers)."""
    columns: tuple[str, ...] | None = None
    """Parquet: scalar columns that together form the features."""
    id_column: str | None = None
    """Parquet: the id column; default the row's position (files sorted by path, then rows)."""
    on_nonfinite: Literal["error", "skip"] = "error"
    """NaN/inf in a row: fail naming it, or drop the row (logged with its id)."""

    def __post_init__(self) -> None:
        if self.column is not None and self.columns is not None:
            raise ValueError("Give either column (one tensor/list column) or columns (scalar "
                             "columns), not both")
        if self.on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {self.on_nonfinite!r}")


# ---------------------------------------------------------------------------- row checks
_TALLY_NAME = "cvae_nonfinite_tally"


class _NonfiniteTally:
    """A zero-CPU Ray actor counting rows dropped by ``on_nonfinite="skip"`` (all datasets)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> int:
        self.rows += rows
        return self.rows

    def total(self) -> int:
        return self.rows


def _start_tally() -> None:
    """Create the tally actor in the driver (idempotent); only sources that skip rows need it."""
    import ray

    ray.remote(num_cpus=0)(_NonfiniteTally).options(
        name=_TALLY_NAME, get_if_exists=True).remote()


def skipped_nonfinite_rows() -> int:
    """Rows dropped so far by ``on_nonfinite="skip"`` in this Ray job, over every execution.

    ``pipeline.stats.compute_stats`` reports the difference over its own pass.
    """
    import ray

    try:
        tally = ray.get_actor(_TALLY_NAME)
    except ValueError:
        return 0
    return int(ray.get(tally.total.remote()))


def _check_rows(features: np.ndarray, ids: np.ndarray, where: str,
                on_nonfinite: str) -> np.ndarray:
    """Boolean mask of rows to keep; raises on non-finite rows unless skipping."""
    finite = np.isfinite(features).all(axis=1)
    if finite.all():
        return finite
    bad = ids[~finite]
    if on_nonfinite == "error":
        raise DataValidationError(
            f"{where}: row id {bad[0]!r} contains NaN or infinity ({len(bad)} such row(s) in "
            "this block); fix the data or pass on_nonfinite='skip' (--on-nonfinite skip)")
    logger.warning("%s: skipped %d row(s) with NaN or infinity: %s", where, len(bad),
                   ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else ""))
    import ray

    # Blocking on purpose: the count must be in before this block reaches the consumer.
    ray.get(ray.get_actor(_TALLY_NAME).add.remote(int(len(bad))))
    return finite


# ---------------------------------------------------------------------------- .npy trees
def load_npy_file(path: Path, expected_shape: tuple[int, ...] | None = None,
                  reference: str = "") -> np.ndarray:
    """One example from a ``.npy`` file as float32 (d,), validated; never unpickles."""
    try:
        with open(path, "rb") as f:
            array = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataValidationError(f"{path}: holds a pickled (object) array; cvae never "
                                      "loads pickles. Save plain numeric arrays.") from exc
        raise DataValidationError(f"{path}: corrupt or truncated .npy file ({exc})") from exc
    except (EOFError, OSError) as exc:
        raise DataValidationError(f"{path}: corrupt or truncated .npy file ({exc})") from exc
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.number)
                                                 or array.dtype == np.bool_):
        raise DataValidationError(f"{path}: dtype {getattr(array, 'dtype', type(array))} is not "
                                  "numeric")
    if expected_shape is not None and array.shape != expected_shape:
        raise DataValidationError(f"{path}: shape {array.shape}, expected {expected_shape} (the "
                                  f"shape of the first file, {reference})")
    if array.ndim != 1:
        raise DataValidationError(f"{path}: shape {array.shape}; each .npy file must hold one "
                                  "example, a 1-D array of features")
    return array.astype(np.float32, copy=False)


class _NpyTreeReader:
    """map_batches function: relative paths -> id, label, features."""

    def __init__(self, root: str, expected_shape: tuple[int, ...], reference: str,
                 on_nonfinite: str) -> None:
        self.root = Path(root)
        self.expected_shape = expected_shape
        self.reference = reference
        self.on_nonfinite = on_nonfinite

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rel = batch["path"]
        rows = np.stack([load_npy_file(self.root / p, self.expected_shape, self.reference)
                         for p in rel])
        ids = np.asarray(rel, dtype=object)
        keep = _check_rows(rows, ids, str(self.root), self.on_nonfinite)
        labels = np.array([os.path.dirname(p).replace(os.sep, "/") for p in rel], dtype=object)
        return {"id": ids[keep], "label": labels[keep], "features": rows[keep]}


def _list_npy(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*.npy")
                  if p.is_file())


def _read_npy_tree(root: Path, spec: SourceSpec) -> Any:
    import ray

    files = _list_npy(root)
    if not files:
        raise DataValidationError(f"{root}: no .npy files found in this directory tree")
    first = root / files[0]
    shape = load_npy_file(first).shape
    blocks = max(1, min(256, len(files) // _FILES_PER_BATCH))
    items = ray.data.from_items([{"path": p} for p in files], override_num_blocks=blocks)
    # An instance, not the class: a plain task per batch (a class would start actors that hold
    # CPUs for the whole run).
    reader = _NpyTreeReader(str(root), shape, str(first), spec.on_nonfinite)
    return items.map_batches(reader, batch_size=_FILES_PER_BATCH, batch_format="numpy")


# ---------------------------------------------------------------------------- parquet
def _feature_matrix(table: pa.Table, spec: SourceSpec, where: str, ids: np.ndarray) -> np.ndarray:
    """The features of a parquet slice as float32 (n, d), whatever the column layout."""
    if spec.columns:
        parts = []
        for name in spec.columns:
            col = table.column(name)
            if col.null_count:
                row = ids[np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]]
                raise DataValidationError(f"{where}: column {name!r} is null at row id {_show(row)}")
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                    or pa.types.is_boolean(col.type)):
                raise DataValidationError(f"{where}: column {name!r} has type {col.type}; "
                                          "expected numbers")
            parts.append(col.to_numpy().astype(np.float32))
        return np.stack(parts, axis=1) if parts else np.zeros((table.num_rows, 0), np.float32)
    assert spec.column is not None
    col = table.column(spec.column).combine_chunks()
    if col.null_count:
        row = ids[np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]]
        raise DataValidationError(f"{where}: column {spec.column!r} is null at row id {_show(row)}")
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        values = col.flatten()
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else 0
        if n and (lengths != width).any():
            bad = int(np.flatnonzero(lengths != width)[0])
            raise DataValidationError(
                f"{where}: column {spec.column!r} has a list of length {int(lengths[bad])} at "
                f"row id {_show(ids[bad])}; expected {width} (the length of the slice's first row)")
        values = col.flatten()
    else:
        raise DataValidationError(
            f"{where}: column {spec.column!r} has type {col.type}; expected a fixed_shape_tensor, "
            "fixed_size_list or list of numbers (or pass scalar columns with --columns)")
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise DataValidationError(f"{where}: column {spec.column!r} holds {values.type}; "
                                  "expected numbers")
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, width)


class _ParquetReader:
    """map_batches function: (file, row group, first row position) -> id, features."""

    def __init__(self, spec: SourceSpec, width: int) -> None:
        self.spec = spec
        self.width = width

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out_ids, out_rows = [], []
        for file, group, offset in zip(batch["file"], batch["row_group"], batch["offset"],
                                       strict=True):
            table = pq.ParquetFile(file).read_row_group(int(group))
            where = f"{file} (row group {int(group)})"
            if self.spec.id_column:
                ids = table.column(self.spec.id_column).to_numpy(zero_copy_only=False)
            else:
                ids = np.arange(int(offset), int(offset) + table.num_rows, dtype=np.int64)
            rows = _feature_matrix(table, self.spec, where, ids)
            if rows.shape[1] != self.width:
                raise DataValidationError(f"{where}: {rows.shape[1]} features per row, expected "
                                          f"{self.width} (as in the first file)")
            keep = _check_rows(rows, ids, where, self.spec.on_nonfinite)
            out_ids.append(ids[keep])
            out_rows.append(rows[keep])
        return {"id": np.concatenate(out_ids), "features": np.concatenate(out_rows)}


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not
                   any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise DataValidationError(f"{path}: no .parquet files found")
    return files


def _resolve_columns(files: list[Path], spec: SourceSpec) -> SourceSpec:
    schema = pq.read_schema(files[0])
    names = schema.names
    wanted = ([spec.column] if spec.column else []) + list(spec.columns or []) + (
        [spec.id_column] if spec.id_column else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataValidationError(f"{files[0]}: no column {missing[0]!r}; the columns are "
                                  f"{names}")
    if spec.column or spec.columns:
        return spec
    # No column named: a single tensor/list column, else every numeric column but the id.
    nested = [f.name for f in schema if pa.types.is_fixed_size_list(getattr(f.type, "storage_type", f.type))
              or pa.types.is_list(getattr(f.type, "storage_type", f.type))
              or pa.types.is_large_list(getattr(f.type, "storage_type", f.type))]
    if len(nested) == 1:
        return SourceSpec(spec.path, nested[0], None, spec.id_column, spec.on_nonfinite)
    scalars = tuple(f.name for f in schema if f.name != spec.id_column and
                    (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)))
    if nested or not scalars:
        raise DataValidationError(f"{files[0]}: say which column holds the features "
                                  f"(--column NAME or --columns A,B,...); the columns are {names}")
    return SourceSpec(spec.path, None, scalars, spec.id_column, spec.on_nonfinite)


def _read_parquet(path: Path, spec: SourceSpec) -> Any:
    import ray

    files = _parquet_files(path)
    spec = _resolve_columns(files, spec)
    items, offset = [], 0
    for file in files:
        meta = pq.ParquetFile(file).metadata
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if rows:
                items.append({"file": str(file), "row_group": group, "offset": offset})
            offset += rows
    if offset == 0:
        raise DataValidationError(f"{path}: the parquet data set has no rows")
    first = pq.ParquetFile(files[0])
    group = next(g for g in range(first.metadata.num_row_groups)
                 if first.metadata.row_group(g).num_rows)
    sample = first.read_row_group(group).slice(0, 1)
    width = _feature_matrix(sample, spec, str(files[0]), np.zeros(1, np.int64)).shape[1]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 256)))
    return dataset.map_batches(_ParquetReader(spec, width), batch_size=1, batch_format="numpy")


# ---------------------------------------------------------------------------- arrays
def _read_array(data: np.ndarray, ids: np.ndarray | None) -> Any:
    import ray

    from cvae_model.validation import check_features

    features = check_features(data, "X")
    ids = np.arange(len(features), dtype=np.int64) if ids is None else np.asarray(ids)
    if len(ids) != len(features):
        raise ValueError(f"ids has {len(ids)} entries but X has {len(features)} rows")
    tables = [pa.table({"id": ids[s:s + _ROWS_PER_ARRAY_BLOCK],
                        "features": pa.FixedShapeTensorArray.from_numpy_ndarray(
                            np.ascontiguousarray(features[s:s + _ROWS_PER_ARRAY_BLOCK]))})
              for s in range(0, len(features), _ROWS_PER_ARRAY_BLOCK)]
    return ray.data.from_arrow(tables)


# ---------------------------------------------------------------------------- public
def _as_path(spec: SourceSpec) -> Path:
    path = Path(os.path.expanduser(spec.path))
    if not path.exists():
        raise FileNotFoundError(f"No such file or directory: {path.resolve()}")
    return path


def _is_parquet(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    return next(path.rglob("*.parquet"), None) is not None


def read_source(source: SourceSpec | np.ndarray, *, ids: np.ndarray | None = None) -> Any:
    """A Ray Dataset with ``id`` and float32 ``features`` (d,) columns (plus ``label`` for trees).

    ``source`` is a ``SourceSpec`` (a ``.npy`` tree or parquet) or an in-memory array (ids are
    row positions unless given). Reading is lazy and streaming; validation errors surface as
    ``DataValidationError`` when the dataset executes.
    """
    if not isinstance(source, SourceSpec):
        return _read_array(np.asarray(source), ids)
    path = _as_path(source)
    if _is_parquet(path):
        return _read_parquet(path, source)
    if path.is_file():
        raise DataValidationError(f"{path}: expected a directory tree of .npy files or parquet "
                                  "data; a single file must be .parquet")
    return _read_npy_tree(path, source)


def feature_dim(source: SourceSpec | np.ndarray) -> int:
    """The number of features, from the first file (cheap)."""
    if not isinstance(source, SourceSpec):
        return int(np.asarray(source).shape[1])
    path = _as_path(source)
    if _is_parquet(path):
        files = _parquet_files(path)
        spec = _resolve_columns(files, source)
        sample = pq.ParquetFile(files[0]).read_row_group(0).slice(0, 1)
        return int(_feature_matrix(sample, spec, str(files[0]), np.zeros(1, np.int64)).shape[1])
    files = _list_npy(path)
    if not files:
        raise DataValidationError(f"{path}: no .npy files found in this directory tree")
    return int(load_npy_file(path / files[0]).shape[0])


def iter_feature_batches(dataset: Any, batch_size: int, *, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """float32 (b, d) batches of ``dataset`` in an order shuffled per (seed, epoch); the last batch
    may be smaller. Blocks are visited in a random order and rows mixed in a local buffer, so the
    data set is never held whole."""
    shuffled = dataset.randomize_block_order(seed=(seed * 1_000_003 + epoch) % (2**31))
    with raise_data_errors():
        for batch in shuffled.iter_batches(batch_size=batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=max(8 * batch_size, 4096),
                                           local_shuffle_seed=(seed + epoch) % (2**31)):
            yield np.asarray(batch["features"], dtype=np.float32)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The source flags every job takes."""
    group = parser.add_argument_group("data source")
    group.add_argument("--data", required=True, metavar="PATH",
                       help="a directory tree of .npy files, or a parquet file or directory")
    group.add_argument("--column", default=None, help="parquet: the features column")
    group.add_argument("--columns", default=None, metavar="A,B,...",
                       help="parquet: scalar columns forming the features")
    group.add_argument("--id-column", default=None, help="parquet: the id column (default: row position)")
    group.add_argument("--on-nonfinite", choices=["error", "skip"], default="error",
                       help="rows with NaN/inf: fail naming them, or drop them (default: error)")


def source_from_args(args: argparse.Namespace) -> SourceSpec:
    columns = tuple(c.strip() for c in args.columns.split(",") if c.strip()) if args.columns else None
    return SourceSpec(path=args.data, column=args.column, columns=columns,
                      id_column=args.id_column, on_nonfinite=args.on_nonfinite)
