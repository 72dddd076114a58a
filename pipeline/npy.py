"""``.npy`` trees: one example per file; its id is the path under the root, its label the folder.

``open_npy_tree`` lists the tree (through its filesystem: a local disk or an object store) and
checks the first readable file, whose shape and dtype every other file must match. Work is split
into items of ``FILES_PER_ITEM`` paths; ``NpyReader.read`` reads one item wherever it runs (a Ray
Data task, a bulk-inference actor). A file whose header is byte-identical to the first file's is
decoded with ``np.frombuffer`` (no per-file header parsing); any other goes through ``np.load``
for a precise error. Nothing is ever unpickled.

``ray.data.read_numpy`` is not used: it splits a (d,) file into d scalar rows.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import DataValidationError
from pipeline.rows import Chunk, check_rows
from pipeline.storage import Location

__all__ = ["FILES_PER_ITEM", "NpyReader", "NpyTree", "load_npy", "open_npy_tree"]

FILES_PER_ITEM = 2048
"""Each Ray task pays ~10 ms of overhead: ~2k files per item keeps that under 5%."""


def _is_numeric(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_


def load_npy(data: bytes, where: str, expected: tuple[tuple[int, ...], np.dtype] | None = None,
             reference: str = "") -> np.ndarray:
    """One example from a ``.npy`` file's bytes as float32 (d,), validated; never unpickles."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataValidationError(f"{where}: holds a pickled (object) array; cvae never "
                                      "loads pickles. Save plain numeric arrays.") from exc
        raise DataValidationError(f"{where}: corrupt or truncated .npy file ({exc})") from exc
    except (EOFError, OSError) as exc:
        raise DataValidationError(f"{where}: corrupt or truncated .npy file ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise DataValidationError(f"{where}: holds an .npz archive or other non-array data; "
                                  "expected one .npy array per file")
    if not _is_numeric(array.dtype):
        raise DataValidationError(f"{where}: dtype {array.dtype} is not numeric; expected "
                                  "integers or floats")
    if expected is not None and (array.shape, array.dtype) != expected:
        raise DataValidationError(
            f"{where}: shape {array.shape} dtype {array.dtype}, expected shape {expected[0]} "
            f"dtype {expected[1]} (as the first file, {reference})")
    if array.ndim != 1:
        raise DataValidationError(f"{where}: shape {array.shape}; each .npy file must hold one "
                                  "example, a 1-D array of features")
    return array.astype(np.float32, copy=False)


@dataclass(frozen=True)
class NpyReader:
    """Reads items of a tree: (paths) -> Chunk. Picklable; holds no file list."""

    root: Location
    header: bytes
    """The first file's bytes before its data: files starting with exactly these are fast-read."""
    expected: tuple[tuple[int, ...], Any]
    reference: str
    skip: bool

    def _one(self, rel: str) -> np.ndarray:
        where = self.root.join(rel).uri
        try:
            with self.root.filesystem.open_input_stream(f"{self.root.path}/{rel}") as stream:
                data = stream.read()
        except OSError as exc:
            raise DataValidationError(f"{where}: cannot be read ({exc})") from exc
        shape, dtype = self.expected
        size = len(self.header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
        if len(data) == size and data.startswith(self.header):
            return np.frombuffer(data, dtype, offset=len(self.header)).astype(np.float32)
        return load_npy(data, where, self.expected, self.reference)

    def read(self, item: dict[str, Any]) -> Iterator[Chunk]:
        paths = [str(p) for p in item["paths"]]
        rows, ids, errors = [], [], []
        for rel in paths:
            try:
                rows.append(self._one(rel))
                ids.append(rel)
            except DataValidationError as exc:
                if not self.skip:
                    raise
                errors.append((rel, str(exc)))
        width = int(np.prod(self.expected[0]))
        features = np.stack(rows) if rows else np.zeros((0, width), np.float32)
        id_array = np.asarray(ids, dtype=object)
        keep, bad_rows = check_rows(features, id_array, self.root.uri, self.skip)
        labels = np.array([p.rpartition("/")[0] for p in ids], dtype=object)
        yield Chunk(id_array[keep], features[keep], labels[keep], errors + bad_rows, len(paths))


@dataclass(frozen=True)
class NpyTree:
    """A listed tree: its files (sorted), the reader and the files that failed up front."""

    root: Location
    files: list[str]
    reader: NpyReader
    skipped: list[tuple[str, str]]
    """Files before the first readable one, in skip mode (they are in no item)."""

    @property
    def width(self) -> int:
        return int(np.prod(self.reader.expected[0]))

    def items(self, files_per_item: int = FILES_PER_ITEM) -> list[dict[str, Any]]:
        files = self.files[len(self.skipped):]
        return [{"index": i // files_per_item, "paths": files[i:i + files_per_item],
                 "rows": len(files[i:i + files_per_item])}
                for i in range(0, len(files), files_per_item)]


def _header(data: bytes, where: str) -> tuple[bytes, tuple[tuple[int, ...], np.dtype]]:
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(stream)
    except ValueError as exc:
        raise DataValidationError(f"{where}: corrupt or truncated .npy file (header: {exc})") from exc
    load_npy(data, where)  # the full set of checks, on the file every other is compared with
    return data[:stream.tell()], (tuple(shape), np.dtype(dtype))


def open_npy_tree(root: Location, files: list[str], skip: bool = False) -> NpyTree:
    """Check the first of the tree's ``files`` (sorted relative paths; in skip mode: the first
    readable one) and hold the rest for ``items``."""
    if not files:
        raise DataValidationError(f"{root.uri}: no .npy files found in this directory tree")
    skipped: list[tuple[str, str]] = []
    for rel in files:
        where = root.join(rel).uri
        try:
            header, expected = _header(root.join(rel).read_bytes(), where)
            reader = NpyReader(root, header, expected, where, skip)
            return NpyTree(root, files, reader, skipped)
        except DataValidationError as exc:
            if not skip:
                raise
            skipped.append((rel, str(exc)))
    raise DataValidationError(f"{root.uri}: none of the {len(files)} .npy files could be read; "
                              f"the first: {skipped[0][1]}")
