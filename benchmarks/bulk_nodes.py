"""Bulk embedding on 1 and 2 Ray nodes: does throughput grow with the nodes, and why.

On this one machine, "nodes" are Ray nodes started with ``ray.cluster_utils.Cluster`` (each its
own raylet and object store; what a second machine runs), each given ``--cpus-per-node`` CPUs.
Each configuration runs in a fresh process, on the same parquet data and model as
``benchmarks/bulk_embed.py``:

* 1 node x c CPUs (the reference);
* 2 nodes x c CPUs each (the job's default: one actor per CPU, spread over the nodes);
* 1 node x 2c CPUs (the same CPUs in one node: what the second node adds, minus the nodes).

For each: the job's seconds and rows/s, and how many rows each node embedded (the actors write
down the node they run on). With ``--cpus-per-node 1`` on a 2-core machine, the 2-node cluster
has as many cores as the machine: the ratio "2 nodes / 1 node" is then the speed-up from a
second node's core, and it shares the machine with the driver and both nodes' Ray processes.

    .venv/bin/python -m benchmarks.bulk_nodes [--rows 400000] [--cpus-per-node 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.bulk_embed import BATCH, D, load_text, make_model, write_data


def tagged_worker(folder: str) -> type:
    """``EmbedWorker`` that also writes, per item, its node id and rows into ``folder``."""
    from pipeline.inference import EmbedWorker

    class NodeTaggedWorker(EmbedWorker):  # defined here: pickled by value into the actors
        def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
            import ray

            out = super().__call__(batch)
            node = ray.get_runtime_context().get_node_id()
            with open(f"{folder}/{node}-{os.getpid()}.txt", "a") as f:
                f.write(f"{out['rows'][0]}\n")
            return out

    return NodeTaggedWorker


def child(nodes: int, cpus: int, data: str, model_dir: str, out: str, tags: str) -> None:
    """Start a cluster of ``nodes`` x ``cpus``, run the job once, print its result as JSON."""
    import ray
    from ray.cluster_utils import Cluster

    import pipeline.inference as inference
    from pipeline.sources import SourceSpec

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus, "object_store_memory": 1024**3, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, object_store_memory=1024**3)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    inference.EmbedWorker = tagged_worker(tags)  # what run_bulk_embedding starts its actors with
    summary = inference.run_bulk_embedding(
        SourceSpec(data, column="features", id_column="id"),
        inference.EmbedConfig(model_dir, out, batch_size=BATCH, track=False, progress=False))
    ray.shutdown()
    cluster.shutdown()
    per_node: Counter[str] = Counter()
    for path in Path(tags).glob("*.txt"):
        per_node[path.name.split("-")[0]] += sum(int(line) for line in path.read_text().split())
    print(json.dumps({"rows": summary.rows_out, "seconds": summary.seconds,
                      "per_node": sorted(per_node.values(), reverse=True)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        nodes, cpus, *paths = args.child
        child(int(nodes), int(cpus), *paths)
        return 0
    c = args.cpus_per_node
    work = Path(tempfile.mkdtemp(prefix="cvae_nodes_"))
    configs = [(1, c), (2, c), (1, 2 * c)]
    results: dict[tuple[int, int], list[dict[str, Any]]] = {cfg: [] for cfg in configs}
    loads = [load_text()]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        model_dir = make_model(work, D)
        write_data(work / "data", args.rows, 8, 16_384)
        for _ in range(args.repeats):
            for nodes, cpus in configs:
                tags = work / "tags"
                tags.mkdir()
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "benchmarks.bulk_nodes", "--child",
                                       str(nodes), str(cpus), str(work / "data"), str(model_dir),
                                       str(work / "out"), str(tags)],
                                      capture_output=True, text=True, env=env)
                if done.returncode:
                    raise RuntimeError(f"{nodes} node(s) failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["wall"] = time.perf_counter() - start
                results[(nodes, cpus)].append(result)
                shutil.rmtree(work / "out", ignore_errors=True)
                shutil.rmtree(tags)
                loads.append(load_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.rows:,} rows x {D} float32 parquet, default 784->2 model, Ray nodes on one "
          f"{os.cpu_count()}-core machine; load average before and after each run: "
          f"{' -> '.join(loads)}\n")
    print("| cluster | actors | job seconds | rows/s | rows per node | vs 1 node |")
    print("|---|---|---|---|---|---|")
    base = None
    for (nodes, cpus), runs in results.items():
        seconds = sorted(r["seconds"] for r in runs)[len(runs) // 2]
        rate = runs[0]["rows"] / seconds
        base = base or rate
        print(f"| {nodes} node(s) x {cpus} CPU(s) | {nodes * cpus} | {seconds:.1f} | {rate:,.0f} | "
              f"{' + '.join(f'{n:,}' for n in runs[0]['per_node'])} | {rate / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
