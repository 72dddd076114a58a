"""Bulk embedding: a Ray job that embeds a data set with a trained model into parquet.

The driver resolves the model reference once (``pipeline.model_uri``), lists the source
(``pipeline.sources``), checks the feature width against the model and the output against what
it would replace, then runs ``EmbedWorker`` actors over the source's work items
(``pipeline.bulk``). Each actor builds a ``FittedModel`` from the checkpoint's bytes in Ray's
object store (no shared filesystem needed), reads its items, embeds, and writes its part:

    OUTPUT/_manifest.json   model (reference, name, version), input, rows, seconds, rows/s, parts
    OUTPUT/parts-*/part-NNNNNN.parquet   id, embedding (fixed_size_list<float32>[k])
                                         [, neg_elbo, reconstruction_error]
    OUTPUT/parts-*/_errors.parquet       id, reason: files or rows skipped with on_error="skip"

The output is complete when its manifest exists (``pipeline.outputs``); every input row is
written or listed as skipped, or nothing is published.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cvae_model.fitted import FittedModel, NonFiniteOutputError
from cvae_model.validation import width_mismatch
from pipeline.bulk import ActorPool, actor_resources, errors_parquet, record, write_part
from pipeline.errors import DataValidationError, show_id
from pipeline.model_uri import ResolvedModel, resolve_model
from pipeline.npy import NpyItems
from pipeline.outputs import ERRORS, CommittedOutput
from pipeline.rows import Chunk
from pipeline.runtime import ensure_ray
from pipeline.sources import OpenedSource, SourceSpec, open_source
from pipeline.storage import Location
from pipeline.tracking import RunTracker

__all__ = ["EmbedConfig", "EmbedSummary", "EmbedWorker", "check_unique_ids", "load_fitted",
           "read_ids", "run_bulk_embedding", "start_job"]

logger = logging.getLogger("cvae.embed")


@dataclass(frozen=True)
class EmbedConfig:
    """One bulk-embedding job (the source is a ``SourceSpec`` beside it)."""

    model: str
    """models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a logdir or checkpoint
    (a path or a URI)."""
    output: str
    """Output directory, a path or a URI (s3://...); complete when its _manifest.json exists."""
    batch_size: int = 8192
    """Rows per forward pass (memory only: results do not depend on it)."""
    num_actors: int = 0
    """Embedding actors; 0: one per CPU of the cluster."""
    use_gpu: bool = False
    """One GPU per actor."""
    with_score: bool = False
    """Add per-row neg_elbo and reconstruction_error (an anomaly score)."""
    score_samples: int = 8
    """Monte-Carlo samples per row for neg_elbo (the same fixed draws for every row)."""
    score_seed: int = 0
    """Seed of those draws."""
    overwrite: bool = False
    """Replace an existing output (only a cvae output: a folder holding its _manifest.json)."""
    experiment: str = "cvae-embed"
    """MLflow experiment of the job's run."""
    track: bool = True
    """Log the job as an MLflow run (best-effort: a tracking failure never fails the job)."""
    progress: bool = True
    """Show rows done, rows/s and ETA while the job runs."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_actors < 0 or self.score_samples < 1:
            raise ValueError(f"batch_size and score_samples must be >= 1 and num_actors >= 0, got "
                             f"{self.batch_size}, {self.score_samples}, {self.num_actors}")


@dataclass(frozen=True)
class EmbedSummary:
    """What a job did; also in ``_manifest.json`` (without ``mlflow_run_id``)."""

    model: str
    model_name: str | None
    model_version: str | None
    checkpoint: str
    """Where the model's files were read (a path, URI or MLflow artifact URI)."""
    input: str
    output: str
    rows_in: int
    rows_out: int
    rows_skipped: int
    seconds: float
    rows_per_s: float
    with_score: bool = False
    errors: str | None = None
    """The errors file, relative to the output, when rows were skipped."""
    mlflow_run_id: str | None = None


def load_fitted(files: Any, use_gpu: bool, threads: int) -> FittedModel:
    """An actor's model from checkpoint bytes (or an object ref to them), on its device.

    ``threads`` caps torch's and Arrow's thread pools at the actor's CPU share: actors share
    the node's cores, and a pool larger than its share oversubscribes them.
    """
    import ray
    import torch

    torch.set_num_threads(threads)
    pa.set_cpu_count(threads)  # parquet decoding's pool (default: every core of the node)
    if isinstance(files, ray.ObjectRef):  # constructor args inside a tuple arrive unresolved
        files = ray.get(files)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return FittedModel.from_files(files, "the job's model", device)


class EmbedWorker:
    """Bulk-job worker (``pipeline.bulk``): reads work items, embeds them, writes a part per item.

    The reader's chunks (a parquet slice, a run of ``.npy`` files; already checked for NaN and
    infinity) are embedded one by one as they are read: merging them first copied every
    feature once more for nothing. Only ids and embeddings are kept until the part is written.
    """

    def __init__(self, files: Any, reader: Any, parts: tuple[Location, str], config: EmbedConfig,
                 threads: int) -> None:
        self.fitted = load_fitted(files, config.use_gpu, threads)
        self.reader, self.parts, self.config = reader, parts, config

    def _embed(self, chunk: Chunk,
               errors: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, features, embeddings) of a chunk's rows, minus rows whose embedding is not
        finite (in skip mode; they are added to ``errors``, otherwise a ``DataValidationError``
        names the first)."""
        try:
            return chunk.ids, chunk.features, self.fitted.embed(
                chunk.features, self.config.batch_size, name="the features")
        except NonFiniteOutputError as exc:
            bad = [show_id(chunk.ids[i]) for i in exc.rows]
            if not self.reader.skip:
                raise DataValidationError(f"{exc} (row id {bad[0]}); fix the data or pass "
                                          "--on-error skip") from None
            keep = np.ones(len(chunk.ids), bool)
            keep[exc.rows] = False
            errors += [(str(chunk.ids[i]), "its embedding is not finite") for i in exc.rows]
            ids, features = chunk.ids[keep], chunk.features[keep]
            if not len(ids):
                return ids, features, np.zeros((0, self.fitted.dim_latent), np.float32)
            return ids, features, self.fitted.embed(features, self.config.batch_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        item = {key: values[0] for key, values in batch.items()}
        ids, embeddings, scores, errors = [], [], [], []
        rows_in = 0
        for chunk in self.reader.read(item):
            rows_in += chunk.rows_in
            errors += chunk.errors
            if not len(chunk.ids):
                continue
            chunk_ids, features, z = self._embed(chunk, errors)
            ids.append(chunk_ids)
            embeddings.append(z)
            if self.config.with_score and len(z):
                scores.append(self.fitted.scores(features, self.config.score_samples,
                                                 self.config.score_seed, self.config.batch_size))
        z = np.concatenate(embeddings) if embeddings else np.zeros((0, self.fitted.dim_latent),
                                                                   np.float32)
        columns: dict[str, Any] = {
            "id": np.concatenate(ids) if ids else np.zeros(0, np.int64),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)),
                                                           self.fitted.dim_latent)}
        if self.config.with_score:
            empty = [np.zeros(0, np.float32)]
            columns["neg_elbo"] = np.concatenate([s.neg_elbo for s in scores] or empty)
            columns["reconstruction_error"] = np.concatenate(
                [s.reconstruction_error for s in scores] or empty)
        path = write_part(pa.table(columns), *self.parts, int(item["index"])) if len(z) else ""
        return record(path, len(z), rows_in, errors)


def read_ids(opened: OpenedSource) -> pa.ChunkedArray:
    """Every id of a source, from its parquet id column alone (positions or paths otherwise)."""
    import pyarrow.parquet as pq

    if opened.id_column is None:
        if isinstance(opened.items, NpyItems):
            return opened.items.paths()
        return pa.chunked_array([pa.array(np.arange(opened.rows))])
    fs = opened.location.filesystem
    return pa.chunked_array([pq.read_table(f, columns=[opened.id_column], filesystem=fs)
                             .column(opened.id_column).combine_chunks()
                             for f in sorted({i["file"] for i in opened.items})])


def check_unique_ids(opened: OpenedSource) -> None:
    """Refuse a parquet id column with duplicates (reads only that column)."""
    import pyarrow.compute as pc

    if opened.id_column is None:
        return  # positions and file paths are unique by construction
    counts = pc.value_counts(read_ids(opened))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        raise DataValidationError(
            f"{opened.location.uri}: the id column {opened.id_column!r} holds duplicates "
            f"({len(repeated)} id(s) repeated; e.g. {first['values']!r} {first['counts']} times); "
            "every output row must be traceable to one input row")


def start_job(model_ref: str, source: SourceSpec, output: str, overwrite: bool,
              expected_width: str) -> tuple[ResolvedModel, OpenedSource, CommittedOutput]:
    """The checks every bulk job makes before any work: model, source, width, ids, output."""
    ensure_ray()
    model = resolve_model(model_ref)
    opened = open_source(source)
    expected = getattr(model.checkpoint.model_config, expected_width)
    if opened.width != expected:
        mismatch = width_mismatch(opened.width, expected, expected_width)
        raise DataValidationError(f"{opened.location.uri}: {mismatch} (the model {model_ref})")
    check_unique_ids(opened)
    return model, opened, CommittedOutput(output, overwrite=overwrite, inputs=[opened.location.uri])


def run_bulk_embedding(source: SourceSpec, config: EmbedConfig) -> EmbedSummary:
    """Embed ``source`` with ``config.model`` into parquet at ``config.output``.

    Raises before any work ``OutputExistsError`` (output exists without ``overwrite``, or must
    not be replaced), ``DataValidationError`` (the width differs from the model's, duplicate or
    null ids; during the run: a bad file or row, named), ``ModelNotFoundError``.
    """
    started = time.perf_counter()
    ensure_ray()
    actors, cpus, threads = actor_resources(config.num_actors, None, config.use_gpu)
    # Actors start (a process and `import torch` each) while the driver lists the source.
    with ActorPool(EmbedWorker, actors=actors, cpus=cpus, use_gpu=config.use_gpu) as pool:
        return _run(pool, started, threads, source, config)


def _run(pool: ActorPool, started: float, threads: int, source: SourceSpec,
         config: EmbedConfig) -> EmbedSummary:
    """``run_bulk_embedding`` once its actors are starting: checks, the run, the commit."""
    import ray

    model, opened, output = start_job(config.model, source, config.output, config.overwrite,
                                      "dim_feature")
    logger.info("embedding %d rows of %s with %s (%s) into %s", opened.rows, opened.location.uri,
                config.model, f"{model.name} version {model.version}" if model.version
                else model.source, output.target.uri)
    tracker = RunTracker(enabled=config.track).start(config.experiment, tags={"cvae.job": "embed"})
    with tracker, output:
        tracker.log_params({"model": config.model, "model_name": model.name,
                            "model_version": model.version, "input": opened.location.uri,
                            **{f"source.{k}": v for k, v in asdict(source).items()},
                            **{k: v for k, v in asdict(config).items() if k != "model"}})
        result = pool.run(opened.items, (ray.put(model.files), opened.reader,
                                         (output.parts, output.parts_path), config, threads),
                          total_rows=opened.rows, desc="cvae embed", progress=config.progress)
        errors = opened.skipped + result.errors
        if result.rows_out + len(errors) != opened.rows:
            raise RuntimeError(f"Row accounting failed: {opened.rows} rows in, {result.rows_out} "
                               f"written and {len(errors)} skipped; nothing was published")
        errors_file = output.write_file(ERRORS, errors_parquet(errors)) if errors else None
        if errors:
            logger.warning("skipped %d bad file(s) or row(s), listed in %s: %s", len(errors),
                           errors_file, ", ".join(e[0] for e in errors[:5]))
        seconds = time.perf_counter() - started
        summary = EmbedSummary(config.model, model.name, model.version, model.source,
                               opened.location.uri, output.target.uri, opened.rows,
                               result.rows_out, len(errors), round(seconds, 3),
                               round(result.rows_out / max(seconds, 1e-9), 1), config.with_score,
                               errors_file)
        manifest = output.commit({**{k: v for k, v in asdict(summary).items()
                                     if k != "mlflow_run_id"}, "parts": result.parts})
        tracker.log_metrics({k: float(getattr(summary, k)) for k in
                             ("rows_in", "rows_out", "rows_skipped", "seconds", "rows_per_s")}, 0)
        tracker.log_dict(manifest, "manifest.json")
    logger.info("embedded %d rows (%d skipped) in %.1f s, %.0f rows/s -> %s", summary.rows_out,
                summary.rows_skipped, summary.seconds, summary.rows_per_s, output.target.uri)
    return EmbedSummary(**{**asdict(summary), "mlflow_run_id": tracker.run_id})
