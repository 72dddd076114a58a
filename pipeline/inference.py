"""Bulk embedding: a Ray Data job that embeds a data set with a trained model into parquet.

The driver resolves the model reference once (``models:/NAME@ALIAS`` to a version and a local
checkpoint), reads the source with ``pipeline.sources``, and maps batches through ``Embedder``,
a class UDF that loads the model once per actor. Output goes to a temporary directory beside
the target and is renamed into place only when complete and its rows are accounted for:

    OUTPUT/part-*.parquet   id, embedding (fixed_size_list<float32>[k]) [, neg_elbo, reconstruction_error]
    OUTPUT/_manifest.json   model (uri, name, version, checkpoint), input, rows, seconds, rows/s
    OUTPUT/_errors.parquet  id, reason: files skipped with on_error="skip" (only when any were)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvae_model.checkpoint import replace_directory
from pipeline.sources import DataValidationError, SourceSpec, raise_data_errors

__all__ = ["Decoder", "EmbedConfig", "EmbedSummary", "Embedder", "OutputExistsError",
           "run_bulk_decoding", "run_bulk_embedding", "write_parquet_atomically"]

logger = logging.getLogger("cvae.embed")

MANIFEST = "_manifest.json"
ERRORS = "_errors.parquet"


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


@dataclass(frozen=True)
class EmbedConfig:
    """One bulk-embedding job."""

    model_uri: str
    """models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a logdir or checkpoint."""
    source: SourceSpec
    output: str
    """Output directory (replaced atomically with ``overwrite``)."""
    batch_size: int = 4096
    num_actors: int = 1
    use_gpu: bool = False
    with_score: bool = False
    """Add per-row ``neg_elbo`` and ``reconstruction_error`` (an anomaly score)."""
    overwrite: bool = False
    on_error: Literal["fail", "skip"] = "fail"
    """A bad .npy file: fail naming it, or record it in _errors.parquet and go on."""
    experiment: str = "cvae-embed"
    track: bool = True
    """Log the job as an MLflow run of its own."""
    progress: bool = True
    """Show Ray Data's progress bars (rows, rows/s)."""


@dataclass(frozen=True)
class EmbedSummary:
    model_uri: str
    model_version: str | None
    checkpoint: str
    input: str
    output: str
    rows_in: int
    rows_out: int
    rows_skipped: int
    seconds: float
    rows_per_s: float
    mlflow_run_id: str | None = None


class Embedder:
    """Ray Data class UDF: loads the model once per actor, embeds batches of features."""

    def __init__(self, checkpoint_dir: str, with_score: bool = False, use_gpu: bool = False,
                 threads: int = 1) -> None:
        import torch

        from cvae_model.checkpoint import load_checkpoint

        torch.set_num_threads(threads)  # actors share the node's cores
        checkpoint = load_checkpoint(checkpoint_dir)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = checkpoint.build_model().to(self.device).eval()
        self.mean = torch.from_numpy(checkpoint.normalizer.mean).to(self.device)
        self.scale = torch.from_numpy(checkpoint.normalizer.scale).to(self.device)
        self.with_score = with_score
        self.dim_latent = checkpoint.model_config.dim_latent

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        features = np.ascontiguousarray(batch["features"], dtype=np.float32)
        if not features.flags.writeable:  # Arrow-backed batches are read-only views
            features = features.copy()
        with torch.inference_mode():
            x = (torch.from_numpy(features).to(self.device) - self.mean) / self.scale
            z = self.model.embed(x)
            columns: dict[str, Any] = {
                "id": batch["id"],
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(z.cpu().numpy().reshape(-1)), self.dim_latent),
            }
            if self.with_score:
                # eps = 0: the score of the posterior mean, deterministic per row.
                out = self.model(x, 1.0, torch.zeros_like(z))
                columns["neg_elbo"] = (out.recon + out.kl).cpu().numpy()
                columns["reconstruction_error"] = out.recon.cpu().numpy()
        return pa.table(columns)


class _TolerantNpyReader:
    """Reads .npy files one by one; a bad file becomes an error record instead of a failure.

    Error records are written by the task itself into ``errors_dir`` (inside the job's temporary
    output), so the good rows stream on in a single pass.
    """

    def __init__(self, root: str, expected: Any, reference: str, errors_dir: str) -> None:
        self.root = Path(root)
        self.expected = expected
        self.reference = reference
        self.errors_dir = errors_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.sources import load_npy_file

        ids, rows, bad_ids, reasons = [], [], [], []
        for rel in (str(p) for p in batch["path"]):
            try:
                row = load_npy_file(self.root / rel, self.expected, self.reference)
                if not np.isfinite(row).all():
                    raise DataValidationError(f"{self.root / rel}: contains NaN or infinity")
            except DataValidationError as exc:
                bad_ids.append(rel)
                reasons.append(str(exc))
                continue
            ids.append(rel)
            rows.append(row)
        if bad_ids:
            pq.write_table(pa.table({"id": bad_ids, "reason": reasons}),
                           Path(self.errors_dir) / f"{uuid.uuid4().hex}.parquet")
        width = self.expected[0][0]
        features = np.stack(rows) if rows else np.zeros((0, width), np.float32)
        return {"id": np.asarray(ids, dtype=object), "features": features}


