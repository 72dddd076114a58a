"""Bulk embedding: a Ray Data job that embeds a data set with a trained model into parquet.

The driver resolves the model reference once (``models:/NAME@ALIAS`` to a version and a local
checkpoint), reads the source with ``pipeline.sources``, and maps batches through ``Embedder``,
a class UDF that loads the model once per actor. Output goes to a temporary directory beside
the target and is renamed into place only when complete and its rows are accounted for:

    OUTPUT/*.parquet        id, embedding (fixed_size_list<float32>[k]) [, neg_elbo, reconstruction_error]
    OUTPUT/_manifest.json   model (uri, name, version, checkpoint), input, rows, seconds, rows/s
    OUTPUT/_errors.parquet  id, reason: files skipped with on_error="skip" (only when any were)

The model travels to the actors as the checkpoint's bytes in Ray's object store, so actors on
other nodes need neither the driver's filesystem nor access to the MLflow store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvae_model.checkpoint import CHECKPOINT_FILES, replace_directory
from pipeline.sources import (READ_TASK_CPUS, DataValidationError, SourceSpec,
                              raise_data_errors)

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
    score_samples: int = 8
    """Monte-Carlo samples per row for ``neg_elbo``."""
    score_seed: int = 0
    """Seed of the Monte-Carlo noise: the same for every row, batch and actor, so a row's score
    does not depend on batching, ordering or the number of actors."""
    overwrite: bool = False
    on_error: Literal["fail", "skip"] = "fail"
    """A bad .npy file: fail naming it, or record it in _errors.parquet and go on."""
    experiment: str = "cvae-embed"
    track: bool = True
    """Log the job as an MLflow run of its own."""
    progress: bool = True
    """Show Ray Data's progress bars and log rows written and rows/s every ``progress_every_s``."""
    progress_every_s: float = 10.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_actors < 1 or self.score_samples < 1:
            raise ValueError(f"batch_size, num_actors and score_samples must be >= 1, got "
                             f"{self.batch_size}, {self.num_actors}, {self.score_samples}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")


@dataclass(frozen=True)
class EmbedSummary:
    """What a job did; also written as ``_manifest.json`` (without ``mlflow_run_id``)."""

    model_uri: str
    model_name: str | None
    """The registered model's name (models:/ URIs), else None."""
    model_version: str | None
    """The registered version a models:/ URI resolved to (aliases included), else None."""
    checkpoint: str
    """The checkpoint directory the driver resolved (a download for models:/ and runs:/)."""
    input: str
    source: dict[str, Any]
    output: str
    rows_in: int
    rows_out: int
    rows_skipped: int
    seconds: float
    rows_per_s: float
    with_score: bool = False
    mlflow_run_id: str | None = None


def _read_checkpoint_files(checkpoint: Path) -> dict[str, bytes]:
    return {name: (checkpoint / name).read_bytes() for name in sorted(CHECKPOINT_FILES)}


def _load_model(files: Any) -> Any:
    """A checkpoint from its files' bytes, an object ref to them, or a local directory."""
    import ray

    from cvae_model.checkpoint import load_checkpoint

    if isinstance(files, str):
        return load_checkpoint(files)
    if isinstance(files, ray.ObjectRef):  # Ray Data passes constructor args through unresolved
        files = ray.get(files)
    with tempfile.TemporaryDirectory(prefix="cvae-actor-model-") as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        return load_checkpoint(folder)


