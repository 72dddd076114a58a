"""The VAE with IAF layers: encoder, flow, decoder, and the loss, as the original defines them.

Dropout is an argument of ``forward`` (a keep probability, as in the original), not a module
state, so embedding and decoding are deterministic whatever ``train()``/``eval()`` mode the module
is in. Its masks, like the reparameterization noise, are drawn from an optional
``torch.Generator``, so a training step's randomness can be a function of (seed, step) alone.

``upgrade_state_dict`` converts a state dict of the first layout (checkpoint format_version 1:
the IAF output layer stored as a masked dense matrix) to the current one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from cvae_model.config import ModelConfig
from cvae_model.flows import IAF
from cvae_model.layers import dense
from cvae_model.losses import gaussian_reconstruction, monte_carlo_kl

__all__ = ["VAE", "VAEOutput", "Posterior", "upgrade_state_dict", "upgrade_optimizer_state_dict"]


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
    embedding: Tensor | None = None
    """``embed(embed_rows)`` when ``forward`` was given ``embed_rows`` (the neighbour term's
    input, computed inside ``forward`` so that DDP sees every use of the weights), else None."""


def _dropout(h: Tensor, keep_prob: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout: keep each unit with probability ``keep_prob`` and scale by 1/keep_prob.

    The mask is drawn from ``generator`` (torch's global RNG when None); keep_prob >= 1 draws
    nothing and returns ``h`` itself.
    """
    if keep_prob >= 1.0:
        return h
    noise = torch.rand(h.shape, generator=generator, dtype=h.dtype, device=h.device)
    return h * noise.lt_(keep_prob).div_(keep_prob)  # lt_ keeps the float dtype: 0 or 1


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

    def encode(self, x: Tensor, keep_prob: float = 1.0,
               generator: torch.Generator | None = None) -> Posterior:
        h = x
        for layer in self.encoder_layers:
            h = _dropout(torch.relu(layer(h)), keep_prob, generator)
        t = _dropout(torch.relu(self.posterior_hidden(h)), keep_prob, generator)
        t_mu, t_log_var = t.chunk(2, dim=-1)
        bound = self.config.log_var_bound
        # A soft bound keeps gradients alive where a clamp would cut them.
        log_var = bound * torch.tanh(self.log_var(t_log_var) / bound)
        return Posterior(self.mu(t_mu), log_var, h)

    def decode(self, z: Tensor, keep_prob: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        h = z
        for layer in self.decoder_layers:
            h = _dropout(torch.relu(layer(h)), keep_prob, generator)
        return self.decoder_out(h)

    def embed(self, x: Tensor) -> Tensor:
        """Deterministic embedding: z_0 = mu pushed through the flow, no dropout."""
        post = self.encode(x)
        z, _ = self.flow(post.mu, post.hidden)
        return z

    def draw_noise(self, batch_shape: tuple[int, ...],
                   generator: torch.Generator | None = None) -> Tensor:
        """The reparameterization's standard normal noise for a batch of ``batch_shape`` rows,
        in the parameters' dtype and device: the one draw ``forward`` makes when not given
        ``eps`` (``train_step`` makes it before the forward when there is no dropout)."""
        weight = self.mu.weight
        return torch.randn((*batch_shape, self.config.dim_latent), generator=generator,
                           dtype=weight.dtype, device=weight.device)

    def forward(self, x: Tensor, keep_prob: float = 1.0, eps: Tensor | None = None,
                generator: torch.Generator | None = None,
                embed_rows: Tensor | None = None) -> VAEOutput:
        """Negative ELBO of a batch with one reparameterized sample per row.

        ``eps`` fixes the noise (tests, equivalence checks); otherwise it is drawn from
        ``generator`` (or torch's global RNG). The dropout masks come from ``generator`` too, in
        this order: encoder layers, noise, decoder layers. ``embed_rows`` (m, d), optional:
        also return their deterministic ``embed`` (no randomness drawn), with its graph.
        """
        post = self.encode(x, keep_prob, generator)
        if eps is None:
            eps = self.draw_noise(post.mu.shape[:-1], generator)
        z0 = post.mu + torch.exp(0.5 * post.log_var) * eps
        z, log_det = self.flow(z0, post.hidden)
        x_hat = self.decode(z, keep_prob, generator)
        recon = gaussian_reconstruction(x, x_hat)
        kl = monte_carlo_kl(eps, post.log_var, z, log_det)
        if embed_rows is x and keep_prob >= 1.0:  # embed(x)'s encoder pass is the one above
            embedding: Tensor | None = self.flow(post.mu, post.hidden)[0]
        else:
            embedding = None if embed_rows is None else self.embed(embed_rows)
        return VAEOutput((recon + kl).mean(), recon, kl, z0, z, post.mu, post.log_var, x_hat,
                         embedding)


def _block_diagonal_of(weight: Tensor, k: int, h: int) -> Tensor:
    """``(2k, k*h)`` masked dense output weight (row c*k + j reads hidden block j) -> ``(2, k, h)``."""
    if tuple(weight.shape) != (2 * k, k * h):
        raise ValueError(f"IAF output weight of shape {tuple(weight.shape)}; expected {(2 * k, k * h)} "
                         f"for dim_latent={k}, cells_hidden={h}")
    return torch.diagonal(weight.reshape(2, k, k, h), dim1=1, dim2=2).transpose(1, 2).contiguous()


def _upgrade_out_layer(name: str, value: Tensor, k: int, h: int) -> Tensor | None:
    """New-layout value of a format-1 IAF output-layer entry (None: dropped); others unchanged."""
    prefix, _, leaf = name.rpartition(".")
    if not (prefix.startswith("flow.steps.") and prefix.endswith(".net.out")):
        return value
    if leaf == "mask":
        return None
    if leaf == "weight" and value.dim() == 2:
        return _block_diagonal_of(value, k, h)
    if leaf == "bias" and value.dim() == 1:
        return value.reshape(2, k).clone()
    return value


def upgrade_state_dict(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Convert a format_version-1 state dict (``flow.steps.*.net.out`` a masked dense layer:
    ``weight (2k, k*h)``, ``bias (2k,)``, ``mask``) to the current layout (``weight (2, k, h)``,
    ``bias (2, k)``, no mask). Exact: only the entries the mask kept are read, and the model
    computes the same function. Entries already in the current layout pass through."""
    k, h = config.dim_latent, int(config.cells_hidden or 1)
    out = {}
    for name, value in state_dict.items():
        new = _upgrade_out_layer(name, value, k, h)
        if new is not None:
            out[name] = new
    return out


def upgrade_optimizer_state_dict(optimizer_state: dict, config: ModelConfig) -> dict:
    """Convert the state dict of an optimizer over ``VAE.parameters()`` (e.g. Adam's exp_avg,
    exp_avg_sq) saved with a format_version-1 model to the current layout, as
    ``upgrade_state_dict`` does for the weights. Exact for Adam: a masked entry's gradient was
    always 0, so its moments were 0 and nothing is lost."""
    with torch.random.fork_rng(devices=[]):  # building the model must not move the global RNG
        names = [name for name, _ in VAE(config).named_parameters()]
    k, h = config.dim_latent, int(config.cells_hidden or 1)
    state = {}
    for index, entry in optimizer_state["state"].items():
        name = names[int(index)]
        state[index] = {
            key: _upgrade_out_layer(name, value, k, h)
            if isinstance(value, Tensor) and value.dim() > 0 else value
            for key, value in entry.items()
        }
    return {**optimizer_state, "state": state}
