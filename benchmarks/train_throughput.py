"""Training throughput: steps/s at batch 64 against the original, and samples/s against matmul.

Table 1 (batch 64, latent sizes 2, 16 and 64, 784 features, default architecture: cells from
the original's rule, 5 IAF steps): steps/s of ``cvae_model.training.train_step`` over
``--steps`` (100) steps on in-memory batches, for three set-ups, alternated ``--rounds`` (15)
times (medians shown) so that a changing machine load hits them alike:

* ``Adam``: eager model, ``torch.optim.Adam`` with its default (foreach) implementation;
* ``fused Adam``: eager model, ``torch.optim.Adam(fused=True)``;
* ``training``: what the training loop runs: ``make_optimizer`` and the loop's compile hook
  (``cvae_model.compiling.compile_for_training``, asked for a run of ``--run-steps`` steps).

The process keeps freed memory as the training loop does (``cvae_model.allocator``) unless
``--glibc-malloc-defaults`` is given; that setting is process-wide, so it holds for all three.

The original CompressionVAE (TensorFlow) is measured in the same run when
``--original-python PY --original-repo DIR`` are given (a Python with TensorFlow 2.x and a
checkout of https://github.com/maxfrenzel/CompressionVAE; see benchmarks/README.md):
``benchmarks/original_steps.py`` builds its own default model in a child process, whose steps
are alternated with ours, in two modes: ``queue``, its training op fed by its own reader thread
(how the original trains), and ``fed``, the same op with the batch fed directly (its compute
alone: the stronger baseline). Without them the original's steps/s are quoted from another run
(2-D 115, 16-D 74, 64-D 21), and the table says so.

Table 2 (batch 64): the training set-up's step beside the matmuls of the model's layer shapes
alone and fused Adam alone over its parameters, measured back to back: what this model, computed
as it is (the masked IAF layer as its full product), pays at least on this machine.

Table 3 (batch 1024, or the ``--large-batch`` sizes): samples/s of the training set-up beside
the FLOP/s of torch matmuls of the model's own layer shapes at the same batch size (forward and
both backward products), measured in the same run and alternated with it. Useful FLOPs count 2
per multiply-add that the model's math needs, per sample:

* a dense layer ``in -> out``: ``in * out`` multiply-adds forward, the same again for the weight
  gradient and for the input gradient (none for the first encoder layer, whose input is data);
* the IAF's masked hidden layer: only the weights its mask keeps (``mask.sum()``);
* the IAF's block-diagonal output layer: its ``2 * k * h`` weights (all used).

The matmul baseline runs the GEMMs of every layer's shapes: dense layers and the masked layer at
their full ``(in, out)`` (the GEMM that computes them), the block layer as its k
``(batch, h) @ (h, 2)`` products (one bmm).

On a CUDA device (``--device cuda``) the same tables are measured there: model, batches, noise
and the matmul baseline live on the GPU and every timing waits for the device
(``torch.cuda.synchronize``). The original's steps/s are CPU figures; the ratio against
them is then a hardware comparison, not a like-for-like one.

    .venv/bin/python -m benchmarks.train_throughput [--steps 100] [--rounds 15] [--threads N]
        [--device cuda] [--original-python PY --original-repo DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from cvae_model.allocator import keep_freed_memory
from cvae_model.compiling import compile_for_training
from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.layers import BlockLinear, MaskedLinear
from cvae_model.training import ADAM_EPS, make_optimizer, train_step
from cvae_model.vae import VAE

ORIGINAL_STEPS_PER_S = {2: 115.0, 16: 74.0, 64: 21.0}
"""The original CompressionVAE (TensorFlow), batch 64, 600 steps; quoted from another run
(issue 13's, at 50127e3), used when the original is not measured here."""
SETUPS = ("Adam", "fused Adam", "training")
ORIGINAL_MODES = ("queue", "fed")
ORIGINAL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "original_steps.py")


