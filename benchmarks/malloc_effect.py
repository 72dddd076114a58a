"""What keeping freed memory (``cvae_model/allocator.py``) does to training steps.

glibc's malloc settings are process-wide, so each setting runs in a fresh process
(``CVAE_MALLOC_TUNING=1`` or ``0``), alternated ``--repeats`` times. Each process builds the
default 784 -> k model with fused Adam, runs 3 warm-up steps, then 5 measurements of at least a
second of eager ``train_step``s each, and reports the median steps/s, the minor page faults per
step and the share of its CPU time spent in the kernel (``getrusage``).

    .venv/bin/python -m benchmarks.malloc_effect [--latent 64] [--rows 64 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(k: int, rows: int) -> None:
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

    def step() -> None:
        nonlocal count
        train_step(model, optimizer, batches[count % 8], keep_prob=1.0, grad_clip_norm=100.0,
                   generator=generator.manual_seed(count))
        count += 1

    for _ in range(3):
        step()
    rates = []
    before, first = resource.getrusage(resource.RUSAGE_SELF), count
    for _ in range(5):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            step()
            n += 1
        rates.append(n / (time.perf_counter() - start))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"tuned": tuned, "steps_per_s": statistics.median(rates),
                      "faults": (after.ru_minflt - before.ru_minflt) / (count - first),
                      "kernel": (after.ru_stime - before.ru_stime) / cpu}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512], help="rows per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    print(f"dim_latent {args.latent}, 784 features, eager steps with fused Adam, "
          f"{os.cpu_count()} CPUs; each setting a fresh process, alternated {args.repeats} times\n")
    print("| rows per step | kept memory: steps/s | faults/step | kernel CPU share "
          "| glibc defaults: steps/s | faults/step | kernel CPU share | kept / defaults (medians) |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        runs: dict[str, list[dict[str, float]]] = {"1": [], "0": []}
        for _ in range(args.repeats):
            for setting in runs:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.malloc_effect", "--child", str(args.latent),
                     str(rows)], env={**os.environ, "CVAE_MALLOC_TUNING": setting},
                    check=True, capture_output=True, text=True).stdout
                runs[setting].append(json.loads(out.strip().splitlines()[-1]))
        cells = []
        for setting in ("1", "0"):
            faults = sorted(r["faults"] for r in runs[setting])
            kernel = sorted(r["kernel"] for r in runs[setting])
            cells += [", ".join(f"{r['steps_per_s']:.1f}" for r in runs[setting]),
                      f"{faults[0]:,.0f}-{faults[-1]:,.0f}",
                      f"{kernel[0]:.0%}-{kernel[-1]:.0%}"]
        kept, default = (statistics.median(r["steps_per_s"] for r in runs[key]) for key in ("1", "0"))
        print(f"| {rows} | {' | '.join(cells)} | {kept / default:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
