"""Bulk embedding of parquet: the Ray Data job against the strong plain loop, in one run.

Writes ``--rows`` rows x 784 float32 features as parquet (an ``id`` int64 column and a
``fixed_shape_tensor`` ``features`` column, ``--files`` files, row groups of ``--row-group``
rows), saves a default 784->2 model with its initial weights (it embeds at the same cost as a
trained one) and then, each mode in a fresh process, alternating ``--repeats`` times:

- plain: what a competent user writes in one process with every core given to torch:
  ``pyarrow.parquet.ParquetFile.iter_batches(batch_size=8192)`` -> the features as a zero-copy
  float32 (n, 784) view -> ``FittedModel.embed`` (what ``CompressionVAE.embed`` runs) ->
  ``pyarrow.parquet.ParquetWriter`` (one output file per input file);
- plain, 1 thread: the same loop with ``torch.set_num_threads(1)``. On a machine that other
  work shares, torch's two threads stall whenever the other core is busy and one thread can be
  faster; the ratio is taken against the faster of the two plain loops (the strong baseline);
- job: ``pipeline.inference.run_bulk_embedding`` (Ray Data, actors that read, embed and write
  their own parts) on a local Ray runtime with the same cores (``--actors 0``: the job's default);
- plain, CUDA (only where ``--modes`` names it): the plain loop with the model on the GPU, each
  8,192-row batch copied there and its embedding back.

``--modes`` picks the modes (default: the first three); without ``job`` no Ray is needed.

The job's time is its own summary's (model resolution, listing, id check, actor start-up,
reading, embedding, writing, the manifest); starting the local Ray runtime is shown apart ("Ray
start s"): a cluster is started once for many jobs. The plain loop's time runs from loading the
model to the last file written. Imports are excluded from both. Peak memory is the largest sum of
RSS over the mode's process tree (the driver and every Ray process it started), sampled every
0.1 s; shared object-store pages count once per process mapping them, so it is an upper bound.

    .venv/bin/python -m benchmarks.bulk_embed [--rows 1000000] [--repeats 2] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

D = 784
BATCH = 8192
"""Rows per ``iter_batches`` batch in the plain loop, and per forward pass in both."""


# ---------------------------------------------------------------------------- shared helpers
def load_text() -> str:
    """The 1, 5 and 15 minute load averages, for the tables' notes."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def make_model(folder: Path, dim_feature: int, scale: float = 1.0) -> Path:
    """A default ``dim_feature`` -> 2 model with its initial weights, saved as a checkpoint."""
    import torch

    from cvae_model.checkpoint import Checkpoint, TrainState, save_checkpoint
    from cvae_model.config import ModelConfig
    from cvae_model.normalization import Normalizer
    from cvae_model.vae import VAE

    torch.manual_seed(0)
    config = ModelConfig(dim_feature=dim_feature, dim_latent=2)
    normalizer = Normalizer(np.full(dim_feature, 0.5 * scale, np.float32),
                            np.full(dim_feature, 0.29 * scale, np.float32))
    return save_checkpoint(Checkpoint(config, VAE(config).state_dict(), normalizer, TrainState()),
                           folder / "model")


def run_job(source: Any, model_dir: Path, out: Path, actors: int) -> dict[str, float]:
    """Start a local Ray runtime with this machine's cores and run the embedding job once."""
    import ray

    from pipeline.inference import EmbedConfig, run_bulk_embedding

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=2 * 1024**3, log_to_driver=False)
    ray_start = time.perf_counter() - start
    summary = run_bulk_embedding(source, EmbedConfig(str(model_dir), str(out), num_actors=actors,
                                                     batch_size=BATCH, track=False,
                                                     progress=False))
    ray.shutdown()
    return {"rows": summary.rows_out, "seconds": summary.seconds, "ray_start": ray_start}