def _input_rows(source: SourceSpec) -> int:
    """Rows in the source, from file listings and parquet footers (no data read)."""
    from pipeline.sources import _list_npy, _parquet_files

    path = Path(os.path.expanduser(source.path))
    if path.is_dir() and next(path.rglob("*.parquet"), None) is None:
        return len(_list_npy(path))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in _parquet_files(path))


def _read(source: SourceSpec, on_error: str, errors_dir: Path) -> Any:
    import ray

    from pipeline.sources import _first_npy, _list_npy, read_source

    path = Path(os.path.expanduser(source.path))
    is_tree = path.is_dir() and next(path.rglob("*.parquet"), None) is None
    if on_error == "fail" or not is_tree:
        spec = source if on_error == "fail" else SourceSpec(
            source.path, source.column, source.columns, source.id_column, "skip")
        # No select_columns here: a separate projection task would ask for a whole CPU, which
        # actors holding CPU fractions on every node can leave nobody (the Embedder ignores
        # extra columns such as a tree's label).
        return read_source(spec)
    files = _list_npy(path)
    first, expected = _first_npy(path, files)
    items = ray.data.from_items([{"path": p} for p in files],
                                override_num_blocks=max(1, min(256, len(files) // 256)))
    return items.map_batches(_TolerantNpyReader(str(path), expected, str(first), str(errors_dir)),
                             batch_size=256, batch_format="numpy")


def _resolve_model(uri: str) -> tuple[Path, str | None]:
    """(local checkpoint dir, registered version or None) for a model reference."""
    from pipeline.registry import download_checkpoint, resolve_model_uri

    version = None
    if uri.startswith("models:/"):
        name, version = resolve_model_uri(uri)
        uri = f"models:/{name}/{version}"
    return download_checkpoint(uri), version


def write_parquet_atomically(output: Path, overwrite: bool) -> tuple[Path, Any]:
    """A fresh temporary directory beside ``output`` and a function that moves it into place."""
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite (overwrite=True) to "
                                "replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))

    def commit() -> None:
        replace_directory(tmp, output)

    return tmp, commit


def _actor_cpus(num_actors: int) -> float:
    """Leave at least one CPU to the read tasks: actors holding every CPU starve them."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(1.0, (total - 1.0) / max(num_actors, 1)))


def run_bulk_embedding(config: EmbedConfig) -> EmbedSummary:
    """Embed ``config.source`` with ``config.model_uri`` into parquet at ``config.output``."""
    import ray

    from pipeline.tracking import ensure_experiment

    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = config.progress
    started = time.perf_counter()
    output = Path(os.path.abspath(os.path.expanduser(config.output)))
    checkpoint, version = _resolve_model(config.model_uri)
    rows_in = _input_rows(config.source)
    tmp, commit = write_parquet_atomically(output, config.overwrite)
    errors_dir = tmp / "_errors_parts"
    errors_dir.mkdir()
    from pipeline.sources import skipped_nonfinite_rows

    nonfinite_before = skipped_nonfinite_rows()
    try:
        dataset = _read(config.source, config.on_error, errors_dir)
        embedded = dataset.map_batches(
            Embedder, fn_constructor_args=(str(checkpoint), config.with_score, config.use_gpu),
            compute=ray.data.ActorPoolStrategy(size=config.num_actors),
            num_cpus=0 if config.use_gpu else _actor_cpus(config.num_actors),
            num_gpus=1 if config.use_gpu else 0,
            batch_size=config.batch_size, batch_format="numpy")
        with raise_data_errors():
            embedded.write_parquet(str(tmp))
        rows_out = sum(pq.ParquetFile(f).metadata.num_rows for f in tmp.glob("*.parquet"))
        error_parts = sorted(errors_dir.glob("*.parquet"))
        errors = pa.concat_tables([pq.read_table(p) for p in error_parts]) if error_parts else None
        shutil.rmtree(errors_dir)
        # Parquet rows with NaN/inf dropped by the reader in skip mode (counted, logged by id).
        skipped = skipped_nonfinite_rows() - nonfinite_before
        if errors is not None:
            # A retried task may have recorded a file twice: one row per id.
            frame = errors.to_pandas().drop_duplicates("id").sort_values("id")
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / ERRORS)
            skipped += len(frame)
        if rows_out + skipped != rows_in:
            raise RuntimeError(f"Row accounting failed: {rows_in} rows in, {rows_out} written and "
                               f"{skipped} skipped; nothing was written to {output}")
        seconds = time.perf_counter() - started
        summary = EmbedSummary(config.model_uri, version, str(checkpoint), config.source.path,
                               str(output), rows_in, rows_out, skipped, round(seconds, 3),
                               round(rows_out / max(seconds, 1e-9), 1))
        (tmp / MANIFEST).write_text(json.dumps(asdict(summary), indent=2))
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("embedded %d rows (%d skipped) in %.1f s, %.0f rows/s -> %s", rows_out, skipped,
                summary.seconds, summary.rows_per_s, output)
    if config.track:
        summary = _track(config, summary, ensure_experiment(config.experiment))
    return summary


def _track(config: EmbedConfig, summary: EmbedSummary, experiment_id: str) -> EmbedSummary:
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, tags={"cvae.job": "embed"})
    run_id = run.info.run_id
    for key, value in {"model_uri": config.model_uri, "model_version": summary.model_version,
                       "input": config.source.path, "output": summary.output,
                       "batch_size": config.batch_size, "num_actors": config.num_actors,
                       "with_score": config.with_score, "on_error": config.on_error}.items():
        client.log_param(run_id, key, str(value))
    for key in ("rows_in", "rows_out", "rows_skipped", "seconds", "rows_per_s"):
        client.log_metric(run_id, key, float(getattr(summary, key)))
    client.log_artifact(run_id, str(Path(summary.output) / MANIFEST))
    client.set_terminated(run_id, "FINISHED")
    return EmbedSummary(**{**asdict(summary), "mlflow_run_id": run_id})


class Decoder:
    """Ray Data class UDF: latent vectors -> reconstructed features (un-normalized)."""

    def __init__(self, checkpoint_dir: str, column: str, threads: int = 1) -> None:
        import torch

        from cvae_model.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        checkpoint = load_checkpoint(checkpoint_dir)
        self.model = checkpoint.build_model().eval()
        self.normalizer = checkpoint.normalizer
        self.column = column
        self.dim_latent = checkpoint.model_config.dim_latent
        self.dim_feature = checkpoint.model_config.dim_feature

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        z = batch[self.column]
        z = np.stack(z) if z.dtype == object else z
        z = np.asarray(z, dtype=np.float32).reshape(len(batch["id"]), -1)
        if z.shape[1] != self.dim_latent:
            raise DataValidationError(f"column {self.column!r} has {z.shape[1]} latent dimensions; "
                                      f"the model expects {self.dim_latent}")
        with torch.inference_mode():
            x = self.model.decode(torch.from_numpy(np.ascontiguousarray(z))).numpy()
        x = self.normalizer.inverse_transform(x)
        return pa.table({"id": batch["id"], "features": pa.FixedSizeListArray.from_arrays(
            pa.array(x.reshape(-1)), self.dim_feature)})


def run_bulk_decoding(model_uri: str, latents: str, output: str, *, column: str = "embedding",
                      npy_dir: str | None = None, overwrite: bool = False,
                      num_actors: int = 1, batch_size: int = 4096) -> int:
    """Decode a parquet of (id, latent vector) rows into a parquet of (id, features) rows, and
    optionally one ``.npy`` file per id under ``npy_dir``; returns the row count."""
    import ray

    if not ray.is_initialized():
        ray.init()
    checkpoint, _ = _resolve_model(model_uri)
    target = Path(os.path.abspath(os.path.expanduser(output)))
    tmp, commit = write_parquet_atomically(target, overwrite)
    try:
        source = ray.data.read_parquet(os.path.expanduser(latents)).select_columns(["id", column])
        decoded = source.map_batches(
            Decoder, fn_constructor_args=(str(checkpoint), column),
            compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=_actor_cpus(num_actors),
            batch_size=batch_size, batch_format="numpy")
        with raise_data_errors():
            decoded.write_parquet(str(tmp))
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    table = pq.read_table(target)
    if npy_dir is not None:
        folder = Path(os.path.expanduser(npy_dir))
        features = np.stack(table.column("features").to_numpy(zero_copy_only=False))
        for row_id, row in zip(table.column("id").to_pylist(), features, strict=True):
            path = folder / (str(row_id) if str(row_id).endswith(".npy") else f"{row_id}.npy")
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, row.astype(np.float32))
    return table.num_rows
