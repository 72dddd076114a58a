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
    "load_npy_file",
    "raise_data_errors",
    "skipped_nonfinite_rows",
    "read_source",
    "source_from_args",
]

logger = logging.getLogger("cvae.data")

_FILES_PER_BATCH = 256
_FILES_PER_TASK = 2048
"""Each read task pays ~10 ms of Ray overhead: ~2k files (~6 MB at 784 float32) per task."""
_ROWS_PER_ARRAY_BLOCK = 8192
_ROWS_PER_SLICE = 8192
_TARGET_BLOCK_BYTES = 16 * 2**20
"""Ray Data's default (128 MiB) made a worker of the statistics pass buffer ~800 MB; 16 MiB keeps
peak memory flat in the number of rows (benchmarks/ingest.py) and costs no throughput."""


READ_TASK_CPUS = 0.5
"""CPUs a read task asks for. Less than a whole CPU, so reads still fit on a node where
inference actors or training workers hold fractions of every CPU (with whole-CPU reads, two
half-CPU actors on two 1-CPU nodes leave no node able to run a read: the job hangs)."""


class DataValidationError(ValueError):
    """Bad input data; the message names the file, column or row and what was expected."""


_WRAPPED = re.compile(r"DataValidationError: ([^\n]+)")


def _find_data_error(exc: BaseException) -> DataValidationError | None:
    """The ``DataValidationError`` inside a Ray task error, by its cause chain or its text."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DataValidationError):
            return DataValidationError(str(current).strip())
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    match = _WRAPPED.search(str(exc))
    return None if match is None else DataValidationError(match.group(1).strip())


@contextlib.contextmanager
def raise_data_errors() -> Iterator[None]:
    """Re-raise a ``DataValidationError`` that Ray wrapped in a task error, as itself.

    Ray Data reports a failed read task as ``RayTaskError(UserCodeException)`` whose text holds
    the original error among Ray's own lines; the user should see only what was wrong with
    which file, column or row. Other errors pass through unchanged.

    Example:
        >>> with raise_data_errors():  # doctest: +SKIP
        ...     read_source(SourceSpec("data/")).materialize()
    """
    try:
        yield
    except DataValidationError:
        raise
    except Exception as exc:
        error = _find_data_error(exc)
        if error is None:
            raise
        raise error from None


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
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))  # a list would do too
            if not self.columns:
                raise ValueError("columns is empty; give the scalar feature columns, or None")
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


def _start_tally() -> Any:
    """The tally actor's handle, created in the driver on first use.

    Readers that skip rows hold the handle, which keeps the (non-detached) actor alive as long
    as a dataset that can skip rows exists.
    """
    import ray

    return ray.remote(num_cpus=0)(_NonfiniteTally).options(
        name=_TALLY_NAME, get_if_exists=True).remote()


def _tally_for(spec: SourceSpec) -> Any:
    return _start_tally() if spec.on_nonfinite == "skip" else None


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


def _show(row_id: object) -> str:
    """An id as the user wrote it: ``7`` or ``'a/b.npy'``, not ``np.int64(7)``."""
    return repr(row_id.item() if isinstance(row_id, np.generic) else row_id)


def _check_rows(features: np.ndarray, ids: np.ndarray, where: str,
                tally: Any) -> np.ndarray:
    """Boolean mask of rows to keep; raises on non-finite rows unless skipping (``tally``)."""
    finite = np.isfinite(features).all(axis=1)
    if finite.all():
        return finite
    bad = ids[~finite]
    if tally is None:
        raise DataValidationError(
            f"{where}: row id {_show(bad[0])} contains NaN or infinity ({len(bad)} such row(s) in "
            "this block); fix the data or pass on_nonfinite='skip' (--on-nonfinite skip)")
    logger.warning("%s: skipped %d row(s) with NaN or infinity: %s", where, len(bad),
                   ", ".join(map(_show, bad[:10])) + (" ..." if len(bad) > 10 else ""))
    import ray

    # Blocking on purpose: the count must be in before this block reaches the consumer.
    ray.get(tally.add.remote(int(len(bad))))
    return finite


def _small_blocks(dataset: Any) -> Any:
    """``dataset`` with this dataset's own (inherited, not global) target block size lowered."""
    dataset.context.target_max_block_size = _TARGET_BLOCK_BYTES
    return dataset


