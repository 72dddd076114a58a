"""Bulk embedding throughput and memory: the Ray Data job against a plain loop, in one run.

Writes N rows x 784 float32 features as parquet (fixed_shape_tensor column, several files),
trains nothing (a default 784->2 model with its initial weights embeds at the same cost), then:

- plain: one process, ``pyarrow.parquet`` row groups -> normalize -> ``model.embed`` (torch with
  all cores) -> ``pyarrow.parquet.write_table``;
- job: ``pipeline.inference.run_bulk_embedding`` on a local Ray runtime with the same cores.

The job's time is its own (model resolution, reading, embedding, writing, row accounting);
starting the local Ray runtime (about 4 s here) is excluded. Peak memory is the largest sum of
RSS over the job's process tree (the driver and every Ray process it started), sampled every
0.1 s in a fresh process per size; shared object-store pages count once per process mapping
them, so this is an upper bound.

    python -m benchmarks.bulk_embed [--rows 1000000] [--small-rows 100000] [--smoke]
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
from pathlib import Path

import numpy as np

D = 784


def write_data(folder: Path, rows: int, files: int = 8) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_file = -(-rows // files)
    for f in range(files):
        start, stop = f * per_file, min(rows, (f + 1) * per_file)
        if start >= stop:
            break
        x = rng.random((stop - start, D), dtype=np.float32) * 255
        pq.write_table(pa.table({"id": np.arange(start, stop, dtype=np.int64),
                                 "features": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}),
                       folder / f"part-{f:03d}.parquet", row_group_size=16384)


def make_model(folder: Path) -> Path:
    import torch

    from cvae_model.checkpoint import Checkpoint, TrainState, save_checkpoint
    from cvae_model.config import ModelConfig
    from cvae_model.normalization import Normalizer
    from cvae_model.vae import VAE

    torch.manual_seed(0)
    config = ModelConfig(dim_feature=D, dim_latent=2)
    normalizer = Normalizer(np.full(D, 127.5, np.float32), np.full(D, 73.6, np.float32))
    return save_checkpoint(Checkpoint(config, VAE(config).state_dict(), normalizer, TrainState()),
                           folder / "model")


def plain_loop(data: Path, model_dir: Path, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cvae_model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(model_dir)
    model = checkpoint.build_model().eval()
    mean, scale = torch.from_numpy(checkpoint.normalizer.mean), torch.from_numpy(checkpoint.normalizer.scale)
    out.mkdir(parents=True)
    rows = 0
    for i, path in enumerate(sorted(data.glob("*.parquet"))):
        file = pq.ParquetFile(path)
        for group in range(file.metadata.num_row_groups):
            table = file.read_row_group(group)
            x = table.column("features").combine_chunks().to_numpy_ndarray()
            with torch.inference_mode():
                z = model.embed((torch.from_numpy(x) - mean) / scale).numpy()
            pq.write_table(pa.table({"id": table.column("id"), "embedding":
                                     pa.FixedSizeListArray.from_arrays(pa.array(z.ravel()), 2)}),
                           out / f"{i}-{group}.parquet")
            rows += len(z)
    return rows


def job(data: Path, model_dir: Path, out: Path, actors: int) -> tuple[int, float]:
    """Rows and the job's own seconds (from its summary: Ray's start-up excluded)."""
    import ray

    from pipeline.inference import EmbedConfig, run_bulk_embedding
    from pipeline.sources import SourceSpec

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=2 * 1024**3, log_to_driver=False)
    summary = run_bulk_embedding(EmbedConfig(str(model_dir), SourceSpec(str(data), column="features",
                                                                        id_column="id"),
                                             str(out), num_actors=actors, batch_size=8192,
                                             track=False, progress=False))
    ray.shutdown()
    return summary.rows_out, summary.seconds


def child(mode: str, data: Path, model_dir: Path, out: Path, actors: int) -> None:
    """Run one mode in this (fresh) process, sampling the process tree's RSS."""
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
    start = time.perf_counter()
    if mode == "plain":
        rows = plain_loop(data, model_dir, out)
        seconds = time.perf_counter() - start
    else:
        rows, seconds = job(data, model_dir, out, actors)
    stop.set()
    thread.join()
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss": peak[0]}))


def run_child(mode: str, data: Path, model_dir: Path, out: Path, actors: int) -> dict[str, float]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bulk_embed", "--child", mode,
                           str(data), str(model_dir), str(out), str(actors)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=100_000)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="20k and 2k rows")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, data, model_dir, out, actors = args.child
        child(mode, Path(data), Path(model_dir), Path(out), int(actors))
        return
    big, small = (20_000, 2_000) if args.smoke else (args.rows, args.small_rows)
    work = Path(tempfile.mkdtemp(prefix="cvae_bulk_"))
    try:
        model_dir = make_model(work)
        results = {}
        for rows in (small, big):
            write_data(work / f"data{rows}", rows)
            for mode in ("plain", "job"):
                results[(mode, rows)] = run_child(mode, work / f"data{rows}", model_dir,
                                                  work / "out", args.actors)
            shutil.rmtree(work / f"data{rows}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{big:,} rows x {D} float32 parquet, default 784->2 model, {os.cpu_count()} CPUs, "
          f"{args.actors} embedding actor(s)")
    print()
    print("| | rows | seconds | rows/s | peak RSS (GiB) |")
    print("|---|---|---|---|---|")
    for (mode, rows), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {mode} | {rows:,} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
              f"{r['peak_rss'] / 2**30:.2f} |")
    job_rate = results[("job", big)]["rows"] / results[("job", big)]["seconds"]
    plain_rate = results[("plain", big)]["rows"] / results[("plain", big)]["seconds"]
    print()
    print(f"job rows/s over plain rows/s at {big:,} rows: {job_rate / plain_rate:.2f} (goal >= 0.8)")
    print(f"job peak RSS at {big:,} over {small:,} rows: "
          f"{results[('job', big)]['peak_rss'] / results[('job', small)]['peak_rss']:.2f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
