"""The terms of the negative ELBO, as pure functions of tensors (per row, summed over dimensions)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gaussian_reconstruction", "monte_carlo_kl", "analytic_gaussian_kl"]


def gaussian_reconstruction(x: Tensor, x_hat: Tensor) -> Tensor:
    """-log N(x; x_hat, I) up to its constant: ``0.5 * sum (x - x_hat)^2`` per row."""
    return 0.5 * (x - x_hat).pow(2).sum(dim=-1)


def monte_carlo_kl(eps: Tensor, log_var: Tensor, z_k: Tensor, flow_log_det: Tensor) -> Tensor:
    """Single-sample estimate of KL(q(z_K|x) || N(0, I)) per row.

    ``log q(z_K) = log N(z_0; mu, sigma^2) - sum log|det dz_l/dz_{l-1}|`` with
    ``z_0 = mu + sigma * eps``, so ``log q(z_K) - log p(z_K)`` is
    ``sum(-0.5 eps^2 - 0.5 log_var + 0.5 z_K^2) - log_det`` (the log 2 pi terms cancel).
    """
    per_dim = -0.5 * eps.pow(2) - 0.5 * log_var + 0.5 * z_k.pow(2)
    return per_dim.sum(dim=-1) - flow_log_det


def analytic_gaussian_kl(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per row, for the flow-free model."""
    return 0.5 * (mu.pow(2) + torch.exp(log_var) - 1.0 - log_var).sum(dim=-1)
