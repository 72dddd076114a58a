"""The VAE with IAF layers: encoder, flow, decoder, and the loss, as the original defines them.

Dropout is an argument of ``forward`` (a keep probability, as in the original), not a module
state, so embedding and decoding are deterministic whatever ``train()``/``eval()`` mode the module
is in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from cvae_model.config import ModelConfig
from cvae_model.flows import IAF
from cvae_model.layers import dense
from cvae_model.losses import gaussian_reconstruction, monte_carlo_kl

__all__ = ["VAE", "VAEOutput", "Posterior"]


class Posterior(NamedTuple):
    mu: Tensor
    """Mean of q(z_0|x), shape (n, k)."""
    log_var: Tensor
    """Log-variance of q(z_0|x), softly bounded, shape (n, k)."""
    hidden: Tensor
    """The encoder's last hidden layer, the IAF context input, shape (n, cells_encoder[-1])."""


class VAEOutput(NamedTuple):
    loss: Tensor
    """Mean over the batch of reconstruction + KL (the negative ELBO), a scalar."""
    recon: Tensor
    """Per-row reconstruction term, shape (n,)."""
    kl: Tensor
    """Per-row Monte-Carlo KL, shape (n,)."""
    z0: Tensor
    """Sample of q(z_0|x), shape (n, k)."""
    z: Tensor
    """z_K after the flow, the decoder input, shape (n, k)."""
    mu: Tensor
    log_var: Tensor
    x_hat: Tensor
    """Reconstruction of the (normalized) input, shape (n, d)."""


def _dropout(h: Tensor, keep_prob: float) -> Tensor:
    if keep_prob >= 1.0:
        return h
    return nn.functional.dropout(h, p=1.0 - keep_prob, training=True)


class VAE(nn.Module):
    """Encoder MLP -> (mu, log sigma^2) -> IAF -> decoder MLP, on normalized features."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        init = config.initializer
        cells = list(config.cells_encoder or ())
        hidden = config.cells_hidden or 1
        k, d = config.dim_latent, config.dim_feature

        widths = [d, *cells]
        self.encoder_layers = nn.ModuleList(
            dense(a, b, init) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.posterior_hidden = dense(cells[-1], 2 * hidden, init)
        self.mu = dense(hidden, k, init)
        self.log_var = dense(hidden, k, init)
        self.flow = IAF(config.iaf_flow_length, k, cells[-1], hidden, init, config.initial_s_offset)
        dec_widths = [k, *reversed(cells)]
        self.decoder_layers = nn.ModuleList(
            dense(a, b, init) for a, b in zip(dec_widths[:-1], dec_widths[1:], strict=True)
        )
        self.decoder_out = dense(cells[0], d, init)

    def encode(self, x: Tensor, keep_prob: float = 1.0) -> Posterior:
        h = x
        for layer in self.encoder_layers:
            h = _dropout(torch.relu(layer(h)), keep_prob)
        t = _dropout(torch.relu(self.posterior_hidden(h)), keep_prob)
        t_mu, t_log_var = t.chunk(2, dim=-1)
        bound = self.config.log_var_bound
        # A soft bound keeps gradients alive where a clamp would cut them.
        log_var = bound * torch.tanh(self.log_var(t_log_var) / bound)
        return Posterior(self.mu(t_mu), log_var, h)

    def decode(self, z: Tensor, keep_prob: float = 1.0) -> Tensor:
        h = z
        for layer in self.decoder_layers:
            h = _dropout(torch.relu(layer(h)), keep_prob)
        return self.decoder_out(h)

    def embed(self, x: Tensor) -> Tensor:
        """Deterministic embedding: z_0 = mu pushed through the flow, no dropout."""
        post = self.encode(x)
        z, _ = self.flow(post.mu, post.hidden)
        return z

    def forward(self, x: Tensor, keep_prob: float = 1.0, eps: Tensor | None = None,
                generator: torch.Generator | None = None) -> VAEOutput:
        """Negative ELBO of a batch with one reparameterized sample per row.

        ``eps`` fixes the noise (tests, equivalence checks); otherwise it is drawn from
        ``generator`` (or torch's global RNG).
        """
        post = self.encode(x, keep_prob)
        if eps is None:
            eps = torch.randn(post.mu.shape, generator=generator, dtype=post.mu.dtype,
                              device=post.mu.device)
        z0 = post.mu + torch.exp(0.5 * post.log_var) * eps
        z, log_det = self.flow(z0, post.hidden)
        x_hat = self.decode(z, keep_prob)
        recon = gaussian_reconstruction(x, x_hat)
        kl = monte_carlo_kl(eps, post.log_var, z, log_det)
        return VAEOutput((recon + kl).mean(), recon, kl, z0, z, post.mu, post.log_var, x_hat)
