"""Ingestion: bulk embedding of a ``.npy`` tree against the strong plain loop, and the readers.

In one run, on data it writes into a temporary directory (and deletes), each part optional
(``--parts``):

* ``embed``: a tree of ``--files`` ``.npy`` files (``--dim`` float32 each, in 100 folders),
  embedded with a default ``--dim`` -> 2 model, each mode in a fresh process, alternated
  ``--repeats`` times:

  - plain: what a competent user writes in one process: ``sorted(glob("**/*.npy"))``,
    ``np.load`` per file, ``FittedModel.embed`` per 4,096 rows (torch with every core), one
    parquet file of (id = the path under the root, embedding); and the same with one torch
    thread (the ratio is taken against the faster of the two);
  - job: ``pipeline.inference.run_bulk_embedding`` on a local Ray runtime with the same cores
    (its time is its own summary's; starting Ray is shown apart), as in
    ``benchmarks/bulk_embed.py``;

* ``read``: rows/s reading a tree of ``--read-files`` files and a ``--rows``-row parquet data
  set (fixed_shape_tensor column, 10 files, row groups of 16,384 rows) with ``read_source``
  (Ray Data, 2 CPUs, consumed in the driver) and with plain single-process loops;
* ``memory``: the peak memory of ``compute_stats`` over the parquet data at ``--rows`` and at a
  tenth of it, each in a fresh subprocess. Memory is the peak of the summed PSS (proportional set
  size, from ``/proc/<pid>/smaps_rollup``, so shared object-store pages are counted once) of the
  subprocess and every descendant (GCS, raylet, Ray workers), sampled every 0.2 s; the driver's
  own peak RSS (``ru_maxrss``) is reported too. Streaming means the ratio should stay near 1.

Each ``read`` pass is timed from the first ``iter_batches`` call to the last row, on a Ray
runtime that has already run one small dataset (worker start-up excluded). Files are read from
the page cache in every loop (written just before).

    python -m benchmarks.ingest [--files 1000000] [--parts embed,read,memory] [--smoke]
"""

from __future__ import annotations

import argparse
import glob
import io
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
    """``files`` float32 (dim,) files in 100 folders, exactly as ``np.save`` writes them (the
    header is ``np.save``'s, written once per file with the row's bytes: 1M files in ~1 min)."""
    rng = np.random.default_rng(seed)
    for folder in range(min(100, files)):
        (root / f"d{folder:02d}").mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(dim, np.float32))
    header = buffer.getvalue()[:-4 * dim]
    chunk = 4096
    for start in range(0, files, chunk):
        block = rng.random((min(chunk, files - start), dim), dtype=np.float32)
        for offset, row in enumerate(block):
            i = start + offset
            with open(root / f"d{i % 100:02d}" / f"{i:07d}.npy", "wb") as f:
                f.write(header + row.tobytes())


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


# ---------------------------------------------------------------------------- embed
EMBED_ROWS = 4096
"""Rows per ``embed`` call in the plain loop."""


def plain_embed_npy(root: Path, model_dir: Path, out: Path) -> dict[str, float]:
    """The strong plain loop over a tree (see the module docstring)."""
    from cvae_model.checkpoint import load_checkpoint
    from cvae_model.fitted import FittedModel

    start = time.perf_counter()
    fitted = FittedModel.from_checkpoint(load_checkpoint(model_dir))
    out.mkdir(parents=True)
    paths = sorted(glob.glob(f"{root}/**/*.npy", recursive=True))
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), 2))])
    prefix = len(str(root)) + 1
    with pq.ParquetWriter(out / "part-0.parquet", schema) as writer:
        for s in range(0, len(paths), EMBED_ROWS):
            run = paths[s:s + EMBED_ROWS]
            z = fitted.embed(np.stack([np.load(p) for p in run]), EMBED_ROWS)
            writer.write_batch(pa.record_batch(
                [pa.array([p[prefix:] for p in run]),
                 pa.FixedSizeListArray.from_arrays(z.reshape(-1), 2)], schema=schema))
    return {"rows": len(paths), "seconds": time.perf_counter() - start}


def embed_child(mode: str, root: str, model_dir: str, out: str) -> None:
    """One mode of the ``embed`` part in this fresh process; prints its result as JSON."""
    from benchmarks.bulk_embed import run_job, sampled
    from pipeline.sources import SourceSpec

    if mode.startswith("plain"):
        if mode == "plain, 1 thread":
            import torch

            torch.set_num_threads(1)
        result = sampled(lambda: plain_embed_npy(Path(root), Path(model_dir), Path(out)))
    else:
        result = sampled(lambda: run_job(SourceSpec(root), Path(model_dir), Path(out), 0))
    print(json.dumps(result))


