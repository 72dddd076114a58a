"""Gradient clipping as ``torch.nn.utils.clip_grad_norm_`` does it, minus a no-op pass."""

from __future__ import annotations

import torch

__all__ = ["clip_gradients"]


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> bool:
    """``clip_grad_norm_`` over the optimizer's parameters; False when the norm is not finite.

    The same gradients, bit for bit, as ``torch.nn.utils.clip_grad_norm_``, which multiplies
    every gradient by its coefficient clamped to 1 even when the norm is below ``max_norm``: a
    read and write of every gradient in nearly every step, for nothing (x * 1.0 is x). Here the
    multiplication runs only when the coefficient is below 1. One device-to-host read, as the
    finiteness check needed before."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    coefficient = max_norm / (total + 1e-6)  # clip_grads_with_norm_'s own coefficient
    finite, clip = torch.stack([torch.isfinite(total), coefficient < 1.0]).tolist()
    if finite and clip:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return bool(finite)
