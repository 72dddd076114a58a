"""Ingestion throughput and memory of ``pipeline.sources`` against plain single-process loops.

In one run, on data it writes into a temporary directory (and deletes):

* rows/s reading a tree of ``--files`` ``.npy`` files (``--dim`` float32 each) with
  ``read_source`` (Ray Data, 2 CPUs) and with a plain ``sorted(glob)`` + ``np.load`` loop;
* rows/s reading a ``--rows``-row parquet data set (fixed_shape_tensor column, 10 files, row
  groups of 16,384 rows) with ``read_source`` and with ``pyarrow.parquet`` ``iter_batches``
  turned into the same float32 (n, d) arrays;
* the peak memory of ``compute_stats`` over the parquet data at ``--rows`` and at a tenth of it,
  each in a fresh subprocess. Memory is the peak of the summed PSS (proportional set size, from
  ``/proc/<pid>/smaps_rollup``, so shared object-store pages are counted once) of the subprocess
  and every descendant (GCS, raylet, Ray workers), sampled every 0.2 s; the driver's own peak
  RSS (``ru_maxrss``) is reported too. Streaming means the ratio should stay near 1.

Each Ray pass is timed from the first ``iter_batches`` call to the last row, on a Ray runtime
that has already run one small dataset (worker start-up excluded). Files are read from the page
cache in both loops (written just before).

    python -m benchmarks.ingest [--files 100000] [--rows 1000000] [--dim 784] [--smoke]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_ROW_GROUP = 16_384
_PARQUET_FILES = 10


# ---------------------------------------------------------------------------- data
def write_npy_tree(root: Path, files: int, dim: int, seed: int = 0) -> None:
    """``files`` float32 (dim,) files in 100 folders."""
    rng = np.random.default_rng(seed)
    for folder in range(min(100, files)):
        (root / f"d{folder:02d}").mkdir(parents=True, exist_ok=True)
    chunk = 4096
    for start in range(0, files, chunk):
        block = rng.random((min(chunk, files - start), dim), dtype=np.float32)
        for offset, row in enumerate(block):
            i = start + offset
            np.save(root / f"d{i % 100:02d}" / f"{i:07d}.npy", row)


def write_parquet(root: Path, rows: int, dim: int, seed: int = 1) -> None:
    """``rows`` rows as ``_PARQUET_FILES`` files of a fixed_shape_tensor column ``x``."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_file = -(-rows // _PARQUET_FILES)
    schema = pa.schema([("x", pa.fixed_shape_tensor(pa.float32(), (dim,)))])
    for part, start in enumerate(range(0, rows, per_file)):
        stop = min(rows, start + per_file)
        with pq.ParquetWriter(root / f"part-{part:03d}.parquet", schema,
                              compression="none") as writer:
            for s in range(start, stop, _ROW_GROUP):
                block = rng.random((min(_ROW_GROUP, stop - s), dim), dtype=np.float32)
                writer.write_table(pa.table(
                    {"x": pa.FixedShapeTensorArray.from_numpy_ndarray(block)}, schema=schema))


# ---------------------------------------------------------------------------- loops
def plain_npy(root: Path) -> int:
    rows = 0
    for path in sorted(glob.glob(f"{root}/**/*.npy", recursive=True)):
        rows += len(np.load(path, allow_pickle=False)[None])
    return rows


def plain_parquet(root: Path) -> int:
    rows = 0
    for path in sorted(root.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROW_GROUP):
            x = batch.column(0).storage.flatten().to_numpy().reshape(batch.num_rows, -1)
            rows += len(x)
    return rows


def ray_rows(path: Path) -> int:
    from pipeline.sources import SourceSpec, raise_data_errors, read_source

    rows = 0
    with raise_data_errors():
        for batch in read_source(SourceSpec(str(path))).iter_batches(batch_size=None,
                                                                     batch_format="numpy"):
            assert batch["features"].dtype == np.float32
            rows += len(batch["features"])
    return rows


