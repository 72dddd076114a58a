"""What keeping freed memory (``cvae_model/allocator.py``) does to training steps.

glibc's malloc settings are process-wide, so each setting runs in a fresh process
(``CVAE_MALLOC_TUNING=1`` or ``0``), alternated ``--repeats`` times. Each process builds the
default 784 -> k model with fused Adam, runs 3 warm-up steps, then 5 measurements of ``--steps``
eager ``train_step``s, and reports the median steps/s and the minor page faults per step
(``getrusage``).

    .venv/bin/python -m benchmarks.malloc_effect [--latent 64] [--rows 64 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def child(k: int, rows: int, steps: int) -> None:
    import resource
    import statistics
    import time

    import torch

    from cvae_model.allocator import keep_freed_memory
    from cvae_model.config import ModelConfig, TrainConfig
    from cvae_model.training import make_optimizer, train_step
    from cvae_model.vae import VAE

    tuned = keep_freed_memory()
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=784, dim_latent=k))
    optimizer = make_optimizer(model, TrainConfig())
    batches = list(torch.randn(8, rows, 784))
    generator = torch.Generator()
    count = 0

    def run(n: int) -> None:
        nonlocal count
        for _ in range(n):
            train_step(model, optimizer, batches[count % 8], keep_prob=1.0, grad_clip_norm=100.0,
                       generator=generator.manual_seed(count))
            count += 1

    run(3)
    rates = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        start = time.perf_counter()
        run(steps)
        rates.append(steps / (time.perf_counter() - start))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (5 * steps)
    print(json.dumps({"tuned": tuned, "steps_per_s": statistics.median(rates), "faults": faults}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512], help="rows per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    print(f"dim_latent {args.latent}, 784 features, eager steps with fused Adam, "
          f"{os.cpu_count()} CPUs; each setting a fresh process, alternated {args.repeats} times\n")
    print("| rows per step | kept memory: steps/s | faults/step | glibc defaults: steps/s "
          "| faults/step | kept / defaults (median) |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        steps = max(2, 1280 // rows)  # about a second of steps at 64-D
        runs: dict[str, list[dict[str, float]]] = {"1": [], "0": []}
        for _ in range(args.repeats):
            for setting in runs:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.malloc_effect", "--child", str(args.latent),
                     str(rows), str(steps)], env={**os.environ, "CVAE_MALLOC_TUNING": setting},
                    check=True, capture_output=True, text=True).stdout
                runs[setting].append(json.loads(out.strip().splitlines()[-1]))
        cells = []
        for setting in ("1", "0"):
            rates = ", ".join(f"{r['steps_per_s']:.1f}" for r in runs[setting])
            faults = sorted(r["faults"] for r in runs[setting])
            cells += [rates, f"{faults[0]:,.0f}-{faults[-1]:,.0f}"]
        kept = sorted(r["steps_per_s"] for r in runs["1"])[args.repeats // 2]
        default = sorted(r["steps_per_s"] for r in runs["0"])[args.repeats // 2]
        print(f"| {rows} | {' | '.join(cells)} | {kept / default:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
