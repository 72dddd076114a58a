"""Pack a ``.npy`` tree into parquet shards: ``cvae pack`` / ``python -m jobs.pack``.

    cvae pack --data s3://bucket/mnist_npy --output s3://bucket/mnist_packed [--shard-mb 128]

For data read many times: a million small files cost a million opens (or GETs) on every pass;
a few ~128 MB shards cost a few. Each row keeps its ``id`` (the file's path under the tree, as
``cvae embed`` and training name it), ``label`` (its folder) and ``features``
(``fixed_shape_tensor<float32>``). The output is a cvae output (``_manifest.json`` written last,
``pipeline.outputs``) whose manifest tells readers its columns, so ``cvae embed``/``cvae train
--data OUTPUT`` read it with the tree's ids and no column flags.

A streaming writer in this process, not a Ray Data job: the output is one ordered sequence of
shards with a byte target, which one writer sizes exactly and keeps deterministic (rows in the
tree's listing order), while a thread pool reads the files ahead of it (reads of small files and
object-store GETs are I/O-bound and release the GIL; the decode is ``np.frombuffer``). Memory
stays bounded: at most ``2 x threads`` runs of files are in flight and one row group is buffered.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from jobs.runner import config_parser, run_configured

__all__ = ["PackConfig", "main", "pack_tree"]

logger = logging.getLogger("cvae.pack")

ROW_GROUP_BYTES = 16 * 2**20
"""Row groups are the unit of parallel reading: about 16 MiB (at least 8 per shard)."""


@dataclass(frozen=True)
class PackConfig:
    """One packing job."""

    data: str
    """A directory tree of .npy files (one example each): a local path or a URI (s3://, ...)."""
    output: str
    """Output directory for the parquet shards, a path or a URI; complete when its _manifest.json
    exists."""
    shard_mb: float = 128.0
    """Target size of a shard in MB (10^6 bytes); shards end within one row group below it."""
    threads: int = 8
    """Threads reading files ahead of the writer."""
    on_error: Literal["fail", "skip"] = "fail"
    """A bad file or a row with NaN/inf: fail naming it, or skip it (listed in _errors.parquet)."""
    overwrite: bool = False
    """Replace an existing output (only a cvae output: a folder holding its _manifest.json)."""
    progress: bool = True
    """Show files done, files/s and ETA while the job runs."""

    def __post_init__(self) -> None:
        if not self.shard_mb > 0 or self.threads < 1:
            raise ValueError(f"shard_mb must be > 0 and threads >= 1, got {self.shard_mb} and "
                             f"{self.threads}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")


def _read_ahead(reader: Any, items: Sequence[dict[str, Any]], threads: int) -> Iterator[list[Any]]:
    """The chunks of each item, in order, read by ``threads`` threads at most 2 x threads ahead."""
    with ThreadPoolExecutor(threads, thread_name_prefix="cvae-pack") as pool:
        pending: deque[Future[list[Any]]] = deque()
        queue = iter(items)
        for item in queue:
            pending.append(pool.submit(lambda it: list(reader.read(it)), item))
            if len(pending) >= 2 * threads:
                break
        while pending:
            chunks = pending.popleft().result()
            for item in queue:
                pending.append(pool.submit(lambda it: list(reader.read(it)), item))
                break
            yield chunks


class _ShardWriter:
    """Writes row groups into ``part-NNNNNN.parquet`` files of about ``target`` bytes each."""

    def __init__(self, folder: Any, relative: str, target: int) -> None:
        self.folder, self.relative, self.target = folder, relative, target
        self.parts: list[dict[str, Any]] = []
        self.writer: Any = None
        self.sink: Any = None
        self.rows = 0

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            name = f"part-{len(self.parts):06d}.parquet"
            self.sink = self.folder.filesystem.open_output_stream(f"{self.folder.path}/{name}")
            self.writer = pq.ParquetWriter(self.sink, table.schema)
            self.parts.append({"path": name if self.relative == "." else f"{self.relative}/{name}",
                               "rows": 0})
        before = self.sink.tell()
        self.writer.write_table(table, row_group_size=len(table))
        self.parts[-1]["rows"] += len(table)
        self.rows += len(table)
        group = self.sink.tell() - before  # what one more row group will add, about
        if self.sink.tell() + group > self.target:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.parts[-1]["bytes"] = self.sink.tell()
            self.sink.close()
            self.writer = self.sink = None


def _table(ids: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.table({"id": pa.array(ids, pa.string()), "label": pa.array(labels, pa.string()),
                     "features": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(rows))})


class _Buffer:
    """Rows waiting for a full row group: (ids, labels, features) pieces."""

    def __init__(self) -> None:
        self.pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.rows = 0

    def add(self, ids: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
        if len(ids):
            self.pieces.append((ids, labels, rows))
            self.rows += len(ids)

    def take(self, count: int) -> Any:
        """The first ``count`` rows as a table (all rows if fewer)."""
        ids, labels, rows = (np.concatenate(column) for column in zip(*self.pieces))
        self.pieces = [(ids[count:], labels[count:], rows[count:])] if len(ids) > count else []
        self.rows = max(0, len(ids) - count)
        return _table(ids[:count], labels[:count], rows[:count])


def pack_tree(config: PackConfig) -> dict[str, Any]:
    """Write the ``.npy`` tree ``config.data`` as parquet shards at ``config.output``; the
    summary (also the output's manifest). Nothing is published unless every file is written
    or, with ``on_error="skip"``, listed in the errors file."""
    from cvae_model.progress import Progress
    from pipeline.bulk import errors_parquet
    from pipeline.errors import DataValidationError
    from pipeline.outputs import ERRORS, CommittedOutput
    from pipeline.sources import READ_AS, SourceSpec, open_source

    started = time.perf_counter()
    opened = open_source(SourceSpec(config.data, on_error=config.on_error))
    if opened.kind != "npy":
        raise DataValidationError(f"{opened.location.uri} is parquet data already; cvae pack "
                                  "packs a directory tree of .npy files")
    logger.info("listed %d .npy files under %s in %.1f s", opened.rows, opened.location.uri,
                time.perf_counter() - started)
    target = int(config.shard_mb * 1e6)
    row_bytes = 4 * opened.width + 64  # features, and room for an id, a label and offsets
    group_rows = max(1, min(ROW_GROUP_BYTES, target // 8) // row_bytes)
    errors = list(opened.skipped)
    with CommittedOutput(config.output, overwrite=config.overwrite,
                         inputs=[opened.location.uri]) as output, \
            Progress(opened.rows, desc="cvae pack", unit="files", enabled=config.progress) as bar:
        shards = _ShardWriter(output.parts, output.parts_path, target)
        buffer = _Buffer()
        for chunks in _read_ahead(opened.reader, opened.items, config.threads):
            for chunk in chunks:
                buffer.add(chunk.ids, chunk.labels, chunk.features)
                errors += chunk.errors
                bar.update(chunk.rows_in)
            while buffer.rows >= group_rows:
                shards.write(buffer.take(group_rows))
        if buffer.rows:
            shards.write(buffer.take(buffer.rows))
        shards.close()
        if shards.rows + len(errors) != opened.rows:
            raise RuntimeError(f"Row accounting failed: {opened.rows} files in, {shards.rows} "
                               f"written and {len(errors)} skipped; nothing was published")
        errors_file = output.write_file(ERRORS, errors_parquet(errors)) if errors else None
        seconds = time.perf_counter() - started
        summary = {"input": opened.location.uri, "output": output.target.uri, "files": opened.rows,
                   "rows": shards.rows, "rows_skipped": len(errors), "errors": errors_file,
                   "width": opened.width, "shards": len(shards.parts),
                   "shard_bytes_target": target, "seconds": round(seconds, 3),
                   "files_per_s": round(opened.rows / max(seconds, 1e-9), 1)}
        output.commit({**summary, READ_AS: {"column": "features", "id_column": "id"},
                       "parts": shards.parts})
    logger.info("packed %d files into %d shards in %.1f s -> %s", shards.rows, len(shards.parts),
                seconds, output.target.uri)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("cvae pack", __doc__, [(PackConfig, "job")])
    return run_configured(parser, argv, pack_tree, [PackConfig])


if __name__ == "__main__":
    sys.exit(main())
