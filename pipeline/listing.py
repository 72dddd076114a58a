"""Listing the files of a tree, in sorted order, into a compact list the driver can hold.

A job's driver lists a tree once and keeps the list until the job ends: for a million files
that list is most of what it holds (as Python strings, 75 MiB for paths of ~20 characters).
``PathList`` keeps the paths as UTF-8 in Arrow string arrays instead (about the characters
themselves plus 4 bytes each) and hands out Python strings only for the slice being used.

``list_files`` yields a local tree already sorted, one folder at a time, so that the list is
built without a second copy for sorting: inside each folder it sorts the entries by their name,
with ``/`` appended to folders' names, and walks depth first. Two paths below one folder compare
by the first character where their names differ, or, where one name is a prefix of the other,
by the character after it: ``/`` for a folder. The sort key gives exactly those comparisons, so
the walk yields the order ``sorted()`` gives the relative paths.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.storage import Location

__all__ = ["PathList", "list_file_runs", "list_files"]

logger = logging.getLogger("cvae.storage")

_CHUNK = 16_384
"""Paths per Arrow array while a list is built: the Python strings waiting for conversion."""


def list_files(root: Location, suffixes: tuple[str, ...]) -> Iterator[str]:
    """Paths (relative to ``root``, '/'-separated, sorted) of the files below it ending in
    ``suffixes``.

    Names starting with '.' or '_' (temporaries, manifests) are skipped. On a local disk,
    symlinked folders are followed (a link back into a folder already visited is skipped with a
    warning naming it) and the walk itself is in sorted order (module docstring); object stores
    have no links, and their listing (one request per page) is sorted once it is complete.
    """
    for run in list_file_runs(root, suffixes):
        yield from run


def list_file_runs(root: Location, suffixes: tuple[str, ...]) -> Iterator[list[str]]:
    """``list_files``'s paths in runs (a folder's files between two of its subfolders): what
    ``PathList`` takes in, a list at a time rather than a generator step per file."""
    if root.is_local:
        yield from _walk_local(root.path, suffixes)
        return
    selector = pafs.FileSelector(root.path, recursive=True)
    prefix = len(root.path.rstrip("/")) + 1
    found = []
    for info in root.filesystem.get_file_info(selector):
        rel = info.path[prefix:]
        if (info.type == pafs.FileType.File and rel.endswith(suffixes)
                and not any(part.startswith((".", "_")) for part in rel.split("/"))):
            found.append(rel)
    found.sort()
    yield found


def _read_folder(folder: str, suffixes: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """A folder's file names ending in ``suffixes`` and its subfolders as (name + '/', path),
    each sorted; hidden names left out. As ``os.walk``, whatever is not a folder counts as a
    file (a broken link is then named by the read that fails)."""
    files, folders = [], []
    with os.scandir(folder) as scan:
        for entry in scan:
            name = entry.name
            if name.startswith((".", "_")):
                continue
            if entry.is_dir(follow_symlinks=True):
                folders.append((f"{name}/", entry.path))
            elif name.endswith(suffixes):
                files.append(name)
    files.sort()
    folders.sort()
    return files, folders


def _walk_local(root: str, suffixes: tuple[str, ...]) -> Iterator[list[str]]:
    seen = {os.path.realpath(root)}
    # One frame per open folder, deepest last: (relative prefix, files, subfolders, position
    # in files, position in subfolders). Memory is the names of the open folders.
    stack = [("", *_read_folder(root, suffixes), 0, 0)]
    while stack:
        rel, files, folders, at_file, at_folder = stack.pop()
        if at_folder == len(folders):
            if at_file < len(files):
                yield [f"{rel}{name}" for name in files[at_file:]]
            continue
        key, path = folders[at_folder]
        before = bisect.bisect_left(files, key, at_file)  # the files that sort before it
        if before > at_file:
            yield [f"{rel}{name}" for name in files[at_file:before]]
        stack.append((rel, files, folders, before, at_folder + 1))
        real = os.path.realpath(path)
        if real in seen:
            logger.warning("%s: a link to a folder already read (%s); skipped", path, real)
            continue
        seen.add(real)
        stack.append((f"{rel}{key}", *_read_folder(path, suffixes), 0, 0))


def _runs_of(paths: Iterable[str]) -> Iterator[list[str]]:
    if isinstance(paths, list):
        yield paths
        return
    iterator = iter(paths)
    while run := list(itertools.islice(iterator, _CHUNK)):
        yield run


def _string_array(strings: list[str]) -> pa.StringArray:
    """An Arrow string array over buffers of exactly the strings' size. ``pa.array`` grows its
    buffers by doubling in Arrow's memory pool, which keeps what it frees: for a million paths
    the process grew by twice the array's bytes."""
    data = "".join(strings).encode()
    lengths = np.fromiter(map(len, strings), np.int64, len(strings))
    if len(data) != int(lengths.sum()):  # some characters take several bytes: count bytes
        lengths = np.fromiter((len(s.encode()) for s in strings), np.int64, len(strings))
    offsets = np.zeros(len(strings) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.StringArray.from_buffers(len(strings), pa.py_buffer(offsets), pa.py_buffer(data))


class PathList(Sequence[str]):
    """An immutable list of paths held as Arrow strings; slices come back as Python lists."""

    def __init__(self, paths: Iterable[str] = (), *, runs: Iterable[list[str]] = ()) -> None:
        """From ``paths``, or from ``runs`` of them (``list_file_runs``): in order, ``paths``
        first."""
        chunks, buffer = [], []
        for run in itertools.chain(_runs_of(paths), runs):
            buffer += run
            while len(buffer) >= _CHUNK:
                chunks.append(_string_array(buffer[:_CHUNK]))
                del buffer[:_CHUNK]
        if buffer or not chunks:
            chunks.append(_string_array(buffer))
        self.arrow = pa.chunked_array(chunks, pa.string())
        """The paths as one Arrow chunked array (no copy)."""

    def __len__(self) -> int:
        return len(self.arrow)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self.arrow.take(list(range(start, stop, step))).to_pylist()
            return self.arrow.slice(start, max(0, stop - start)).to_pylist()
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"PathList index {index} out of range ({len(self)} paths)")
        return self.arrow[index].as_py()

    def __iter__(self) -> Iterator[str]:
        for chunk in self.arrow.iterchunks():
            yield from chunk.to_pylist()

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"

    def count_endswith(self, suffix: str) -> int:
        """How many paths end with ``suffix``, without making Python strings."""
        return int(pc.sum(pc.ends_with(self.arrow, suffix)).as_py() or 0)

    def first_endswith(self, suffix: str) -> str | None:
        """The first path ending with ``suffix``, or None."""
        offset = 0
        for chunk in self.arrow.iterchunks():
            hits = pc.indices_nonzero(pc.ends_with(chunk, suffix))
            if len(hits):
                return self[offset + hits[0].as_py()]
            offset += len(chunk)
        return None
