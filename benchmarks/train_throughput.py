"""Training throughput of the default models against what the CPU's matmul does on their shapes.

For each row (latent size k, batch size): steps/s and samples/s of ``cvae_model.training``'s
``train_step`` with ``make_optimizer`` (forward, backward, clip, optimizer: whatever the training
loop uses) on the default 784-feature model with k latent dimensions, the useful FLOP/s this
achieves, and, measured in the same run and alternated with it, the FLOP/s of torch matmuls of
the same layer shapes at the same batch size. Their ratio is the fraction of the machine's
matmul rate that training reaches. Rows: k = 2, 16, 64 at batch 64, and k = 2 at batch 1024.

Useful FLOPs count 2 per multiply-add that the model's math needs, per sample:
* a dense layer ``in -> out``: ``in * out`` multiply-adds forward, the same again for the weight
  gradient and for the input gradient (none for the first encoder layer, whose input is data);
* the IAF's masked hidden layer: only the weights its mask keeps (``mask.sum()``), not the dense
  matrix it multiplies;
* the IAF's block-diagonal output layer: its ``2 * k * h`` weights (all used).
The matmul baseline runs, for every layer, the GEMMs of its shapes (forward, input-gradient where
needed, weight-gradient): dense layers and the masked layer at their full ``(in, out)`` (the GEMM
that computes them), the block layer as its k ``(batch, h) @ (h, 2)`` products (one bmm).

    .venv/bin/python -m benchmarks.train_throughput [--seconds 1] [--rounds 3] [--keep-prob 1.0]
        [--threads N]   # --threads 1 on a shared machine: 2 threads stall whenever a core is busy
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.layers import BlockLinear, MaskedLinear
from cvae_model.training import make_optimizer, train_step
from cvae_model.vae import VAE

ROWS = ((2, 64), (16, 64), (64, 64), (2, 1024))


def layer_costs(model: VAE) -> tuple[int, list[tuple[str, tuple[int, ...], bool]]]:
    """Useful training FLOPs per sample, and (kind, shape, needs input grad) of every layer."""
    first = model.encoder_layers[0]
    flops, layers = 0, []
    for m in model.modules():
        input_grad = m is not first
        if isinstance(m, MaskedLinear):
            macs = int(m.mask.sum())
            layers.append(("dense", (m.in_features, m.out_features), input_grad))
        elif isinstance(m, nn.Linear):
            macs = m.in_features * m.out_features
            layers.append(("dense", (m.in_features, m.out_features), input_grad))
        elif isinstance(m, BlockLinear):
            macs = m.weight.numel()
            layers.append(("block", (m.blocks, m.block_in, m.groups), input_grad))
        else:
            continue
        flops += 2 * macs * (3 if input_grad else 2)
    return flops, layers


def matmul_round(layers: list[tuple[str, tuple[int, ...], bool]], batch: int):
    """A closure running every layer's GEMMs once, and the FLOPs it does."""
    work, flops = [], 0
    for kind, shape, input_grad in layers:
        if kind == "dense":
            i, o = shape
            a, w, g = torch.randn(batch, i), torch.randn(i, o), torch.randn(batch, o)
            work += [(torch.mm, a, w), (torch.mm, a.T, g)] + ([(torch.mm, g, w.T)] if input_grad else [])
            flops += 2 * batch * i * o * (3 if input_grad else 2)
        else:
            k, h, c = shape
            a, w, g = torch.randn(k, batch, h), torch.randn(k, h, c), torch.randn(k, batch, c)
            work += [(torch.bmm, a, w), (torch.bmm, a.transpose(1, 2), g), (torch.bmm, g, w.transpose(1, 2))]
            flops += 2 * k * batch * h * c * 3

    def run() -> None:
        for op, x, y in work:
            op(x, y)
    return run, flops


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def measure(k: int, batch: int, seconds: float, rounds: int, keep_prob: float) -> dict[str, float]:
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=784, dim_latent=k))
    optimizer = make_optimizer(model, TrainConfig(batch_size=batch))
    batches = list(torch.randn(8, batch, 784))
    counter = iter(range(10**12))

    def step() -> None:
        train_step(model, optimizer, batches[next(counter) % 8], keep_prob=keep_prob,
                   grad_clip_norm=100.0)

    flops, layers = layer_costs(model)
    gemms, gemm_flops = matmul_round(layers, batch)
    for _ in range(3):  # warm-up (allocations, optimizer state, MKL)
        step()
        gemms()
    steps, peaks = [], []
    for _ in range(rounds):  # alternated, so that both see the same machine load
        steps.append(rate(step, seconds))
        peaks.append(rate(gemms, seconds) * gemm_flops)
    steps_s = statistics.median(steps)
    peak = statistics.median(peaks)
    return {"steps": steps_s, "samples": steps_s * batch, "model": steps_s * batch * flops,
            "peak": peak, "mflop": flops / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement (x rounds x 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations; medians are shown")
    parser.add_argument("--keep-prob", type=float, default=TrainConfig().dropout_keep_prob)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, keep_prob {args.keep_prob}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print()
    print("| k | batch | steps/s | samples/s | useful MFLOP/sample | model GFLOP/s "
          "| matmul GFLOP/s (same shapes) | fraction of matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for k, batch in ROWS:
        r = measure(k, batch, args.seconds, args.rounds, args.keep_prob)
        print(f"| {k} | {batch} | {r['steps']:,.1f} | {r['samples']:,.0f} | {r['mflop']:.2f} "
              f"| {r['model'] / 1e9:.1f} | {r['peak'] / 1e9:.1f} | {r['model'] / r['peak']:.2f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