def timed(fn: object, *args: object) -> tuple[int, float]:
    start = time.perf_counter()
    rows = fn(*args)  # type: ignore[operator]
    return rows, time.perf_counter() - start


# ---------------------------------------------------------------------------- memory
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pss_bytes(root: int) -> int:
    """Summed PSS of ``root`` and all its descendants."""
    tree, stack, total = _children(), [root], 0
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def stats_child(path: str) -> None:
    """Run in the subprocess: one statistics pass; prints JSON with the driver's peak RSS."""
    import ray

    from pipeline.sources import SourceSpec, read_source
    from pipeline.stats import compute_stats

    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    stats = compute_stats(read_source(SourceSpec(path)))
    seconds = time.perf_counter() - start
    driver_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ray.shutdown()
    print(json.dumps({"rows": stats.count, "seconds": seconds, "driver_rss": driver_kb * 1024}))


def measure_stats(path: Path) -> dict[str, float]:
    """Peak summed PSS of a fresh subprocess tree running ``stats_child(path)``."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ingest", "--stats-child",
                             str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled",
                                            "RAY_USAGE_STATS_ENABLED": "0"})
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"statistics subprocess for {path} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_pss"] = peak[0]
    return result


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help=".npy files to read")
    parser.add_argument("--rows", type=int, default=1_000_000, help="parquet rows to read")
    parser.add_argument("--dim", type=int, default=784, help="float32 features per row")
    parser.add_argument("--smoke", action="store_true", help="2,000 files, 20,000 rows")
    parser.add_argument("--workdir", default=None, help="where to write the data (a temp dir)")
    parser.add_argument("--stats-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stats_child:
        stats_child(args.stats_child)
        return 0
    if args.smoke:
        args.files, args.rows = 2_000, 20_000
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    work = Path(tempfile.mkdtemp(prefix="cvae-ingest-", dir=args.workdir))
    try:
        start = time.perf_counter()
        write_npy_tree(work / "npy", args.files, args.dim)
        write_parquet(work / "parquet", args.rows, args.dim)
        small = work / "parquet" / "part-000.parquet"  # a tenth of the rows
        print(f"wrote {args.files} files and {args.rows} rows in "
              f"{time.perf_counter() - start:.1f} s to {work}", file=sys.stderr)

        results = {}
        results["npy plain"] = timed(plain_npy, work / "npy")
        results["parquet plain"] = timed(plain_parquet, work / "parquet")
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray_rows(small)  # start the workers
        results["npy ray"] = timed(ray_rows, work / "npy")
        results["parquet ray"] = timed(ray_rows, work / "parquet")
        ray.shutdown()
        memory = {"small": measure_stats(small), "full": measure_stats(work / "parquet")}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(key: str) -> float:
        rows, seconds = results[key]
        return rows / seconds

    print(f"\n{args.files:,} .npy files and {args.rows:,} parquet rows, {args.dim} float32 "
          f"features, {os.cpu_count()} CPUs\n")
    print("| source | plain loop rows/s | read_source rows/s | ratio (Ray / plain) |")
    print("|---|---|---|---|")
    for name, label in (("npy", f"{args.files:,} .npy files"),
                        ("parquet", f"{args.rows:,}-row parquet")):
        plain, via_ray = rate(f"{name} plain"), rate(f"{name} ray")
        print(f"| {label} | {plain:,.0f} | {via_ray:,.0f} | {via_ray / plain:.2f} |")
    small, full = memory["small"], memory["full"]
    print("\n| compute_stats over | seconds | peak PSS, driver + Ray (MB) | driver peak RSS (MB) |")
    print("|---|---|---|---|")
    for m in (small, full):
        print(f"| {m['rows']:,} rows | {m['seconds']:.1f} | {m['peak_pss'] / 2**20:,.0f} | "
              f"{m['driver_rss'] / 2**20:,.0f} |")
    print(f"| ratio ({full['rows']:,} / {small['rows']:,}) | | "
          f"{full['peak_pss'] / small['peak_pss']:.2f} | "
          f"{full['driver_rss'] / small['driver_rss']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
