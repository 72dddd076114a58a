"""The shape of a bulk job: work items through a pool of actors that write their own parts.

Each actor reads its items where it runs (a file run of a ``.npy`` tree, a parquet row group),
computes, and writes one part per item straight to the output's attempt folder (local disk or
object store). Only a small record per item crosses back to the driver (the part's name, rows in
and out, skipped rows as JSON), so what crosses the network is paths in and results out, never
the features; the driver turns the records into progress, the manifest and the errors file.
"""

from __future__ import annotations

import gc
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cvae_model.progress import Progress
from pipeline.errors import DataValidationError, raise_data_errors, release_ray_references
from pipeline.runtime import cpu_shares
from pipeline.storage import Location

__all__ = ["BulkResult", "actor_resources", "errors_parquet", "record", "run_items", "write_part"]


@dataclass
class BulkResult:
    parts: list[dict[str, Any]] = field(default_factory=list)
    """{"path": relative to the output, "rows": n} per written part."""
    rows_in: int = 0
    rows_out: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


def record(path: str, rows: int, rows_in: int, errors: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """What an actor returns for one item (a one-row batch)."""
    return {"path": [path], "rows": [rows], "rows_in": [rows_in],
            "errors": [json.dumps([list(e) for e in errors])]}


def write_part(table: pa.Table, folder: Location, relative: str, index: int) -> str:
    """Write ``table`` as part ``index`` into ``folder`` (the output's ``relative`` folder);
    its path relative to the output. A retried item rewrites the same name."""
    name = f"part-{index:06d}.parquet"
    pq.write_table(table, f"{folder.path}/{name}", filesystem=folder.filesystem)
    return name if relative == "." else f"{relative}/{name}"


def errors_parquet(errors: Sequence[tuple[str, str]]) -> bytes:
    """Skipped ids and reasons as parquet bytes, sorted by id, one row per id."""
    unique = dict(sorted(errors))
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": list(unique), "reason": list(unique.values())}), sink)
    return sink.getvalue()


def actor_resources(num_actors: int, items: int, use_gpu: bool) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor). Default: one actor per CPU."""
    import ray

    actors = num_actors or max(1, int(ray.cluster_resources().get("CPU", 1.0)))
    actors = max(1, min(actors, items))
    cpus, threads = cpu_shares(actors)
    return actors, 0.0 if use_gpu else cpus, threads


def run_items(items: list[dict[str, Any]], worker: type, args: tuple[Any, ...], *, actors: int,
              cpus: float, use_gpu: bool, total_rows: int, desc: str,
              progress: bool = True) -> BulkResult:
    """Map ``items`` through a pool of ``actors`` instances of ``worker(*args)``; collect records."""
    import ray

    gc.collect()  # frees a failed earlier execution no longer referenced: its actors hold CPUs
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    records = dataset.map_batches(worker, fn_constructor_args=args, batch_size=1,
                                  compute=ray.data.ActorPoolStrategy(size=actors),
                                  num_cpus=cpus, num_gpus=1 if use_gpu else 0,
                                  batch_format="numpy")
    result = BulkResult()
    try:
        with Progress(total_rows, desc=desc, unit="rows", enabled=progress) as bar, \
                raise_data_errors():
            for batch in records.iter_batches(batch_size=None, batch_format="numpy"):
                for path, rows, rows_in, errors in zip(batch["path"], batch["rows"],
                                                       batch["rows_in"], batch["errors"], strict=True):
                    if path:
                        result.parts.append({"path": str(path), "rows": int(rows)})
                    result.rows_in += int(rows_in)
                    result.rows_out += int(rows)
                    result.errors.extend((str(i), str(r)) for i, r in json.loads(str(errors)))
                    bar.update(int(rows_in))
    except BaseException as exc:
        # A failed execution's executor (with its actors, which hold CPUs) stays alive while
        # anything references Ray's task error or the dataset. A data error is ours to report
        # and carries what the user needs: drop Ray's error from its context. Without this the
        # next job in the same process (a notebook, a test) can wait for CPUs until Ray Data's
        # no-progress timeout.
        if isinstance(exc, DataValidationError):
            release_ray_references(exc)
        del records, dataset
        gc.collect()
        raise
    result.parts.sort(key=lambda part: part["path"])
    return result
