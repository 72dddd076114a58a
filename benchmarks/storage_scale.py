"""Millions of files: listing time, the driver's memory per file, and an S3 tree, against plain loops.

In one run, on data it writes (and deletes):

* a local tree of ``--files`` ``.npy`` files of ``--dim`` float32 (1,000 files per folder),
  whose first tenth is a tree of its own (``part/``): the 100k-vs-1M memory comparison reads
  the same kind of files;
* **listing seconds**: ``pipeline.listing.list_file_runs`` into a ``PathList`` (sorted, as
  ``open_source`` lists) vs a plain ``os.walk`` + ``sorted`` loop, same run, warm dentry cache,
  each twice, alternating, best of two;
* **driver memory**: in a fresh subprocess each, ``open_source`` of the tenth and of the whole
  tree (what a job's driver holds before its work starts: the listing, the work items), and the
  whole ``cvae pack`` job. Reported (MiB): peak RSS (``VmHWM``, reset after the imports) minus
  the RSS after imports, and the bytes of the paths themselves (``sys.getsizeof`` of each path
  string plus a list slot).
  Issue 12's goal: the driver's peak RSS at 1M files at most 1.1x its peak at 100k; beside it,
  the memory added from the tenth to the whole against the Python strings of the added paths;
* **an S3 tree** of ``--s3-files`` objects on moto's server (127.0.0.1): listing seconds
  (``list_file_runs`` into a ``PathList`` vs a plain boto3 ``list_objects_v2`` loop) and files/s reading them
  (``cvae pack`` with its 8 read-ahead threads vs a plain boto3 ``get_object`` + ``np.load``
  loop on a pool of 8 threads over the first ``--s3-plain`` files).

    python -m benchmarks.storage_scale [--files 1000000] [--s3-files 100000] [--dim 64] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_PER_FOLDER = 1000


def _npy_bytes(row: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, row)
    return out.getvalue()


def write_tree(root: Path, files: int, dim: int) -> None:
    """``files`` (dim,) float32 files, 1,000 per folder; the first tenth under ``part/``."""
    rng = np.random.default_rng(0)
    header = _npy_bytes(np.zeros(dim, np.float32))[:-4 * dim]
    tenth = files // 10
    for start in range(0, files, _PER_FOLDER):
        folder = root / ("part" if start < tenth else "rest") / f"d{start // _PER_FOLDER:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        block = rng.random((min(_PER_FOLDER, files - start), dim), dtype=np.float32)
        for offset, row in enumerate(block):
            with open(folder / f"{start + offset:07d}.npy", "wb") as out:
                out.write(header + row.tobytes())


def plain_listing(root: Path) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        found += [f"{rel}/{n}" for n in names if n.endswith(".npy")]
    return sorted(found)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM; Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak_mb() -> float:
    """Peak RSS since the last reset (VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**10


def measure(mode: str, path: str, out: str | None) -> dict[str, float]:
    """Run in a fresh subprocess: the driver's memory for ``open_source`` or a pack job."""
    import ray  # noqa: F401 - a job's driver has these loaded
    import torch  # noqa: F401

    from jobs.pack import PackConfig, pack_tree
    from pipeline.sources import SourceSpec, open_source

    base = _rss_mb()
    _reset_peak()  # the peak of the imports (torch's is ~150 MiB above what stays) is not ours
    started = time.perf_counter()
    if mode == "open":
        opened = open_source(SourceSpec(path))
        rows = opened.rows
    else:
        rows = pack_tree(PackConfig(path, out, progress=False))["rows"]
    seconds = time.perf_counter() - started
    peak = _peak_mb()
    if mode == "open":  # after the peak: only to size the paths
        files = [p for item in opened.items for p in item["paths"]]
    else:
        from pipeline.listing import list_files
        from pipeline.storage import resolve

        files = list(list_files(resolve(path), (".npy",)))  # after the peak: only to size the paths
    path_bytes = sum(sys.getsizeof(f) + 8 for f in files) / 2**20
    return {"files": rows, "seconds": round(seconds, 2), "base_mb": round(base, 1),
            "peak_mb": round(peak, 1), "growth_mb": round(peak - base, 1),
            "path_mb": round(path_bytes, 1)}


def _measure_in_subprocess(mode: str, path: str, out: str = "") -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.storage_scale", "--measure", mode,
                           path, out], capture_output=True, text=True, check=False,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_part(files: int, plain: int, dim: int, work: Path) -> list[tuple[str, str]]:
    """Upload a tree to moto; list and read it both ways."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, **keys})
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        rng = np.random.default_rng(0)
        rows = rng.random((files, dim), dtype=np.float32)

        def put(i: int) -> None:
            # One PutObject each (pyarrow's output stream makes three requests per object).
            client.put_object(Bucket="bench", Key=f"tree/d{i // _PER_FOLDER:04d}/{i:07d}.npy",
                              Body=_npy_bytes(rows[i]))

        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(files)))
        upload = time.perf_counter() - started

        from pipeline.listing import PathList, list_file_runs
        from pipeline.storage import resolve

        started = time.perf_counter()
        listed = PathList(runs=list_file_runs(resolve("s3://bench/tree"), (".npy",)))
        cvae_list = time.perf_counter() - started
        started = time.perf_counter()
        plain_keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="tree/"):
            plain_keys += [item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(".npy")]
        plain_keys.sort()
        plain_list = time.perf_counter() - started
        assert len(listed) == len(plain_keys) == files

        import io

        def fetch(key: str) -> np.ndarray:
            return np.load(io.BytesIO(client.get_object(Bucket="bench", Key=key)["Body"].read()))

        # The competent plain loop: the same 8 threads of GETs as cvae pack's read-ahead (a
        # single-threaded loop would only measure one request's latency at a time).
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            for _ in pool.map(fetch, plain_keys[:plain]):
                pass
        plain_rate = plain / (time.perf_counter() - started)
        packed = _measure_in_subprocess("pack", "s3://bench/tree", "s3://bench/packed")
        pack_rate = files / packed["seconds"]
    finally:
        server.terminate()
        server.wait(10)
    return [
        ("S3 (moto) files", f"{files:,}"),
        ("upload (boto3 put_object), 16 threads", f"{upload:.1f} s"),
        ("listing: cvae list_file_runs into a PathList", f"{cvae_list:.2f} s"),
        ("listing: plain boto3 list_objects_v2 loop", f"{plain_list:.2f} s"),
        ("listing ratio (cvae / plain)", f"{cvae_list / plain_list:.2f}"),
        (f"reading: plain boto3 get_object loop, 8 threads (first {plain:,})", f"{plain_rate:,.0f} files/s"),
        ("reading: cvae pack (8 read-ahead threads, writing shards to S3)",
         f"{pack_rate:,.0f} files/s"),
        ("reading ratio (pack / plain)", f"{pack_rate / plain_rate:.2f}"),
        ("cvae pack driver: peak RSS growth / paths", f"{packed['growth_mb']} MiB / {packed['path_mb']} MiB"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--s3-files", type=int, default=100_000)
    parser.add_argument("--s3-plain", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--smoke", action="store_true", help="20,000 files, 2,000 on S3")
    parser.add_argument("--s3-only", action="store_true", help="only the S3 part")
    parser.add_argument("--no-s3", action="store_true", help="only the local part")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        mode, path, out = args.measure
        print(json.dumps(measure(mode, path, out or None)))
        return
    if args.smoke:
        args.files, args.s3_files, args.s3_plain = 20_000, 2_000, 1_000
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="cvae-scale-", dir=args.workdir))
    print("| measure | value |\n|---|---|", flush=True)
    try:
        # Each part's rows as soon as it ends: the S3 part takes many minutes on moto.
        if not args.s3_only:
            _print_rows(local_part(work / "tree", args.files, args.dim, work))
        if not args.no_s3:
            _print_rows(s3_part(args.s3_files, args.s3_plain, args.dim, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_rows(rows: list[tuple[str, str]]) -> None:
    for name, value in rows:
        print(f"| {name} | {value} |", flush=True)


def local_part(root: Path, files: int, dim: int, work: Path) -> list[tuple[str, str]]:
    """The local tree: listing and the driver's memory."""
    table: list[tuple[str, str]] = []
    started = time.perf_counter()
    write_tree(root, files, dim)
    table.append(("local tree", f"{files:,} files x {dim} float32, written in "
                                f"{time.perf_counter() - started:.0f} s"))

    from pipeline.listing import PathList, list_file_runs
    from pipeline.storage import resolve

    # Each twice, alternating, best of two: the first pass after writing a million files runs
    # while the kernel still writes them back.
    cvae_list = plain_list = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        listed = PathList(runs=list_file_runs(resolve(str(root)), (".npy",)))  # as open_source
        cvae_list = min(cvae_list, time.perf_counter() - started)
        started = time.perf_counter()
        plain = plain_listing(root)
        plain_list = min(plain_list, time.perf_counter() - started)
    assert len(listed) == len(plain) == files
    assert list(listed) == plain, "the streamed sorted walk is not sorted()'s order"
    del listed, plain
    table += [("listing: cvae list_file_runs into a PathList (sorted), best of 2",
               f"{cvae_list:.2f} s ({files / cvae_list:,.0f} files/s)"),
              ("listing: plain os.walk + sorted, best of 2", f"{plain_list:.2f} s"),
              ("listing ratio (cvae / plain)", f"{cvae_list / plain_list:.2f}")]

    small, whole = (_measure_in_subprocess("open", str(p)) for p in (root / "part", root))
    table += [(f"open_source driver, {small['files']:,} files", _row(small)),
              (f"open_source driver, {whole['files']:,} files", _row(whole)),
              ("open_source: extra memory / extra path bytes",
               _extra(small, whole)),
              ("open_source: peak RSS ratio, whole / tenth (goal <= 1.1)",
               f"{whole['peak_mb'] / small['peak_mb']:.2f}")]
    small, whole = (_measure_in_subprocess("pack", str(p), str(work / f"packed-{p.name}"))
                    for p in (root / "part", root))
    table += [(f"cvae pack job driver, {small['files']:,} files", _row(small)),
              (f"cvae pack job driver, {whole['files']:,} files", _row(whole)),
              ("cvae pack: extra memory / extra path bytes",
               _extra(small, whole)),
              (f"cvae pack: files/s ({whole['files']:,} files)", f"{whole['files'] / whole['seconds']:,.0f}")]
    shutil.rmtree(root)
    return table


def _extra(small: dict[str, float], whole: dict[str, float]) -> str:
    return f"{(whole['growth_mb'] - small['growth_mb']) / (whole['path_mb'] - small['path_mb']):.2f}"


def _row(m: dict[str, float]) -> str:
    return (f"{m['seconds']} s; RSS after imports {m['base_mb']} MiB, peak {m['peak_mb']} MiB "
            f"(+{m['growth_mb']} MiB); paths {m['path_mb']} MiB")


if __name__ == "__main__":
    main()