# ---------------------------------------------------------------------------- .npy trees
def _is_numeric(dtype: np.dtype) -> bool:
    return (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
            or dtype == np.bool_)


def load_npy_file(path: Path, expected: tuple[tuple[int, ...], np.dtype] | None = None,
                  reference: str = "") -> np.ndarray:
    """One example from a ``.npy`` file as float32 (d,), validated; never unpickles.

    ``expected`` is the (shape, dtype) of the first file, named by ``reference``.
    """
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
    if not isinstance(array, np.ndarray):
        raise DataValidationError(f"{path}: holds an .npz archive or other non-array data; "
                                  "expected one .npy array per file")
    if not _is_numeric(array.dtype):
        raise DataValidationError(f"{path}: dtype {array.dtype} is not numeric; expected "
                                  "integers or floats")
    if expected is not None and (array.shape, array.dtype) != expected:
        raise DataValidationError(
            f"{path}: shape {array.shape} dtype {array.dtype}, expected shape {expected[0]} "
            f"dtype {expected[1]} (as the first file, {reference})")
    if array.ndim != 1:
        raise DataValidationError(f"{path}: shape {array.shape}; each .npy file must hold one "
                                  "example, a 1-D array of features")
    return array.astype(np.float32, copy=False)


class _NpyTreeReader:
    """map_batches function: relative paths -> id, label, features."""

    def __init__(self, root: str, expected: tuple[tuple[int, ...], np.dtype], reference: str,
                 tally: Any) -> None:
        self.root = Path(root)
        self.expected = expected
        self.reference = reference
        self.tally = tally

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rel = [str(p) for p in batch["path"]]
        rows = np.stack([load_npy_file(self.root / p, self.expected, self.reference)
                         for p in rel])
        ids = np.asarray(rel, dtype=object)
        keep = _check_rows(rows, ids, str(self.root), self.tally)
        labels = np.array([p.rpartition("/")[0] for p in rel], dtype=object)
        return {"id": ids[keep], "label": labels[keep], "features": rows[keep]}


def _list_npy(root: Path) -> list[str]:
    """Paths of the ``.npy`` files under ``root``, relative with '/' separators, sorted."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.npy") if p.is_file())
    if not files:
        raise DataValidationError(f"{root}: no .npy files found in this directory tree")
    return files


def _first_npy(root: Path, files: list[str]) -> tuple[Path, tuple[tuple[int, ...], np.dtype]]:
    """The first file and its (shape, dtype), which every other file must match."""
    first = root / files[0]
    with open(first, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = reader(f)
        except ValueError as exc:
            raise DataValidationError(f"{first}: corrupt .npy header ({exc})") from exc
    load_npy_file(first)  # the full set of checks, on the file every other is compared with
    return first, (tuple(shape), np.dtype(dtype))


def _read_npy_tree(root: Path, spec: SourceSpec) -> Any:
    import ray

    files = _list_npy(root)
    first, expected = _first_npy(root, files)
    blocks = max(1, -(-len(files) // _FILES_PER_TASK))
    items = ray.data.from_items([{"path": p} for p in files], override_num_blocks=blocks)
    # An instance, not the class: a plain task per batch (a class would start actors that hold
    # CPUs for the whole run and starve the reads on a small machine).
    reader = _NpyTreeReader(str(root), expected, str(first), _tally_for(spec))
    return _small_blocks(items.map_batches(reader, batch_size=_FILES_PER_BATCH,
                                           batch_format="numpy", num_cpus=READ_TASK_CPUS))


# ---------------------------------------------------------------------------- parquet
def _storage_type(arrow_type: pa.DataType) -> pa.DataType:
    """The physical type behind an extension type (fixed_shape_tensor, Ray's tensor types)."""
    return getattr(arrow_type, "storage_type", arrow_type)


def _is_number(arrow_type: pa.DataType) -> bool:
    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
            or pa.types.is_boolean(arrow_type))


def _is_nested(arrow_type: pa.DataType) -> bool:
    t = _storage_type(arrow_type)
    return pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)


