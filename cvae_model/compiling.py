"""The compile hook: long training runs go through ``torch.compile``, with an eager fallback.

Compiling costs 10-45 s on a 2-core machine (less with a warm inductor cache) and saves 1-3 ms per
step there (benchmarks/train_throughput.py), so only runs long enough to earn it back compile.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from cvae_model.config import TrainConfig

__all__ = ["COMPILE_MIN_STEPS", "compile_for_training"]

COMPILE_MIN_STEPS = 20_000
"""Runs of at least this many steps train through ``torch.compile``; ``CVAE_COMPILE=0`` turns it
off."""


class _CompiledOrEager(nn.Module):
    """``torch.compile(module)``, falling back to ``module`` itself for good when compiling
    fails (no C++ compiler for inductor, an unsupported platform): never worse than eager."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled: nn.Module | None = torch.compile(module, dynamic=False)

    def forward(self, *args: object) -> object:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # compile errors surface at the first call
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); training "
                              "eagerly", RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.module(*args)


def compile_for_training(module: nn.Module, config: TrainConfig) -> nn.Module:
    """``module`` compiled for a run of ``config.num_steps`` steps when that pays, else itself."""
    if (config.num_steps < COMPILE_MIN_STEPS or os.environ.get("CVAE_COMPILE", "1") == "0"
            or not hasattr(torch, "compile")):
        return module
    return _CompiledOrEager(module)