def embed_part(work: Path, files: int, dim: int, repeats: int) -> None:
    from benchmarks.bulk_embed import DEFAULT_MODES, load_text, make_model, print_table, run_child

    start = time.perf_counter()
    write_npy_tree(work / "tree", files, dim)
    model_dir = make_model(work, dim)
    # Flush the new files to disk first: otherwise the kernel's write-back of ~1M dirty inodes
    # runs during the first mode measured (measured: the plain loop at 7.9k files/s, not 17k).
    os.sync()
    print(f"wrote {files:,} files in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    loads = [load_text()]
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in DEFAULT_MODES}
    for _ in range(repeats):
        for mode in DEFAULT_MODES:
            results[mode].append(run_child("benchmarks.ingest", [
                mode, str(work / "tree"), str(model_dir), str(work / "out")]))
            shutil.rmtree(work / "out", ignore_errors=True)
            loads.append(load_text())
    print(f"\n{files:,} .npy files of {dim} float32 (100 folders), default {dim}->2 model, "
          f"{os.cpu_count()} CPUs; load average (1/5/15 min) before and after each run: "
          f"{' -> '.join(loads)}\n")
    ratio = print_table(results, "files")
    assert ratio is not None  # DEFAULT_MODES hold the job and the plain loops
    print(f"\njob files/s over the faster plain loop's files/s: {ratio:.2f} (goal >= 0.8)",
          flush=True)
    shutil.rmtree(work / "tree", ignore_errors=True)  # minutes for 1M files: after the table


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


def load_text() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


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
def read_and_memory(work: Path, parts: set[str], files: int, rows: int, dim: int) -> None:
    import ray

    start = time.perf_counter()
    if "read" in parts:
        write_npy_tree(work / "npy", files, dim)
    write_parquet(work / "parquet", rows, dim)
    small = work / "parquet" / "part-000.parquet"  # a tenth of the rows
    print(f"wrote {files if 'read' in parts else 0:,} files and {rows:,} rows in "
          f"{time.perf_counter() - start:.1f} s to {work}", file=sys.stderr)
    if "read" in parts:
        load = load_text()
        results = {"npy plain": timed(plain_npy, work / "npy"),
                   "parquet plain": timed(plain_parquet, work / "parquet")}
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray_rows(small)  # start the workers
        results["npy ray"] = timed(ray_rows, work / "npy")
        results["parquet ray"] = timed(ray_rows, work / "parquet")
        ray.shutdown()
        print(f"\n{files:,} .npy files and {rows:,} parquet rows, {dim} float32 features, "
              f"{os.cpu_count()} CPUs; load average {load} -> {load_text()}\n")
        print("| source | plain loop rows/s | read_source rows/s | ratio (Ray / plain) |")
        print("|---|---|---|---|")
        for name, label in (("npy", f"{files:,} .npy files"), ("parquet", f"{rows:,}-row parquet")):
            (n_plain, s_plain), (n_ray, s_ray) = results[f"{name} plain"], results[f"{name} ray"]
            print(f"| {label} | {n_plain / s_plain:,.0f} | {n_ray / s_ray:,.0f} | "
                  f"{(n_ray / s_ray) / (n_plain / s_plain):.2f} |")
    if "memory" in parts:
        small_m, full = measure_stats(small), measure_stats(work / "parquet")
        print("\n| compute_stats over | seconds | peak PSS, driver + Ray (MB) | driver peak RSS (MB) |")
        print("|---|---|---|---|")
        for m in (small_m, full):
            print(f"| {m['rows']:,} rows | {m['seconds']:.1f} | {m['peak_pss'] / 2**20:,.0f} | "
                  f"{m['driver_rss'] / 2**20:,.0f} |")
        print(f"| ratio ({full['rows']:,} / {small_m['rows']:,}) | | "
              f"{full['peak_pss'] / small_m['peak_pss']:.2f} | "
              f"{full['driver_rss'] / small_m['driver_rss']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="embed,read,memory",
                        help="comma-separated: embed, read, memory")
    parser.add_argument("--files", type=int, default=1_000_000, help=".npy files to embed")
    parser.add_argument("--dim", type=int, default=64, help="float32 features per .npy file")
    parser.add_argument("--repeats", type=int, default=1, help="alternations of plain and job")
    parser.add_argument("--read-files", type=int, default=100_000, help=".npy files to read")
    parser.add_argument("--rows", type=int, default=1_000_000, help="parquet rows to read")
    parser.add_argument("--read-dim", type=int, default=784, help="features per row to read")
    parser.add_argument("--smoke", action="store_true", help="2,000 files, 20,000 rows")
    parser.add_argument("--workdir", default=None, help="where to write the data (a temp dir)")
    parser.add_argument("--stats-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stats_child:
        stats_child(args.stats_child)
        return 0
    if args.child:
        embed_child(*args.child)
        return 0
    if args.smoke:
        args.files, args.read_files, args.rows = 2_000, 2_000, 20_000
    parts = set(args.parts.split(","))
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="cvae-ingest-", dir=args.workdir))
    try:
        if "embed" in parts:
            embed_part(work, args.files, args.dim, args.repeats)
        if parts & {"read", "memory"}:
            read_and_memory(work, parts, args.read_files, args.rows, args.read_dim)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
