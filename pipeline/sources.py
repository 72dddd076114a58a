"""Where rows come from: ``SourceSpec`` -> an opened source -> a Ray Dataset.

Every source becomes rows with an ``id`` and a float32 ``features`` vector (``.npy`` trees also a
``label``, the file's folder). ``open_source`` holds the one rule for telling a ``.npy`` tree from
a parquet data set, resolves the path through ``pipeline.storage`` (local disk or object store),
and returns the work items and a reader that reads one item anywhere: ``read_source`` maps them in
Ray Data tasks (training, statistics), the bulk jobs read them inside their actors.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa

from pipeline.errors import DataValidationError, raise_data_errors
from pipeline.listing import PathList, list_file_runs, list_files
from pipeline.npy import open_npy_tree
from pipeline.outputs import MANIFEST, is_attempt_folder, output_parts, read_manifest
from pipeline.parquet import ParquetColumns, open_parquet
from pipeline.rows import Chunk
from pipeline.storage import Location, resolve

__all__ = [
    "READ_AS",
    "DataValidationError",
    "OpenedSource",
    "SourceSpec",
    "feature_dim",
    "open_source",
    "raise_data_errors",
    "read_source",
    "skipped_rows",
]

READ_TASK_CPUS = 0.5
"""CPUs a read task asks for: less than one, so reads still fit on a node where training workers
hold fractions of every CPU (with whole-CPU reads a small cluster can leave none free: a hang)."""
_TARGET_BLOCK_BYTES = 16 * 2**20
"""Ray Data's default (128 MiB) made a statistics worker buffer ~800 MB; 16 MiB keeps peak memory
flat in the number of rows (benchmarks/ingest.py) and costs no throughput."""
_ROWS_PER_ARRAY_BLOCK = 8192


@dataclass(frozen=True)
class SourceSpec:
    """Where the rows come from and how to read them."""

    path: str = field(metadata={"flag": "data"})
    """A directory tree of ``.npy`` files (one example each), or a parquet file or directory;
    a local path or a URI (s3://, gs://, abfs://, hdfs://, file://)."""
    column: str | None = None
    """Parquet: the features column (fixed_shape_tensor, fixed_size_list or list of numbers)."""
    columns: tuple[str, ...] | None = None
    """Parquet: scalar columns that together form the features."""
    id_column: str | None = None
    """Parquet: the id column; default the row's position (files sorted by path, then rows)."""
    on_error: Literal["fail", "skip"] = "fail"
    """A bad file or a row with NaN/inf: fail naming it, or skip it (logged; jobs list it in
    _errors.parquet)."""

    def __post_init__(self) -> None:
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))  # a list would do too
            if not self.columns:
                raise ValueError("columns is empty; give the scalar feature columns, or None")
        if self.column is not None and self.columns is not None:
            raise ValueError("Give either column (one tensor/list column) or columns (scalar "
                             "columns), not both")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")


class Reader(Protocol):
    skip: bool

    def read(self, item: dict[str, Any]) -> Iterator[Chunk]: ...


@dataclass(frozen=True)
class OpenedSource:
    """A listed source: what to read, how, and how much."""

    kind: Literal["npy", "parquet"]
    location: Location
    width: int
    rows: int
    """Rows (files for a tree) in the source, from listings and footers."""
    items: Sequence[dict[str, Any]]
    """Units of work; each has ``index`` and ``rows``."""
    reader: Reader
    skipped: list[tuple[str, str]]
    """Files found bad while opening (skip mode): (id, reason)."""
    id_column: str | None


READ_AS = "read_as"
"""Manifest key of an output's default columns (``{"column": ..., "id_column": ...}``), so that
e.g. a ``cvae pack`` output reads with the tree's ids without naming its columns."""


def _read_as(location: Location) -> dict[str, str]:
    """The default columns a cvae output's manifest names (none for other data)."""
    if not location.is_dir() or not location.join(MANIFEST).exists():
        return {}
    return dict(read_manifest(location).get(READ_AS) or {})


def _list(location: Location) -> tuple[Literal["npy", "parquet"], PathList]:
    """The one rule, and the files: a .parquet file, a folder of .parquet files, or a folder of
    .npy files (sorted paths relative to the folder; one listing, held as a ``PathList``)."""
    if not location.exists():
        raise FileNotFoundError(f"No such file or directory: {location.uri} (the data path)")
    if location.is_file():
        if location.path.endswith(".parquet"):
            return "parquet", PathList([location.path])
        raise DataValidationError(f"{location.uri}: expected a directory tree of .npy files or "
                                  "parquet data; a single file must be .parquet")
    complete = location.join(MANIFEST).exists()
    if complete:  # a cvae output: what its manifest lists, nothing else
        manifest = read_manifest(location)
        if manifest.get("kind") == "npy":
            tree = location.join(manifest["tree"]) if manifest["tree"] != "." else location
            inside = f"{tree.path}/"[len(location.path) + 1:]  # the tree's folder, relative
            return "npy", PathList(f"{inside}{f}" for f in list_files(tree, (".npy",)))
        return "parquet", PathList(part.path for part in output_parts(location))
    found = PathList(runs=list_file_runs(location, (".npy", ".parquet")))  # the one list held
    first = bisect.bisect_left(found, "parts-")  # sorted: an attempt's files are together
    if first < len(found) and is_attempt_folder(found[first].split("/", 1)[0]):
        raise FileNotFoundError(
            f"{location.uri} is an incomplete cvae output: it holds the parts of an attempt "
            f"({found[first].split('/', 1)[0]}) but no {MANIFEST} (the job that wrote it did not "
            "finish). Run that job again; it replaces them.")
    parquet = found.count_endswith(".parquet")
    if parquet == 0:
        return "npy", found
    if parquet < len(found):
        one, other = found.first_endswith(".npy"), found.first_endswith(".parquet")
        raise DataValidationError(f"{location.uri} holds both .npy files ({one}) and .parquet "
                                  f"files ({other}); point the source at one kind of data")
    return "parquet", PathList(f"{location.path}/{f}" for f in found)