class Original:
    """The original CompressionVAE's training op in a child process (``original_steps.py``)."""

    def __init__(self, python: str, repo: str, k: int) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # its stderr: prints, the model it built
        start = time.perf_counter()
        self.process = subprocess.Popen([python, ORIGINAL_SCRIPT, repo, str(k)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log)
        if self._reply() != "ready":
            raise RuntimeError(f"original_steps.py did not start:\n{self._log_text()}")
        self.warmup = time.perf_counter() - start
        self.built = next((line for line in self._log_text().splitlines()
                           if line.startswith("original:")), "original: (no description)")

    def _reply(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def _log_text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def steps(self, mode: str, n: int) -> float:
        """Seconds of n training steps in ``mode`` (queue or fed)."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{mode} {n}\n")
        self.process.stdin.flush()
        reply = self._reply()
        try:
            return float(reply)
        except ValueError:
            raise RuntimeError(f"original_steps.py answered {reply!r}:\n{self._log_text()}") from None

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


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


def matmul_round(layers: list[tuple[str, tuple[int, ...], bool]], batch: int,
                 device: torch.device) -> tuple[Callable[[], None], int]:
    """A closure running every layer's GEMMs once, and the FLOPs it does."""
    work, flops = [], 0

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    for kind, shape, input_grad in layers:
        if kind == "dense":
            i, o = shape
            a, w, g = randn(batch, i), randn(i, o), randn(batch, o)
            work += [(torch.mm, a, w), (torch.mm, a.T, g)] + ([(torch.mm, g, w.T)] if input_grad else [])
            flops += 2 * batch * i * o * (3 if input_grad else 2)
        else:
            k, h, c = shape
            a, w, g = randn(k, batch, h), randn(k, h, c), randn(k, batch, c)
            work += [(torch.bmm, a, w), (torch.bmm, a.transpose(1, 2), g), (torch.bmm, g, w.transpose(1, 2))]
            flops += 2 * k * batch * h * c * 3

    def run() -> None:
        for op, x, y in work:
            op(x, y)
    return run, flops


class Setup:
    """A model, optimizer and step function for one (k, batch, set-up)."""

    def __init__(self, k: int, batch: int, setup: str, run_steps: int,
                 device: torch.device) -> None:
        torch.manual_seed(0)
        self.model = VAE(ModelConfig(dim_feature=784, dim_latent=k)).to(device)
        config = TrainConfig(batch_size=batch, num_steps=run_steps)
        params = self.model.parameters()
        if setup == "Adam":
            self.optimizer = torch.optim.Adam(params, lr=config.learning_rate, eps=ADAM_EPS)
        elif setup == "fused Adam":
            self.optimizer = torch.optim.Adam(params, lr=config.learning_rate, eps=ADAM_EPS,
                                              fused=True)
        else:
            self.optimizer = make_optimizer(self.model, config)
        self.module = (compile_for_training(self.model, config) if setup == "training"
                       else self.model)
        self.batches = list(torch.randn(8, batch, 784, device=device))
        self.generator = torch.Generator(device=device)
        self.count = 0
        start = time.perf_counter()
        self.steps(3)  # warm-up: allocations, optimizer state, MKL, compilation
        self.warmup = time.perf_counter() - start

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.generator.manual_seed(self.count)
            train_step(self.module, self.optimizer, self.batches[self.count % 8], keep_prob=1.0,
                       grad_clip_norm=100.0, generator=self.generator)
            self.count += 1


def synchronize() -> None:
    """Wait for queued GPU work, so that a timing covers it (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], None]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    """Median and quartiles, e.g. '2.31 (2.20-2.45)'."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{q2:.2f} ({q1:.2f}-{q3:.2f})"


def batch64(steps: int, rounds: int, run_steps: int, device: torch.device,
            original: tuple[str, str] | None, latents: list[int]) -> None:
    """Table 1. Each round measures every set-up once, back to back, in the order: the
    original queue-fed, Adam, fused Adam, training, the original fed. This machine's speed
    drifts by 20-40 % within tens of seconds, so the ratios are taken per round, between
    measurements seconds apart, and their median (quartiles in brackets) is shown."""
    if original is None:
        print("The original's steps/s are quoted from another run (issue 13, at 50127e3), not "
              "measured here.\n")
        print(f"| k | original (TF, quoted) steps/s | {' | '.join(f'{s} steps/s' for s in SETUPS)} | "
              "training / original | compile s (first steps) |")
        print("|---|---|---|---|---|---|---|")
    else:
        print(f"| k | original queue steps/s | original fed steps/s | "
              f"{' | '.join(f'{s} steps/s' for s in SETUPS)} | training / queue | "
              "training / fed | compile s (first steps) |")
        print("|---|---|---|---|---|---|---|---|---|")
    built = []
    for k in latents:
        theirs = Original(*original, k) if original is not None else None
        setups = {name: Setup(k, 64, name, run_steps, device) for name in SETUPS}
        rates: dict[str, list[float]] = {name: [] for name in (*ORIGINAL_MODES, *SETUPS)}
        for _ in range(rounds):
            if theirs is not None:
                rates["queue"].append(steps / theirs.steps("queue", steps))
                time.sleep(0.3)  # its reader thread refills the queue: not in our timings
            for name, setup in setups.items():
                rates[name].append(steps / timed(lambda s=setup: s.steps(steps)))
            if theirs is not None:
                rates["fed"].append(steps / theirs.steps("fed", steps))
        median = {name: statistics.median(r) for name, r in rates.items() if r}
        ours = f"{' | '.join(f'{median[name]:,.1f}' for name in SETUPS)}"
        warmup = setups["training"].warmup
        if theirs is None:
            quoted = ORIGINAL_STEPS_PER_S[k]
            print(f"| {k} | {quoted:.0f} | {ours} | {median['training'] / quoted:.2f} | "
                  f"{warmup:.1f} |", flush=True)
        else:
            per_round = {mode: [t / o for t, o in zip(rates["training"], rates[mode], strict=True)]
                         for mode in ORIGINAL_MODES}
            print(f"| {k} | {median['queue']:,.1f} | {median['fed']:,.1f} | {ours} | "
                  f"{spread(per_round['queue'])} | {spread(per_round['fed'])} | {warmup:.1f} |",
                  flush=True)
            built.append(theirs.built)
            theirs.close()
        torch._dynamo.reset()  # drop the compiled graphs of this k before the next
    for line in built:
        print(f"\n{line}", end="")
    if built:
        print()


def large_batch(batch: int, steps: int, rounds: int, run_steps: int, device: torch.device) -> None:
    """Table 3; the fraction of the matmul rate is taken per round (training, then the GEMMs,
    back to back), its median and quartiles shown."""
    print("| k | batch | samples/s | useful MFLOP/sample | model GFLOP/s "
          "| matmul GFLOP/s (same shapes) | fraction of matmul |")
    print("|---|---|---|---|---|---|---|")
    for k in (2, 64):
        setup = Setup(k, batch, "training", run_steps, device)
        flops, layers = layer_costs(setup.model)
        gemms, gemm_flops = matmul_round(layers, batch, device)
        gemms()
        samples, peaks = [], []
        for _ in range(rounds):
            samples.append(steps * batch / timed(lambda s=setup: s.steps(steps)))
            peaks.append(steps * gemm_flops / timed(lambda g=gemms: [g() for _ in range(steps)]))
        rate, peak = statistics.median(samples), statistics.median(peaks)
        fractions = [r * flops / p for r, p in zip(samples, peaks, strict=True)]
        print(f"| {k} | {batch} | {rate:,.0f} | {flops / 1e6:.2f} | {rate * flops / 1e9:.1f} | "
              f"{peak / 1e9:.1f} | {spread(fractions)} |", flush=True)
        torch._dynamo.reset()


def floor(latents: list[int], steps: int, rounds: int, run_steps: int, device: torch.device) -> None:
    """Table 2 (batch 64): the training step beside what it cannot avoid as it is computed,
    measured back to back in each round: the matmuls of its layer shapes (the masked IAF layer
    at its full GEMM) and fused Adam over its parameters."""
    print("| k | training step ms | its matmuls alone ms (GFLOP/s) | fused Adam alone ms "
          "| matmuls + Adam ms | steps/s at that floor |")
    print("|---|---|---|---|---|---|")
    for k in latents:
        setup = Setup(k, 64, "training", run_steps, device)
        _, layers = layer_costs(setup.model)
        gemms, gemm_flops = matmul_round(layers, 64, device)
        optimizer = make_optimizer(setup.model, TrainConfig())
        for p in setup.model.parameters():  # gradients for Adam alone; the training steps
            p.grad = torch.zeros_like(p)  # replace them, which changes no timing: Adam's cost
            # does not depend on the values
        times: dict[str, list[float]] = {"step": [], "gemms": [], "adam": []}
        for _ in range(rounds):
            times["step"].append(timed(lambda s=setup: s.steps(steps)) / steps)
            times["gemms"].append(timed(lambda g=gemms: [g() for _ in range(steps)]) / steps)
            times["adam"].append(timed(lambda o=optimizer: [o.step() for _ in range(steps)]) / steps)
        step, matmuls, adam = (statistics.median(times[name]) * 1e3 for name in times)
        print(f"| {k} | {step:.2f} | {matmuls:.2f} ({gemm_flops / matmuls / 1e6:.0f}) | {adam:.2f} | "
              f"{matmuls + adam:.2f} | {1e3 / (matmuls + adam):,.0f} |", flush=True)
        torch._dynamo.reset()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per measurement at batch 64")
    parser.add_argument("--steps-large", type=int, default=20,
                        help="steps per measurement at the large batch")
    parser.add_argument("--rounds-large", type=int, default=7,
                        help="alternations at the large batch")
    parser.add_argument("--large-batch", type=int, nargs="*", default=[1024],
                        help="batch sizes of the samples/s-against-matmul table")
    parser.add_argument("--rounds", type=int, default=15, help="alternations; medians are shown")
    parser.add_argument("--run-steps", type=int, default=TrainConfig().num_steps,
                        help="the run length the compile hook is asked about (default: a "
                        "default training run)")
    parser.add_argument("--latent", type=int, nargs="+", default=[2, 16, 64],
                        help="latent sizes of the batch-64 table")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument("--original-python", help="a Python with TensorFlow 2.x, to measure "
                        "the original CompressionVAE beside ours (with --original-repo)")
    parser.add_argument("--original-repo", help="a checkout of maxfrenzel/CompressionVAE")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="leave glibc's malloc settings alone (training changes them)")
    args = parser.parse_args(argv)
    if (args.original_python is None) != (args.original_repo is None):
        parser.error("--original-python and --original-repo go together")
    original = (args.original_python, args.original_repo) if args.original_python else None
    tuned = False if args.glibc_malloc_defaults else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, device {device} ({where}), {os.cpu_count()} CPUs, "
          f"load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())} at start, "
          f"malloc {'tuned as training does' if tuned else 'glibc defaults'}, "
          f"python {sys.version.split()[0]}")
    print()
    batch64(args.steps, args.rounds, args.run_steps, device, original, args.latent)
    print()
    floor(args.latent, 50, 7, args.run_steps, device)
    for batch in args.large_batch:
        print()
        large_batch(batch, args.steps_large, args.rounds_large, args.run_steps, device)
    print(f"\nload average {'/'.join(f'{x:.2f}' for x in os.getloadavg())} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