class Embedder:
    """Ray Data class UDF: loads the model once per actor, embeds batches of features.

    ``checkpoint`` is the checkpoint's files as bytes, an object ref to them (as
    ``run_bulk_embedding`` ships them) or a local checkpoint directory. With ``with_score`` it adds ``neg_elbo`` (reconstruction + KL,
    averaged over ``score_samples`` Monte-Carlo draws from a fixed seed, the same draws for every
    row) and ``reconstruction_error`` (the reconstruction term at the posterior mean).
    """

    def __init__(self, checkpoint: Any, with_score: bool = False,
                 use_gpu: bool = False, threads: int = 1, score_samples: int = 8,
                 score_seed: int = 0) -> None:
        import torch

        torch.set_num_threads(threads)  # actors share the node's cores
        loaded = _load_model(checkpoint)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = loaded.build_model().to(self.device).eval()
        self.mean = torch.from_numpy(loaded.normalizer.mean).to(self.device)
        self.scale = torch.from_numpy(loaded.normalizer.scale).to(self.device)
        self.with_score = with_score
        self.dim_latent = loaded.model_config.dim_latent
        generator = torch.Generator().manual_seed(score_seed)
        self.score_eps = torch.randn((score_samples, self.dim_latent),
                                     generator=generator).to(self.device)

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
                at_mean = self.model(x, 1.0, torch.zeros_like(z))
                neg_elbo = torch.zeros(len(x), dtype=z.dtype, device=self.device)
                for eps in self.score_eps:
                    out = self.model(x, 1.0, eps.expand_as(z))
                    neg_elbo += out.recon + out.kl
                columns["neg_elbo"] = (neg_elbo / len(self.score_eps)).cpu().numpy()
                columns["reconstruction_error"] = at_mean.recon.cpu().numpy()
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
    if not path.exists():
        raise FileNotFoundError(f"No such file or directory: {path.absolute()} (the data path)")
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
    # The reference (shape, dtype) is the first file that loads; unreadable ones before it are
    # recorded like any other bad file.
    bad: list[tuple[str, str]] = []
    for start, name in enumerate(files):
        try:
            first, expected = _first_npy(path, files[start:])
            break
        except DataValidationError as exc:
            bad.append((name, str(exc)))
    else:
        raise DataValidationError(f"{path}: none of the {len(files)} .npy files could be read; "
                                  f"the first: {bad[0][1]}")
    if bad:
        pq.write_table(pa.table({"id": [b[0] for b in bad], "reason": [b[1] for b in bad]}),
                       errors_dir / "reference.parquet")
        files = files[len(bad):]
    items = ray.data.from_items([{"path": p} for p in files],
                                override_num_blocks=max(1, min(256, len(files) // 256)))
    # An instance (plain tasks), with the sources' fractional read CPUs: reads must fit beside
    # the actors' CPU fractions on every node.
    return items.map_batches(_TolerantNpyReader(str(path), expected, str(first), str(errors_dir)),
                             batch_size=256, batch_format="numpy", num_cpus=READ_TASK_CPUS)


@dataclass(frozen=True)
class _ResolvedModel:
    checkpoint: Path
    name: str | None
    version: str | None
    download_dir: Path | None
    """A temporary download to delete when the job ends (models:/ and runs:/ URIs)."""

    def cleanup(self) -> None:
        if self.download_dir is not None:
            shutil.rmtree(self.download_dir, ignore_errors=True)


def _resolve_model(uri: str) -> _ResolvedModel:
    """The local checkpoint for a model reference, and the registered name and version.

    A models:/ alias is resolved once, here, so every actor embeds with the same version even
    if the alias moves while the job runs.
    """
    from pipeline.registry import download_checkpoint, resolve_model_uri

    if "://" not in uri and ":/" not in uri:
        return _ResolvedModel(download_checkpoint(uri), None, None, None)
    name = version = None
    if uri.startswith("models:/"):
        name, version = resolve_model_uri(uri)
        uri = f"models:/{name}/{version}"
    folder = Path(tempfile.mkdtemp(prefix="cvae-embed-model-"))
    try:
        return _ResolvedModel(download_checkpoint(uri, folder), name, version, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def write_parquet_atomically(output: Path, overwrite: bool) -> tuple[Path, Any]:
    """A fresh temporary directory beside ``output`` and a function that moves it into place."""
    _check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))

    def commit() -> None:
        replace_directory(tmp, output)

    return tmp, commit


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite (overwrite=True) to "
                                "replace it")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is not a directory; not replacing it")


def _actor_cpus(num_actors: int) -> float:
    """Leave at least one CPU to the read tasks: actors holding every CPU starve them."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(1.0, (total - 1.0) / max(num_actors, 1)))


class _ProgressLogger:
    """Logs rows written so far and rows/s, from the footers of finished parquet files."""

    def __init__(self, folder: Path, rows_in: int, every_s: float) -> None:
        self.folder, self.rows_in, self.every_s = folder, rows_in, every_s
        self.counted: dict[str, int] = {}
        self.started = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cvae-embed-progress", daemon=True)

    def __enter__(self) -> _ProgressLogger:
        if self.every_s > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            for file in self.folder.glob("*.parquet"):
                if file.name not in self.counted:
                    try:  # a file being written has no footer yet
                        self.counted[file.name] = pq.ParquetFile(file).metadata.num_rows
                    except Exception:  # noqa: BLE001 - counted on a later tick
                        continue
            rows = sum(self.counted.values())
            seconds = time.perf_counter() - self.started
            logger.info("%d / %d rows written (%.0f%%), %.0f rows/s", rows, self.rows_in,
                        100 * rows / max(self.rows_in, 1), rows / max(seconds, 1e-9))


def _start_run(config: EmbedConfig, model: _ResolvedModel) -> str:
    """An MLflow run for this job, with its parameters; finished by ``_end_run``."""
    import mlflow

    from pipeline.tracking import ensure_experiment

    experiment_id = ensure_experiment(config.experiment)
    client = mlflow.MlflowClient()
    run_id = client.create_run(experiment_id, tags={"cvae.job": "embed"}).info.run_id
    params = {"model_uri": config.model_uri, "model_name": model.name,
              "model_version": model.version, "checkpoint": str(model.checkpoint),
              "input": config.source.path, "source": json.dumps(asdict(config.source)),
              "output": os.path.abspath(os.path.expanduser(config.output)),
              "batch_size": config.batch_size, "num_actors": config.num_actors,
              "use_gpu": config.use_gpu, "with_score": config.with_score,
              "on_error": config.on_error}
    for key, value in params.items():
        client.log_param(run_id, key, str(value))
    return run_id


def _end_run(run_id: str, summary: EmbedSummary | None) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    if summary is None:
        client.set_terminated(run_id, "FAILED")
        return
    for key in ("rows_in", "rows_out", "rows_skipped", "seconds", "rows_per_s"):
        client.log_metric(run_id, key, float(getattr(summary, key)))
    client.log_artifact(run_id, str(Path(summary.output) / MANIFEST))
    if (Path(summary.output) / ERRORS).exists():
        client.log_artifact(run_id, str(Path(summary.output) / ERRORS))
    client.set_terminated(run_id, "FINISHED")


def _collect_errors(errors_dir: Path) -> pa.Table | None:
    """One row per skipped file (a retried task may have recorded a file twice), by id."""
    parts = sorted(errors_dir.glob("*.parquet"))
    if not parts:
        return None
    frame = pa.concat_tables([pq.read_table(p) for p in parts]).to_pandas()
    frame = frame.drop_duplicates("id").sort_values("id")
    return pa.Table.from_pandas(frame, preserve_index=False)


def _embed_into(config: EmbedConfig, model: _ResolvedModel, tmp: Path, rows_in: int) -> int:
    """Run the Ray Data pipeline into ``tmp``; the rows written."""
    import ray

    from pipeline.sources import skipped_nonfinite_rows

    errors_dir = tmp / "_errors_parts"
    errors_dir.mkdir()
    nonfinite_before = skipped_nonfinite_rows()
    dataset = _read(config.source, config.on_error, errors_dir)
    embedded = dataset.map_batches(
        Embedder,
        fn_constructor_args=(ray.put(_read_checkpoint_files(model.checkpoint)),
                             config.with_score, config.use_gpu),
        fn_constructor_kwargs={"score_samples": config.score_samples,
                               "score_seed": config.score_seed},
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=0 if config.use_gpu else _actor_cpus(config.num_actors),
        num_gpus=1 if config.use_gpu else 0,
        batch_size=config.batch_size, batch_format="numpy")
    with raise_data_errors(), _ProgressLogger(tmp, rows_in, config.progress_every_s
                                              if config.progress else 0):
        embedded.write_parquet(str(tmp))
    rows_out = sum(pq.ParquetFile(f).metadata.num_rows for f in tmp.glob("*.parquet"))
    errors = _collect_errors(errors_dir)
    shutil.rmtree(errors_dir)
    # Parquet rows with NaN/inf dropped by the reader in skip mode (counted; logged by id).
    skipped = skipped_nonfinite_rows() - nonfinite_before
    if errors is not None:
        pq.write_table(errors, tmp / ERRORS)
        skipped += errors.num_rows
        logger.warning("skipped %d bad file(s), listed in %s: %s", errors.num_rows, ERRORS,
                       ", ".join(errors.column("id").to_pylist()[:5]))
    if rows_out + skipped != rows_in:
        raise RuntimeError(f"Row accounting failed: {rows_in} rows in, {rows_out} written and "
                           f"{skipped} skipped; nothing was written to {config.output}")
    return rows_out


def run_bulk_embedding(config: EmbedConfig) -> EmbedSummary:
    """Embed ``config.source`` with ``config.model_uri`` into parquet at ``config.output``.

    The output directory appears only when complete, with every input row accounted for
    (written, or skipped and listed); a failed or killed job leaves at most a hidden
    ``.NAME.tmp-*`` directory beside it. Raises ``OutputExistsError`` (output exists, no
    ``overwrite``), ``DataValidationError`` (a bad file or row, named) and
    ``pipeline.registry.ModelNotFoundError``.
    """
    import ray

    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = config.progress
    started = time.perf_counter()
    output = Path(os.path.abspath(os.path.expanduser(config.output)))
    _check_output(output, config.overwrite)  # before any download or MLflow run
    model = _resolve_model(config.model_uri)
    run_id = None
    summary = None
    try:
        rows_in = _input_rows(config.source)
        logger.info("embedding %d rows of %s with %s (%s) -> %s", rows_in, config.source.path,
                    config.model_uri, f"{model.name} version {model.version}" if model.version
                    else model.checkpoint, output)
        run_id = _start_run(config, model) if config.track else None
        tmp, commit = write_parquet_atomically(output, config.overwrite)
        try:
            rows_out = _embed_into(config, model, tmp, rows_in)
            seconds = time.perf_counter() - started
            summary = EmbedSummary(
                model_uri=config.model_uri, model_name=model.name, model_version=model.version,
                checkpoint=str(model.checkpoint), input=config.source.path,
                source=asdict(config.source), output=str(output), rows_in=rows_in,
                rows_out=rows_out, rows_skipped=rows_in - rows_out, seconds=round(seconds, 3),
                rows_per_s=round(rows_out / max(seconds, 1e-9), 1),
                with_score=config.with_score)
            manifest = {k: v for k, v in asdict(summary).items() if k != "mlflow_run_id"}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            commit()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        if run_id is not None:
            _end_run(run_id, None)
        raise
    finally:
        model.cleanup()
    logger.info("embedded %d rows (%d skipped) in %.1f s, %.0f rows/s -> %s", summary.rows_out,
                summary.rows_skipped, summary.seconds, summary.rows_per_s, output)
    if run_id is not None:
        _end_run(run_id, summary)
        summary = EmbedSummary(**{**asdict(summary), "mlflow_run_id": run_id})
    return summary


class Decoder:
    """Ray Data class UDF: latent vectors -> reconstructed features (un-normalized)."""

    def __init__(self, checkpoint: Any, column: str, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        checkpoint = _load_model(checkpoint)
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
    target = Path(os.path.abspath(os.path.expanduser(output)))
    _check_output(target, overwrite)
    model = _resolve_model(model_uri)
    try:
        tmp, commit = write_parquet_atomically(target, overwrite)
        try:
            source = ray.data.read_parquet(os.path.expanduser(latents)).select_columns(
                ["id", column])
            decoded = source.map_batches(
                Decoder, fn_constructor_args=(ray.put(_read_checkpoint_files(model.checkpoint)),
                                              column),
                compute=ray.data.ActorPoolStrategy(size=num_actors),
                num_cpus=_actor_cpus(num_actors), batch_size=batch_size, batch_format="numpy")
            with raise_data_errors():
                decoded.write_parquet(str(tmp))
            commit()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        model.cleanup()
    table = pq.read_table(target)
    if npy_dir is not None:
        folder = Path(os.path.expanduser(npy_dir))
        features = np.stack(table.column("features").to_numpy(zero_copy_only=False))
        for row_id, row in zip(table.column("id").to_pylist(), features, strict=True):
            path = folder / (str(row_id) if str(row_id).endswith(".npy") else f"{row_id}.npy")
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, row.astype(np.float32))
    return table.num_rows
