"""The shape of a bulk job: work items through a pool of actors that write their own parts.

Each actor reads its items where it runs (a file run of a ``.npy`` tree, a parquet row group),
computes, and writes one part per item straight to the output's attempt folder (local disk or
object store). Only a small record per item crosses back to the driver (the part's name, rows in
and out, skipped rows as JSON), so what crosses the network is paths in and results out, never
the features; the driver turns the records into progress, the manifest and the errors file.

The pool is plain Ray actors fed by the driver, not a Ray Data pipeline: the items are a list the
driver already holds and the results are a few bytes each, so Ray Data's executor, its extra
actors (statistics, autoscaling) and its per-block bookkeeping bought nothing here and cost
seconds of start-up on a small node (profiled: ``benchmarks/README.md``, "Bulk embedding").
Each actor keeps ``IN_FLIGHT`` items queued so it never waits for the driver; a dead actor is
restarted and its item retried (items are idempotent: a retry rewrites the same part name).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cvae_model.progress import Progress
from pipeline.errors import raise_data_errors
from pipeline.runtime import cpu_shares
from pipeline.storage import Location

__all__ = ["ActorPool", "BulkResult", "actor_resources", "errors_parquet", "record", "run_items",
           "write_part"]

IN_FLIGHT = 2
"""Items queued per actor: one running, one waiting, so the driver's round trip is hidden."""
MAX_RESTARTS = 3
"""Restarts of a dead actor (node lost, out of memory); its queued items are retried."""


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


def actor_resources(num_actors: int, items: int | None, use_gpu: bool) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor). Default: one actor per CPU, and no
    more actors than ``items`` (when known).

    One single-threaded process per core beats fewer processes with more torch threads here:
    each actor also reads, decodes and writes (single-threaded work), and a multi-threaded
    torch in a process that shares its core stalls at every parallel region.
    """
    import ray

    actors = num_actors or max(1, int(ray.cluster_resources().get("CPU", 1.0)))
    actors = max(1, actors if items is None else min(actors, items))
    cpus, threads = cpu_shares(actors)
    return actors, 0.0 if use_gpu else cpus, threads


class _Host:
    """A Ray actor holding one worker and running it on items.

    Built in two steps so that actors can start (a process, ``import torch``: seconds on a small
    node) while the driver still lists the source: ``_Host(worker)`` imports the worker's module,
    ``setup(args)`` builds ``worker(*args)``. Workers keep Ray Data's calling convention (a batch
    of one row in, a one-row dict out), so a worker class works under either executor.
    """

    def __init__(self, worker: type) -> None:
        self.kind = worker
        self.worker: Any = None

    def setup(self, args: tuple[Any, ...]) -> None:
        self.worker = self.kind(*args)

    def run(self, item: dict[str, Any]) -> dict[str, list[Any]]:
        return self.worker({key: [value] for key, value in item.items()})


def _add(result: BulkResult, out: dict[str, list[Any]]) -> int:
    """Fold one item's record into ``result``; the rows it covered."""
    path, rows, rows_in = out["path"][0], int(out["rows"][0]), int(out["rows_in"][0])
    if path:
        result.parts.append({"path": str(path), "rows": rows})
    result.rows_in += rows_in
    result.rows_out += rows
    result.errors.extend((str(i), str(r)) for i, r in json.loads(str(out["errors"][0])))
    return rows_in


class ActorPool:
    """``actors`` Ray actors for ``worker``, spread over the cluster's nodes; a context manager
    that kills them on exit, also on errors and Ctrl-C (they hold CPUs and GPUs)."""

    def __init__(self, worker: type, *, actors: int, cpus: float, use_gpu: bool) -> None:
        import ray

        host = ray.remote(_Host).options(
            num_cpus=cpus, num_gpus=1 if use_gpu else 0, max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_RESTARTS, scheduling_strategy="SPREAD")
        self.actors = [host.remote(worker) for _ in range(actors)]

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def run(self, items: Sequence[dict[str, Any]], args: tuple[Any, ...], *, total_rows: int,
            desc: str, progress: bool = True) -> BulkResult:
        """Build every actor's worker from ``args``, run ``items`` through them, collect the
        records. An error in an item (a ``DataValidationError`` naming the bad file or row)
        stops the run and is raised as itself; the caller's ``with`` kills the actors."""
        import ray

        for extra in self.actors[len(items):]:  # fewer items than actors: free their CPUs
            ray.kill(extra, no_restart=True)
        self.actors = self.actors[:max(1, len(items))]
        ready = [actor.setup.remote(args) for actor in self.actors]
        pending: dict[Any, Any] = {}  # task ref -> the actor running it
        queue = iter(items)

        def submit(actor: Any) -> None:
            item = next(queue, None)
            if item is not None:
                pending[actor.run.remote(item)] = actor

        for _ in range(IN_FLIGHT):
            for actor in self.actors:
                submit(actor)
        result = BulkResult()
        with Progress(total_rows, desc=desc, unit="rows", enabled=progress) as bar, \
                raise_data_errors():
            for ref in ready:  # a worker that cannot start (a bad model) fails here, named
                ray.get(ref)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                submit(pending.pop(done[0]))  # before reading the result: keep its queue full
                bar.update(_add(result, ray.get(done[0])))
        result.parts.sort(key=lambda part: part["path"])
        return result


def run_items(items: Sequence[dict[str, Any]], worker: type, args: tuple[Any, ...], *, actors: int,
              cpus: float, use_gpu: bool, total_rows: int, desc: str,
              progress: bool = True) -> BulkResult:
    """Run ``items`` through ``actors`` instances of ``worker(*args)`` (an ``ActorPool``
    started now and stopped at the end); collect their records."""
    with ActorPool(worker, actors=actors, cpus=cpus, use_gpu=use_gpu) as pool:
        return pool.run(items, args, total_rows=total_rows, desc=desc, progress=progress)
