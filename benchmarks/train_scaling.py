"""Training throughput in-process against Ray Train with 1 and 2 workers, in one run.

For each launcher: wall seconds of the whole call, the start-up (seconds until the first
validation report: Ray worker start, DDP set-up, dataset split), and steady samples/s over the
steps after it (as the loop reports them). Same model, data, global batch and step count.

    python -m benchmarks.train_scaling [--steps 2000] [--rows 20000] [--features 784]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    import mlflow
    import ray

    from cvae_model import CompressionVAE
    from cvae_model.config import TrainConfig
    from pipeline.ray_training import DistributedConfig, run_distributed_training

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(args.rows, 16)) @ rng.normal(size=(16, args.features))).astype(np.float32)
    home = tempfile.mkdtemp(prefix="cvae_bench_")
    os.environ["CVAE_HOME"] = home
    test_every = max(args.steps // 10, 1)
    rows = []

    start = time.perf_counter()
    estimator = CompressionVAE(X, logdir=os.path.join(home, "local"), random_state=0,
                               batch_size=args.batch_size)
    estimator.train(num_steps=args.steps, lr_scheduling=False, test_every=test_every,
                    checkpoint_every=args.steps, verbose=False)
    wall = time.perf_counter() - start
    rates = [h["samples_per_s"] for h in estimator.history_[1:]]
    rows.append(("in-process (2 torch threads)", wall, float("nan"), float(np.median(rates))))

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = TrainConfig(num_steps=args.steps, batch_size=args.batch_size, test_every=test_every,
                         checkpoint_every=args.steps, lr_scheduling=False, seed=0)
    for workers in (1, 2):
        start = time.perf_counter()
        result = run_distributed_training(
            X, {"dim_latent": 2, "iaf_flow_length": 5}, config,
            DistributedConfig(num_workers=workers, run_name=f"bench-{workers}"))
        wall = time.perf_counter() - start
        history = mlflow.MlflowClient().get_metric_history(result.run_id, "samples_per_s")
        first = min(m.timestamp for m in history) / 1000.0
        run = mlflow.MlflowClient().get_run(result.run_id)
        startup = first - run.info.start_time / 1000.0
        rates = [m.value for m in sorted(history, key=lambda m: m.step)[1:]]
        rows.append((f"Ray Train, {workers} worker(s)", wall, startup, float(np.median(rates))))
    ray.shutdown()

    base = rows[0][3]
    print(f"{args.rows} rows x {args.features} features, {args.steps} steps, global batch "
          f"{args.batch_size}, {os.cpu_count()} CPUs")
    print()
    print("| launcher | wall s | start-up s (to first validation) | samples/s | vs in-process |")
    print("|---|---|---|---|---|")
    for name, wall, startup, rate in rows:
        startup_text = "-" if np.isnan(startup) else f"{startup:.1f}"
        print(f"| {name} | {wall:.1f} | {startup_text} | {rate:,.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
