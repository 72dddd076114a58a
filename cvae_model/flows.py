"""Inverse Autoregressive Flow with the original CompressionVAE's semantics.

Each step reads a context computed from the encoder's last hidden layer, produces (m_j, s_j) for
every latent dimension j from ``[context, z_<j]``, and updates
``sigma = sigmoid(s + offset); z <- sigma * z + (1 - sigma) * m`` (Kingma et al. 2016's
numerically stable form). The latent order is reversed after every step.

The original built one small two-layer MLP per latent dimension. ``AutoregressiveNet`` is the same
function class written as one block-masked network: hidden block j (``cells_hidden`` units) sees
the context and z_<j only, and outputs (m_j, s_j) read hidden block j only. It is exactly
autoregressive, exactly as expressive as the original, and one matmul per layer instead of k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cvae_model.config import Initializer
from cvae_model.layers import dense, masked_linear_with_init

__all__ = ["AutoregressiveNet", "IAFStep", "Reverse", "IAF"]


def _autoregressive_masks(dim_latent: int, dim_context: int, cells_hidden: int) -> tuple[Tensor, Tensor]:
    k, h = dim_latent, cells_hidden
    hidden_block = torch.arange(k * h) // h  # which latent dimension each hidden unit serves
    # Input columns: [context (dim_context), z_0 .. z_{k-1}].
    sees_context = torch.ones(k * h, dim_context)
    sees_z = (torch.arange(k)[None, :] < hidden_block[:, None]).float()  # z_i feeds block j iff i < j
    input_mask = torch.cat([sees_context, sees_z], dim=1)
    # Outputs: m_0..m_{k-1}, s_0..s_{k-1}; output j (and k + j) reads hidden block j only.
    out_dim = torch.arange(2 * k) % k
    output_mask = (out_dim[:, None] == hidden_block[None, :]).float()
    return input_mask, output_mask


class AutoregressiveNet(nn.Module):
    """(m, s) = f(context, z) with m_j, s_j depending on the context and z_<j only."""

    def __init__(self, dim_latent: int, dim_context: int, cells_hidden: int,
                 initializer: Initializer) -> None:
        super().__init__()
        input_mask, output_mask = _autoregressive_masks(dim_latent, dim_context, cells_hidden)
        self.hidden = masked_linear_with_init(input_mask, initializer)
        self.out = masked_linear_with_init(output_mask, initializer)

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.relu(self.hidden(torch.cat([context, z], dim=-1)))
        m, s = self.out(h).chunk(2, dim=-1)
        return m, s


class IAFStep(nn.Module):
    """One IAF step: its own context layer and autoregressive net. Returns ``(z, log_det)``."""

    def __init__(self, dim_latent: int, dim_encoder_hidden: int, cells_hidden: int,
                 initializer: Initializer, s_offset: float) -> None:
        super().__init__()
        # The original's context is only k units wide; kept for fidelity.
        self.context = dense(dim_encoder_hidden, dim_latent, initializer)
        self.net = AutoregressiveNet(dim_latent, dim_latent, cells_hidden, initializer)
        self.s_offset = s_offset

    def forward(self, z: Tensor, encoder_hidden: Tensor) -> tuple[Tensor, Tensor]:
        context = torch.relu(self.context(encoder_hidden))
        m, s = self.net(z, context)
        s = s + self.s_offset
        sigma = torch.sigmoid(s)
        z = sigma * z + (1 - sigma) * m
        # dz'_j/dz_j = sigma_j and the Jacobian is triangular, so log|det| = sum log sigma_j;
        # logsigmoid is the stable form of log(sigmoid(s)).
        log_det = nn.functional.logsigmoid(s).sum(dim=-1)
        return z, log_det


class Reverse(nn.Module):
    """Reverse the latent order; a permutation, so log|det| = 0."""

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z.flip(-1), z.new_zeros(z.shape[:-1])


class IAF(nn.Module):
    """``flow_length`` IAF steps, each followed by a reversal; sums the log-determinants."""

    def __init__(self, flow_length: int, dim_latent: int, dim_encoder_hidden: int,
                 cells_hidden: int, initializer: Initializer, s_offset: float) -> None:
        super().__init__()
        self.steps = nn.ModuleList(
            IAFStep(dim_latent, dim_encoder_hidden, cells_hidden, initializer, s_offset)
            for _ in range(flow_length)
        )
        self.reverse = Reverse()

    def forward(self, z: Tensor, encoder_hidden: Tensor) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[:-1])
        for step in self.steps:
            z, log_det = step(z, encoder_hidden)
            z, reverse_log_det = self.reverse(z)
            total = total + log_det + reverse_log_det
        return z, total
