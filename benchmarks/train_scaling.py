"""Training throughput in-process against Ray Train with 1 (and 2) workers, in one run.

For each launcher: wall seconds of the whole call, the start-up (seconds from the MLflow run's
creation to the first validation report: Ray worker start, DDP set-up, dataset split, step 0's
validation; Ray only), and the steady samples/s over the steps after the first validation (the
median of the loop's own ``samples_per_s`` records, which count only training steps' time
windows, validation included). Same model, data, global batch, step count and objective (the
original's: ``neighbour_weight=0``); runs of fewer than ``COMPILE_MIN_STEPS`` steps are eager in
both launchers. Launchers are alternated ``--repeats`` times (medians shown), so that a changing
machine load hits them alike.

    python -m benchmarks.train_scaling [--steps 2000] [--rows 20000] [--workers 1,2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def in_process(X: np.ndarray, home: str, args: argparse.Namespace, run: int) -> tuple[float, float]:
    """(wall s, steady samples/s) of the estimator's in-process loop."""
    from cvae_model import CompressionVAE

    start = time.perf_counter()
    estimator = CompressionVAE(X, logdir=os.path.join(home, f"local-{run}"), random_state=0,
                               batch_size=args.batch_size)
    estimator.train(num_steps=args.steps, lr_scheduling=False, test_every=args.test_every,
                    checkpoint_every=args.steps, verbose=False, neighbour_weight=0.0)
    wall = time.perf_counter() - start
    return wall, float(np.median([h["samples_per_s"] for h in estimator.history_[1:]]))


def on_ray(X: np.ndarray, workers: int, args: argparse.Namespace, run: int) -> tuple[float, float, float]:
    """(wall s, start-up s, steady samples/s) of ``run_distributed_training``."""
    import mlflow

    from cvae_model.config import TrainConfig
    from pipeline.ray_training import DistributedConfig, run_distributed_training
    from pipeline.tracking import tracking_uri

    config = TrainConfig(num_steps=args.steps, batch_size=args.batch_size,
                         test_every=args.test_every, checkpoint_every=args.steps,
                         lr_scheduling=False, seed=0, neighbour_weight=0.0)
    start = time.perf_counter()
    result = run_distributed_training(X, {"dim_latent": 2, "iaf_flow_length": 5}, config,
                                      DistributedConfig(num_workers=workers,
                                                        run_name=f"bench-{workers}-{run}"))
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(tracking_uri())
    history = client.get_metric_history(result.run_id, "samples_per_s")
    startup = (min(m.timestamp for m in history)
               - client.get_run(result.run_id).info.start_time) / 1000.0
    rates = [m.value for m in sorted(history, key=lambda m: m.step)[1:]]
    return wall, startup, float(np.median(rates))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="1,2", help="Ray Train worker counts to run")
    parser.add_argument("--repeats", type=int, default=2, help="alternations; medians shown")
    args = parser.parse_args(argv)
    args.test_every = max(args.steps // 10, 1)

    import ray

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(args.rows, 16)) @ rng.normal(size=(16, args.features))).astype(np.float32)
    home = tempfile.mkdtemp(prefix="cvae_bench_")
    os.environ["CVAE_HOME"] = home
    loads = ["/".join(f"{x:.2f}" for x in os.getloadavg())]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    counts = [int(w) for w in args.workers.split(",")]
    runs: dict[str, list[tuple[float, float, float]]] = {}
    for run in range(args.repeats):
        wall, rate = in_process(X, home, args, run)
        runs.setdefault("in-process (torch's default threads)", []).append((wall, float("nan"), rate))
        for workers in counts:
            runs.setdefault(f"Ray Train, {workers} worker(s)", []).append(
                on_ray(X, workers, args, run))
        loads.append("/".join(f"{x:.2f}" for x in os.getloadavg()))
    ray.shutdown()

    print(f"{args.rows:,} rows x {args.features} features, {args.steps:,} steps, global batch "
          f"{args.batch_size}, default 784->2 model, {os.cpu_count()} CPUs; load average "
          f"(1/5/15 min) at the start and after each repeat: {' -> '.join(loads)}")
    print()
    print(f"| launcher | wall s | start-up s (to first validation) | samples/s (median of "
          f"{args.repeats}) | all runs' samples/s | vs in-process |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(r[2] for r in next(iter(runs.values())))
    for name, results in runs.items():
        wall = statistics.median(r[0] for r in results)
        startup = statistics.median(r[1] for r in results)
        rate = statistics.median(r[2] for r in results)
        startup_text = "-" if np.isnan(startup) else f"{startup:.1f}"
        print(f"| {name} | {wall:.1f} | {startup_text} | {rate:,.0f} | "
              f"{', '.join(f'{r[2]:,.0f}' for r in results)} | {rate / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