def sampled(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``fn()``'s result plus ``peak_rss``: the largest summed RSS of this process tree."""
    import psutil

    me = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    return {**result, "peak_rss": peak[0]}


def run_child(module: str, args: list[str]) -> dict[str, float]:
    """Run ``python -m module --child ARGS`` in a fresh process; its last stdout line as JSON."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", module, "--child", *args],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{module} {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, list[dict[str, float]]], unit: str) -> float | None:
    """The side-by-side table (medians over repeats); returns the job's rate over the faster
    CPU plain loop's (None without a job)."""
    repeats = len(next(iter(results.values())))
    print(f"| mode | {unit} | seconds (median of {repeats}) | {unit}/s "
          "| all runs' seconds | Ray start s | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|")
    rates = {}
    for mode, runs in results.items():
        seconds = float(np.median([r["seconds"] for r in runs]))
        rates[mode] = runs[0]["rows"] / seconds
        ray_start = "-" if mode != "job" else f"{np.median([r['ray_start'] for r in runs]):.1f}"
        print(f"| {mode} | {int(runs[0]['rows']):,} | {seconds:.1f} | {rates[mode]:,.0f} | "
              f"{', '.join(format(r['seconds'], '.1f') for r in runs)} | {ray_start} | "
              f"{max(r['peak_rss'] for r in runs) / 2**30:.2f} |")
    plain = [rate for mode, rate in rates.items() if mode.startswith("plain") and "CUDA" not in mode]
    return rates["job"] / max(plain) if "job" in rates and plain else None


# ---------------------------------------------------------------------------- parquet
def write_data(folder: Path, rows: int, files: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_file = -(-rows // files)
    for f in range(files):
        start, stop = f * per_file, min(rows, (f + 1) * per_file)
        if start >= stop:
            break
        with pq.ParquetWriter(folder / f"part-{f:03d}.parquet", pa.schema([
                ("id", pa.int64()), ("features", pa.fixed_shape_tensor(pa.float32(), (D,)))])) as w:
            for s in range(start, stop, row_group):
                e = min(stop, s + row_group)
                x = rng.random((e - s, D), dtype=np.float32)
                w.write_table(pa.table({"id": np.arange(s, e, dtype=np.int64),
                                        "features": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}))


def plain_loop(data: Path, model_dir: Path, out: Path, device: str = "cpu") -> dict[str, float]:
    """The strong plain loop (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cvae_model.checkpoint import load_checkpoint
    from cvae_model.fitted import FittedModel

    start = time.perf_counter()
    fitted = FittedModel.from_checkpoint(load_checkpoint(model_dir), device)
    out.mkdir(parents=True)
    schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), 2))])
    rows = 0
    for path in sorted(data.glob("*.parquet")):
        with pq.ParquetWriter(out / path.name, schema) as writer:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH,
                                                           columns=["id", "features"]):
                x = batch.column("features").storage.values.to_numpy().reshape(batch.num_rows, D)
                z = fitted.embed(x, BATCH)
                writer.write_batch(pa.record_batch(
                    [batch.column("id"), pa.FixedSizeListArray.from_arrays(z.reshape(-1), 2)],
                    schema=schema))
                rows += len(z)
    return {"rows": rows, "seconds": time.perf_counter() - start}


MODES = ("plain", "plain, 1 thread", "job", "plain, CUDA")
MODE_FLAGS = dict(zip(("plain", "plain-1-thread", "job", "plain-cuda"), MODES, strict=True))
"""``--modes`` names of the modes (the table shows the names of MODES)."""
DEFAULT_MODES = MODES[:3]


def child(mode: str, data: str, model_dir: str, out: str, actors: str) -> None:
    """One mode in this fresh process; prints its result as JSON."""
    if mode.startswith("plain"):
        if mode == "plain, 1 thread":
            import torch

            torch.set_num_threads(1)
        device = "cuda" if mode == "plain, CUDA" else "cpu"
        result = sampled(lambda: plain_loop(Path(data), Path(model_dir), Path(out), device))
    else:
        from pipeline.sources import SourceSpec

        source = SourceSpec(data, column="features", id_column="id")
        result = sampled(lambda: run_job(source, Path(model_dir), Path(out), int(actors)))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--row-group", type=int, default=16_384)
    parser.add_argument("--repeats", type=int, default=2, help="alternations of plain and job")
    parser.add_argument("--actors", type=int, default=0, help="embedding actors (0: the job's default)")
    parser.add_argument("--workdir", default=None, help="parent of the temporary data folder")
    parser.add_argument("--smoke", action="store_true", help="20,000 rows, one repeat")
    parser.add_argument("--modes", default="plain,plain-1-thread,job",
                        help=f"comma-separated modes, of: {','.join(MODE_FLAGS)}")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.smoke:
        args.rows, args.repeats = 20_000, 1
    unknown = set(args.modes.split(",")) - set(MODE_FLAGS)
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}; expected some of "
                     f"{','.join(MODE_FLAGS)}")
    modes = [MODE_FLAGS[flag] for flag in args.modes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cvae_bulk_", dir=args.workdir))
    loads = [load_text()]
    try:
        model_dir = make_model(work, D)
        write_data(work / "data", args.rows, args.files, args.row_group)
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                results[mode].append(run_child("benchmarks.bulk_embed", [
                    mode, str(work / "data"), str(model_dir), str(work / "out"), str(args.actors)]))
                shutil.rmtree(work / "out", ignore_errors=True)
                loads.append(load_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.rows:,} rows x {D} float32 parquet ({args.files} files, row groups of "
          f"{args.row_group:,}), default 784->2 model, {os.cpu_count()} CPUs, "
          f"actors: {args.actors or 'the job default'}; load average (1/5/15 min) before and "
          f"after each run: {' -> '.join(loads)}")
    print()
    ratio = print_table(results, "rows")
    if ratio is not None:
        print()
        print(f"job rows/s over the faster plain loop's rows/s: {ratio:.2f} (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