def _null_row(col: pa.ChunkedArray | pa.Array, ids: np.ndarray) -> str:
    return _show(ids[int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])])


def _feature_matrix(table: pa.Table, spec: SourceSpec, where: str, ids: np.ndarray,
                    width: int | None) -> np.ndarray:
    """The features of a parquet slice as float32 (n, d), whatever the column layout.

    ``width`` is the expected number of features (None: take it from the first row).
    """
    if spec.columns:
        parts = []
        for name in spec.columns:
            col = table.column(name)
            if not _is_number(col.type):
                raise DataValidationError(f"{where}: column {name!r} has type {col.type}; "
                                          "expected numbers")
            if col.null_count:
                raise DataValidationError(f"{where}: column {name!r} is null at row id "
                                          f"{_null_row(col, ids)}")
            parts.append(col.to_numpy().astype(np.float32))
        return np.stack(parts, axis=1)
    assert spec.column is not None
    col = table.column(spec.column).combine_chunks()
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    if not _is_nested(col.type):
        raise DataValidationError(
            f"{where}: column {spec.column!r} has type {col.type}; expected a fixed_shape_tensor, "
            "fixed_size_list or list of numbers (or pass scalar columns with --columns)")
    if col.null_count:
        raise DataValidationError(f"{where}: column {spec.column!r} is null at row id "
                                  f"{_null_row(col, ids)}")
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        found = col.type.list_size
        if width is not None and found != width:
            raise DataValidationError(f"{where}: column {spec.column!r} has {found} features "
                                      f"per row, expected {width} (as in the first file)")
    else:
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        expected = width if width is not None else (int(lengths[0]) if n else 0)
        if n and (lengths != expected).any():
            bad = int(np.flatnonzero(lengths != expected)[0])
            raise DataValidationError(
                f"{where}: column {spec.column!r} holds a list of length {int(lengths[bad])} at "
                f"row id {_show(ids[bad])}; expected {expected} (as in the first row)")
        found = expected
    values = col.flatten()
    if isinstance(values, pa.ExtensionArray):
        values = values.storage
    while _is_nested(values.type):  # a multi-dimensional tensor stored as nested lists
        values = values.flatten()
    if not _is_number(values.type):
        raise DataValidationError(f"{where}: column {spec.column!r} holds {values.type}; "
                                  "expected numbers")
    if values.null_count:
        raise DataValidationError(f"{where}: column {spec.column!r} has a null element")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1 if n else found)


class _ParquetReader:
    """map_batches function: (file, row group, first row position) -> id, features."""

    def __init__(self, spec: SourceSpec, width: int, tally: Any) -> None:
        self.spec = spec
        self.width = width
        self.tally = tally
        self.columns = ([spec.column] if spec.column else list(spec.columns or [])) + (
            [spec.id_column] if spec.id_column else [])

    def _open(self, file: str) -> pq.ParquetFile:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise DataValidationError(f"{file}: no column {missing[0]!r}; the columns are {names}")
        return parquet

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        # A generator of slices: a worker holds one slice of a row group at a time, so its
        # memory does not depend on how large the writer made the row groups.
        for file, group, offset in zip(batch["file"], batch["row_group"], batch["offset"],
                                       strict=True):
            where = f"{file} (row group {int(group)})"
            position = int(offset)
            for piece in self._open(str(file)).iter_batches(
                    batch_size=_ROWS_PER_SLICE, row_groups=[int(group)], columns=self.columns):
                table = pa.Table.from_batches([piece])
                if self.spec.id_column:
                    ids = table.column(self.spec.id_column).to_numpy(zero_copy_only=False)
                else:
                    ids = np.arange(position, position + table.num_rows, dtype=np.int64)
                position += table.num_rows
                rows = _feature_matrix(table, self.spec, where, ids, self.width)
                keep = _check_rows(rows, ids, where, self.tally)
                yield {"id": ids[keep], "features": rows[keep]}


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not
                   any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise DataValidationError(f"{path}: no .parquet files found")
    return files


