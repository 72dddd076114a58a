"""Training throughput of the default 784->2 model against what the CPU's matmul can do.

For each batch size: samples/s of the shared ``train_step`` (forward, backward, clip, Adam), the
model's achieved FLOP/s (3x the forward pass's dense-layer FLOPs per sample), and, measured in
the same run, the FLOP/s of torch matmuls of the model's own layer shapes at that batch size
(forward-shaped and transposed-backward-shaped). Their ratio is the fraction of the machine's
attainable dense peak that training reaches.

    python -m benchmarks.train_throughput [--seconds 3] [--batch-sizes 64,256,1024]
"""

from __future__ import annotations

import argparse
import time

import torch

from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.training import make_optimizer, train_step
from cvae_model.vae import VAE


def dense_shapes(model: VAE) -> list[tuple[int, int]]:
    """(in, out) of every linear layer the forward pass runs (masked layers at full size)."""
    return [(m.in_features, m.out_features) for m in model.modules()
            if isinstance(m, torch.nn.Linear)]


def forward_flops_per_sample(model: VAE) -> int:
    return sum(2 * i * o for i, o in dense_shapes(model))


def time_training(model: VAE, batch_size: int, seconds: float) -> float:
    config = TrainConfig(batch_size=batch_size)
    optimizer = make_optimizer(model, config)
    x = torch.randn(batch_size * 8, model.config.dim_feature)
    batches = [x[i * batch_size:(i + 1) * batch_size] for i in range(8)]
    for b in batches[:3]:  # warm-up
        train_step(model, optimizer, b, keep_prob=0.75, grad_clip_norm=100.0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        train_step(model, optimizer, batches[steps % 8], keep_prob=0.75, grad_clip_norm=100.0)
        steps += 1
    return steps * batch_size / (time.perf_counter() - start)


def time_matmuls(shapes: list[tuple[int, int]], batch_size: int, seconds: float) -> float:
    """FLOP/s of the layer matmuls (forward, grad-input and grad-weight shapes), back to back."""
    mats = []
    for i, o in shapes:
        a, w, g = torch.randn(batch_size, i), torch.randn(i, o), torch.randn(batch_size, o)
        mats.append((a, w, g))
    flops_per_round = sum(3 * 2 * batch_size * i * o for i, o in shapes)
    for a, w, g in mats:
        a @ w, g @ w.T, a.T @ g
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a, w, g in mats:
            a @ w
            g @ w.T
            a.T @ g
        rounds += 1
    return rounds * flops_per_round / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch-sizes", default="64,256,1024")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim_feature=784, dim_latent=2))
    params = sum(p.numel() for p in model.parameters())
    fwd = forward_flops_per_sample(model)
    print(f"model 784->2, cells {model.config.cells_encoder}, {params:,} parameters, "
          f"{fwd / 1e6:.2f} MFLOP forward per sample, torch threads {torch.get_num_threads()}")
    print()
    print("| batch | samples/s | model GFLOP/s | matmul GFLOP/s (same shapes) | fraction of matmul |")
    print("|---|---|---|---|---|")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        rate = time_training(model, batch_size, args.seconds)
        achieved = rate * 3 * fwd
        peak = time_matmuls(dense_shapes(model), batch_size, args.seconds)
        print(f"| {batch_size} | {rate:,.0f} | {achieved / 1e9:.2f} | {peak / 1e9:.2f} | "
              f"{achieved / peak:.2f} |")


if __name__ == "__main__":
    main()
