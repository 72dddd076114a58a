"""Bulk decoding: latent vectors (``id`` + a vector column, e.g. a ``cvae embed`` output) back to
features, as a parquet output and optionally one ``.npy`` file per id.

Same shape as ``pipeline.inference``: checks first (model, latent width, unique and non-null ids,
ids that are safe file names, outputs that may be written), then ``DecodeWorker`` actors that
each write their own parquet part and ``.npy`` files; both outputs are published by their
manifests (``pipeline.outputs``). A ``.npy`` output on a local disk is a plain tree
(``NPY_DIR/<id>.npy``) that appears whole; on an object store its files are under the attempt's
prefix named by its manifest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.bulk import actor_resources, record, run_items, write_part
from pipeline.errors import DataValidationError, show_id
from pipeline.inference import load_fitted, read_ids, start_job
from pipeline.outputs import CommittedOutput
from pipeline.sources import SourceSpec
from pipeline.storage import Location
from pipeline.tracking import RunTracker

__all__ = ["DecodeConfig", "DecodeWorker", "npy_relative_path", "run_bulk_decoding"]

logger = logging.getLogger("cvae.decode")


@dataclass(frozen=True)
class DecodeConfig:
    """One bulk-decoding job."""

    model: str
    """models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a logdir or checkpoint."""
    latents: str
    """Parquet (a file, a folder, or a cvae embed output) with an id and a latent-vector column."""
    output: str
    """Output directory for parquet rows (id, features): a path or a URI."""
    column: str = "embedding"
    """The latent-vector column."""
    id_column: str = "id"
    """The id column (ids name the .npy files)."""
    npy_dir: str | None = None
    """Also write one .npy file per id into this new folder (ids become relative paths in it)."""
    batch_size: int = 8192
    """Rows per forward pass (memory only)."""
    num_actors: int = 0
    """Decoding actors; 0: one per CPU of the cluster."""
    use_gpu: bool = False
    """One GPU per actor."""
    overwrite: bool = False
    """Replace existing outputs (only cvae outputs: folders holding their _manifest.json)."""
    experiment: str = "cvae-decode"
    """MLflow experiment of the job's run."""
    track: bool = True
    """Log the job as an MLflow run (best-effort)."""
    progress: bool = True
    """Show rows done, rows/s and ETA while the job runs."""


def npy_relative_path(row_id: Any) -> str:
    """The file of an id inside the ``.npy`` output: ``<id>.npy`` (kept if it ends in ``.npy``).

    Ids that would leave the folder or be ambiguous are refused: empty, absolute, ``.``/``..``
    components, backslashes or NUL.

    Example:
        >>> npy_relative_path("digit3/0042.npy"), npy_relative_path(7)
        ('digit3/0042.npy', '7.npy')
    """
    text = str(row_id.item() if isinstance(row_id, np.generic) else row_id)
    parts = text.split("/")
    if (not text or text.startswith("/") or "\\" in text or "\x00" in text
            or any(p in ("", ".", "..") for p in parts)):
        raise DataValidationError(f"id {show_id(row_id)} cannot name a file inside --npy-dir "
                                  "(empty, absolute, '.'/'..' or backslash); use ids that are "
                                  "relative paths")
    return text if text.endswith(".npy") else f"{text}.npy"


class DecodeWorker:
    """Ray Data class UDF: latent rows -> features (the data's units), a part per item."""

    def __init__(self, files: Any, reader: Any, parts: tuple[Location, str],
                 npy: tuple[Location, str] | None, config: DecodeConfig, threads: int) -> None:
        self.fitted = load_fitted(files, config.use_gpu, threads)
        self.reader, self.parts, self.npy, self.config = reader, parts, npy, config

    def _write_npy(self, ids: np.ndarray, rows: np.ndarray) -> None:
        folder = self.npy[0]
        for row_id, row in zip(ids, rows, strict=True):
            data = io.BytesIO()
            np.save(data, row.astype(np.float32))
            folder.join(npy_relative_path(row_id)).write_bytes(data.getvalue())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        item = {key: values[0] for key, values in batch.items()}
        chunks = list(self.reader.read(item))
        ids = np.concatenate([c.ids for c in chunks])
        latents = np.concatenate([c.features for c in chunks])
        x = self.fitted.decode(latents, self.config.batch_size, name=f"column {self.config.column!r}")
        table = pa.table({"id": ids, "features": pa.FixedSizeListArray.from_arrays(
            pa.array(x.reshape(-1)), self.fitted.dim_feature)})
        path = write_part(table, *self.parts, int(item["index"])) if len(x) else ""
        if self.npy is not None:
            self._write_npy(ids, x)
        return record(path, len(x), sum(c.rows_in for c in chunks), [])


def run_bulk_decoding(config: DecodeConfig) -> dict[str, Any]:
    """Decode ``config.latents`` into parquet at ``config.output`` (and ``.npy`` files); the
    summary (also the output's manifest). Nothing is published unless every row is written."""
    import ray

    started = time.perf_counter()
    source = SourceSpec(config.latents, column=config.column, id_column=config.id_column)
    model, opened, output = start_job(config.model, source, config.output, config.overwrite,
                                      "dim_latent")
    npy_output = None
    if config.npy_dir is not None:
        ids = read_ids(opened)
        if ids.null_count:
            first = ids.is_null().to_numpy(zero_copy_only=False).argmax()
            raise DataValidationError(f"{opened.location.uri}: the id of row {first} is null; "
                                      "every .npy file needs an id to name it")
        for row_id in ids.to_pylist():
            npy_relative_path(row_id)  # refuse unsafe ids before anything is written
        npy_output = CommittedOutput(config.npy_dir, overwrite=config.overwrite, flat=True,
                                     inputs=[opened.location.uri, output.target.uri])
    tracker = RunTracker(enabled=config.track).start(config.experiment, tags={"cvae.job": "decode"})
    with tracker, output, (npy_output or contextlib.nullcontext()):
        tracker.log_params({**asdict(config), "model_version": model.version})
        actors, cpus, threads = actor_resources(config.num_actors, len(opened.items), config.use_gpu)
        npy = (npy_output.parts, npy_output.parts_path) if npy_output else None
        result = run_items(opened.items, DecodeWorker,
                           (ray.put(model.files), opened.reader, (output.parts, output.parts_path),
                            npy, config, threads),
                           actors=actors, cpus=cpus, use_gpu=config.use_gpu,
                           total_rows=opened.rows, desc="cvae decode", progress=config.progress)
        if result.rows_out != opened.rows:
            raise RuntimeError(f"Row accounting failed: {opened.rows} rows in, {result.rows_out} "
                               "written; nothing was published")
        seconds = time.perf_counter() - started
        summary = {"model": config.model, "model_name": model.name, "model_version": model.version,
                   "input": opened.location.uri, "output": output.target.uri,
                   "npy_dir": npy_output.target.uri if npy_output else None,
                   "rows": result.rows_out, "seconds": round(seconds, 3),
                   "rows_per_s": round(result.rows_out / max(seconds, 1e-9), 1)}
        if npy_output is not None:
            npy_output.commit({**summary, "kind": "npy", "tree": npy_output.parts_path, "parts": []})
        output.commit({**summary, "parts": result.parts})
        tracker.log_metrics({"rows": result.rows_out, "seconds": seconds}, 0)
    return {**summary, "mlflow_run_id": tracker.run_id}