def _resolve_columns(files: list[Path], spec: SourceSpec) -> SourceSpec:
    """``spec`` with its feature column(s) checked against the first file, or guessed."""
    schema = pq.read_schema(files[0])
    names = schema.names
    wanted = ([spec.column] if spec.column else []) + list(spec.columns or []) + (
        [spec.id_column] if spec.id_column else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataValidationError(f"{files[0]}: no column {missing[0]!r}; the columns are "
                                  f"{names}")
    for name in spec.columns or ():
        if not _is_number(schema.field(name).type):
            raise DataValidationError(f"{files[0]}: column {name!r} has type "
                                      f"{schema.field(name).type}; expected numbers")
    if spec.column or spec.columns:
        return spec
    # No column named: the single tensor/list column, else every numeric column but the id.
    nested = [f.name for f in schema if _is_nested(f.type)]
    if len(nested) == 1:
        return SourceSpec(spec.path, nested[0], None, spec.id_column, spec.on_nonfinite)
    scalars = tuple(f.name for f in schema if f.name != spec.id_column and _is_number(f.type))
    if nested or not scalars:
        raise DataValidationError(f"{files[0]}: say which column holds the features "
                                  f"(--column NAME or --columns A,B,...); the columns are {names}")
    return SourceSpec(spec.path, None, scalars, spec.id_column, spec.on_nonfinite)


def _parquet_width(files: list[Path], spec: SourceSpec) -> int:
    """Features per row: from the schema when it fixes them, else from the first row."""
    if spec.columns:
        return len(spec.columns)
    arrow_type = _storage_type(pq.read_schema(files[0]).field(spec.column).type)
    width, fixed = 1, False
    while pa.types.is_fixed_size_list(arrow_type):
        width, fixed = width * arrow_type.list_size, True
        arrow_type = _storage_type(arrow_type.value_type)
    if fixed and _is_number(arrow_type):
        return width
    for file in files:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.metadata.num_row_groups):
            if parquet.metadata.row_group(group).num_rows:
                sample = parquet.read_row_group(group, columns=[spec.column]).slice(0, 1)
                return int(_feature_matrix(sample, spec, str(file), np.zeros(1, np.int64),
                                           None).shape[1])
    raise DataValidationError(f"{spec.path}: the parquet data set has no rows")


def _read_parquet(path: Path, spec: SourceSpec) -> Any:
    import ray

    files = _parquet_files(path)
    spec = _resolve_columns(files, spec)
    # Row groups are the unit of work; their global first-row positions (files in path order)
    # are the default ids, stable whatever the number of workers or blocks.
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
    width = _parquet_width(files, spec)
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 256)))
    return _small_blocks(dataset.map_batches(_ParquetReader(spec, width, _tally_for(spec)),
                                             batch_size=1, batch_format="numpy",
                                             num_cpus=READ_TASK_CPUS))


# ---------------------------------------------------------------------------- arrays
def _read_array(data: np.ndarray, ids: np.ndarray | None) -> Any:
    import ray

    from cvae_model.validation import check_features

    features = check_features(data, "X")
    ids = np.arange(len(features), dtype=np.int64) if ids is None else np.asarray(ids)
    if ids.shape != (len(features),):
        raise ValueError(f"ids has shape {ids.shape} but X has {len(features)} rows; expected "
                         f"shape ({len(features)},)")
    tables = [pa.table({"id": ids[s:s + _ROWS_PER_ARRAY_BLOCK],
                        "features": pa.FixedShapeTensorArray.from_numpy_ndarray(
                            np.ascontiguousarray(features[s:s + _ROWS_PER_ARRAY_BLOCK]))})
              for s in range(0, len(features), _ROWS_PER_ARRAY_BLOCK)]
    if not tables:
        raise DataValidationError("X has no rows")
    return ray.data.from_arrow(tables)


# ---------------------------------------------------------------------------- public
def _as_path(spec: SourceSpec) -> Path:
    path = Path(os.path.expanduser(spec.path))
    if not path.exists():
        raise FileNotFoundError(f"No such file or directory: {path.absolute()} (the data path)")
    return path