def open_source(spec: SourceSpec, fs_options: dict[str, Any] | None = None) -> OpenedSource:
    """List ``spec``'s files (parquet: read footers), check the first, and split the work."""
    location = resolve(spec.path, fs_options)
    skip = spec.on_error == "skip"
    kind, files = _list(location)
    if kind == "parquet":
        defaults = _read_as(location) if not (spec.column or spec.columns or spec.id_column) else {}
        parquet = open_parquet(location, files,
                               ParquetColumns(spec.column or defaults.get("column"), spec.columns,
                                              spec.id_column or defaults.get("id_column")), skip)
        return OpenedSource("parquet", location, parquet.width, parquet.rows, parquet.items(),
                            parquet.reader, [], parquet.reader.cols.id_column)
    if spec.column or spec.columns or spec.id_column:
        raise DataValidationError(f"{location.uri} is a tree of .npy files: column, columns and "
                                  "id_column are for parquet (a file's id is its path)")
    tree = open_npy_tree(location, files, skip)
    return OpenedSource("npy", location, tree.width, len(tree.files), tree.items(), tree.reader,
                        tree.skipped, None)


def feature_dim(source: SourceSpec | np.ndarray) -> int:
    """The number of features, from the first file or the parquet schema and first row."""
    if isinstance(source, SourceSpec):
        return open_source(source).width
    return int(np.asarray(source).shape[1])


# ---------------------------------------------------------------------------- Ray Data
_TALLY_NAME = "cvae_skipped_rows"


class _SkipTally:
    """A zero-CPU Ray actor counting rows dropped by skip-mode readers in this Ray job."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> int:
        self.rows += rows
        return self.rows

    def total(self) -> int:
        return self.rows


def skipped_rows() -> int:
    """Rows (or files) dropped so far by skip-mode readers in this Ray job, over all datasets."""
    import ray

    try:
        return int(ray.get(ray.get_actor(_TALLY_NAME).total.remote()))
    except ValueError:
        return 0


class _ReadItems:
    """map_batches function: work items -> rows (``id``, ``features`` [, ``label``])."""

    def __init__(self, reader: Reader, tally: Any) -> None:
        self.reader, self.tally = reader, tally

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import ray

        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            for chunk in self.reader.read(dict(zip(keys, values, strict=True))):
                if chunk.errors and self.tally is not None:
                    # Blocking on purpose: the count must be in before the rows are consumed.
                    ray.get(self.tally.add.remote(len(chunk.errors)))
                out = {"id": chunk.ids, "features": chunk.features}
                if chunk.labels is not None:
                    out["label"] = chunk.labels
                yield out


def _small_blocks(dataset: Any) -> Any:
    """``dataset`` with its own (inherited, not global) target block size lowered."""
    dataset.context.target_max_block_size = _TARGET_BLOCK_BYTES
    return dataset


def _read_array(data: np.ndarray, ids: np.ndarray | None) -> Any:
    import ray

    from cvae_model.validation import check_features

    features = check_features(data, "X")
    ids = np.arange(len(features), dtype=np.int64) if ids is None else np.asarray(ids)
    if ids.shape != (len(features),):
        raise ValueError(f"ids has shape {ids.shape} but X has {len(features)} rows; expected "
                         f"shape ({len(features)},)")
    return ray.data.from_arrow([
        pa.table({"id": ids[s:s + _ROWS_PER_ARRAY_BLOCK],
                  "features": pa.FixedShapeTensorArray.from_numpy_ndarray(
                      np.ascontiguousarray(features[s:s + _ROWS_PER_ARRAY_BLOCK]))})
        for s in range(0, len(features), _ROWS_PER_ARRAY_BLOCK)])


def read_source(source: SourceSpec | np.ndarray | OpenedSource, *,
                ids: np.ndarray | None = None) -> Any:
    """A Ray Dataset with ``id`` and float32 ``features`` (d,) columns (plus ``label`` for trees).

    ``source``: a ``SourceSpec``, an ``OpenedSource``, or an in-memory array of shape (n, d)
    (``ids``: one per row, default the row index). Lazy and streaming: the driver lists files
    and reads footers; rows are read and validated in Ray tasks. Errors surface as
    ``DataValidationError`` inside ``raise_data_errors()`` (Ray wraps them otherwise).

    Example:
        >>> ds = read_source(SourceSpec("~/mnist_npy"))  # doctest: +SKIP
        >>> ds.take_batch(2, batch_format="numpy")["features"].shape  # doctest: +SKIP
        (2, 784)
    """
    import ray

    if not isinstance(source, (SourceSpec, OpenedSource)):
        return _read_array(np.asarray(source), ids)
    if ids is not None:
        raise TypeError("ids= is only for in-memory arrays; for parquet give an id_column")
    opened = source if isinstance(source, OpenedSource) else open_source(source)
    tally = None
    if opened.reader.skip:
        tally = ray.remote(num_cpus=0)(_SkipTally).options(name=_TALLY_NAME,
                                                            get_if_exists=True).remote()
        if opened.skipped:
            ray.get(tally.add.remote(len(opened.skipped)))
    items = ray.data.from_items(list(opened.items), override_num_blocks=max(1, min(len(opened.items), 256)))
    # An instance, not the class: plain tasks (actors would hold CPUs for the whole run).
    return _small_blocks(items.map_batches(_ReadItems(opened.reader, tally), batch_size=1,
                                           batch_format="numpy", num_cpus=READ_TASK_CPUS))