def _is_parquet(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    return next(path.rglob("*.parquet"), None) is not None


def read_source(source: SourceSpec | np.ndarray, *, ids: np.ndarray | None = None) -> Any:
    """A Ray Dataset with ``id`` and float32 ``features`` (d,) columns (plus ``label`` for trees).

    Args:
        source: a ``SourceSpec`` (a ``.npy`` tree or parquet), or an in-memory array of shape
            (n, d).
        ids: for arrays only, one id per row (default: the row index, int64).

    Reading is lazy and streaming: the driver lists files (and parquet footers) and checks the
    first one; rows are read and validated in Ray tasks. Validation errors surface as
    ``DataValidationError`` (wrapped by Ray unless run inside ``raise_data_errors()`` or through
    ``compute_stats``/``iter_feature_batches``).

    Example:
        >>> ds = read_source(SourceSpec("~/mnist_npy"))  # doctest: +SKIP
        >>> ds.take_batch(2, batch_format="numpy")["features"].shape  # doctest: +SKIP
        (2, 784)
    """
    if not isinstance(source, SourceSpec):
        if ids is not None and not isinstance(source, np.ndarray):
            raise TypeError("ids= is only for in-memory arrays")
        return _read_array(np.asarray(source), ids)
    if ids is not None:
        raise TypeError("ids= is only for in-memory arrays; for parquet pass "
                        "SourceSpec(id_column=...)")
    path = _as_path(source)
    if _is_parquet(path):
        return _read_parquet(path, source)
    if path.is_file():
        raise DataValidationError(f"{path}: expected a directory tree of .npy files or parquet "
                                  "data; a single file must be .parquet")
    return _read_npy_tree(path, source)


def feature_dim(source: SourceSpec | np.ndarray) -> int:
    """The number of features, from the first file or the parquet schema and first row."""
    if not isinstance(source, SourceSpec):
        return int(np.asarray(source).shape[1])
    path = _as_path(source)
    if _is_parquet(path):
        files = _parquet_files(path)
        return _parquet_width(files, _resolve_columns(files, source))
    if path.is_file():
        raise DataValidationError(f"{path}: expected a directory tree of .npy files or parquet "
                                  "data; a single file must be .parquet")
    root_files = _list_npy(path)
    return int(_first_npy(path, root_files)[1][0][0])


def _derived_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0] % 2**31)


def iter_feature_batches(dataset: Any, batch_size: int, *, seed: int,
                         epoch: int) -> Iterator[np.ndarray]:
    """float32 (b, d) batches of the ``features`` column, shuffled per (seed, epoch).

    Every row is yielded once per call; the last batch may be smaller. Blocks are visited in an
    order drawn from (seed, epoch) and rows are mixed in a local buffer of ``max(8 * batch_size,
    4096)`` rows. The order is reproducible for a materialized dataset. Block randomization is
    a barrier: an unmaterialized dataset is read whole into Ray's object store (spilling to
    disk when it is larger) before the first batch, so call ``dataset.materialize()`` once
    when it fits and iterate over it each epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shuffled = dataset.select_columns(["features"]).randomize_block_order(
        seed=_derived_seed(seed, epoch, 0))
    with raise_data_errors():
        for batch in shuffled.iter_batches(batch_size=batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=max(8 * batch_size, 4096),
                                           local_shuffle_seed=_derived_seed(seed, epoch, 1)):
            yield np.asarray(batch["features"], dtype=np.float32)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the data-source flags every job takes (``--data`` and the parquet options)."""
    group = parser.add_argument_group("data source")
    group.add_argument("--data", required=True, metavar="PATH",
                       help="a directory tree of .npy files, or a parquet file or directory")
    group.add_argument("--column", default=None, help="parquet: the features column")
    group.add_argument("--columns", default=None, metavar="A,B,...",
                       help="parquet: scalar columns forming the features")
    group.add_argument("--id-column", default=None,
                       help="parquet: the id column (default: the row's position)")
    group.add_argument("--on-nonfinite", choices=["error", "skip"], default="error",
                       help="rows with NaN/inf: fail naming them, or drop them (default: error)")


def source_from_args(args: argparse.Namespace) -> SourceSpec:
    """The ``SourceSpec`` described by the flags of ``add_source_arguments``."""
    columns = (tuple(c.strip() for c in args.columns.split(",") if c.strip())
               if args.columns else None)
    return SourceSpec(path=args.data, column=args.column, columns=columns,
                      id_column=args.id_column, on_nonfinite=args.on_nonfinite)
