"""``FittedModel``: a trained VAE with its normalizer and config, ready to embed, decode and score.

The one implementation of inference. The estimator, the MLflow pyfunc model and the Ray Data
batch workers all call it, so the checks (width, dtype, finite inputs and outputs, in
scikit-learn's wording) and the arithmetic are the same everywhere.

Example:
    >>> fitted = FittedModel.from_checkpoint(load_checkpoint("logdir/checkpoint-000001000"))  # doctest: +SKIP
    >>> z = fitted.embed(X)          # (n, dim_latent) float32
    >>> X_back = fitted.decode(z)    # (n, dim_feature) float32, in the data's units
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from cvae_model.checkpoint import Checkpoint
from cvae_model.config import ModelConfig
from cvae_model.normalization import Normalizer
from cvae_model.vae import VAE
from cvae_model.validation import check_features, check_latents

__all__ = ["FittedModel", "NonFiniteOutputError", "Scores"]

DEFAULT_BATCH_ROWS = 8192
"""Rows per forward pass when the caller gives no batch size: bounds memory, not results."""


class NonFiniteOutputError(ValueError):
    """The model produced NaN or infinity for some rows (inputs far outside the training range)."""

    def __init__(self, message: str, rows: np.ndarray) -> None:
        super().__init__(message)
        self.rows = rows
        """Indices (within the call's input) of the rows with a non-finite output."""

    def __reduce__(self) -> tuple[type, tuple[str, np.ndarray]]:  # picklable across Ray tasks
        return type(self), (str(self), self.rows)


class Scores(NamedTuple):
    neg_elbo: np.ndarray
    """Per-row negative ELBO averaged over fixed Monte-Carlo draws, shape (n,): an anomaly score."""
    reconstruction_error: np.ndarray
    """Per-row reconstruction term at the posterior mean (no noise), shape (n,)."""


def _check_finite(out: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(out).all(dim=1)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).flatten().cpu().numpy()
        raise NonFiniteOutputError(
            f"The {what} of {len(rows)} row(s) is not finite (first: row {int(rows[0])}); their "
            "values are far outside the range the model was trained on", rows)


class FittedModel:
    """A VAE with its normalizer, on one device (the VAE is shared, not copied)."""

    def __init__(self, model: VAE, normalizer: Normalizer, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.normalizer = normalizer
        self._norm = normalizer.to_torch(self.device)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device: str | torch.device = "cpu") -> FittedModel:
        return cls(checkpoint.build_model(), checkpoint.normalizer, device)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], where: str = "the model",
                   device: str | torch.device = "cpu") -> FittedModel:
        """From a checkpoint's files as bytes (how a model travels between processes)."""
        return cls.from_checkpoint(Checkpoint.from_files(files, where), device)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def dim_feature(self) -> int:
        return self.config.dim_feature

    @property
    def dim_latent(self) -> int:
        return self.config.dim_latent

    # ------------------------------------------------------------------ tensors
    def _map(self, rows: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor],
             batch_size: int | None) -> np.ndarray:
        size = int(batch_size or DEFAULT_BATCH_ROWS)
        parts = []
        # Arrow-backed batches are read-only views; torch only reads them.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for start in range(0, rows.shape[0], size):
                parts.append(fn(torch.from_numpy(rows[start:start + size]).to(self.device)).cpu())
        return torch.cat(parts).numpy()

    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of raw (un-normalized) feature rows already on the device; no checks."""
        return self.model.embed(self._norm.normalize(x))

    def decode_tensor(self, z: torch.Tensor) -> torch.Tensor:
        """Features (in the data's units) of latent rows already on the device; no checks."""
        return self._norm.denormalize(self.model.decode(z))

    # ------------------------------------------------------------------ arrays
    def embed(self, X: Any, batch_size: int | None = None, *, name: str = "X") -> np.ndarray:
        """Embed rows of X: float32 (n_samples, dim_latent).

        Deterministic (the posterior mean pushed through the flow, no dropout) and independent
        of ``batch_size``. Raises ValueError naming the problem for a wrong width, NaN/inf or
        non-numeric input, and ``NonFiniteOutputError`` when an output row is not finite.
        """
        rows = check_features(X, name, self.dim_feature)

        def embed(x: torch.Tensor) -> torch.Tensor:
            z = self.embed_tensor(x)
            _check_finite(z, "embedding")
            return z

        return self._map(rows, embed, batch_size)

    def decode(self, z: Any, batch_size: int | None = None, *, name: str = "z") -> np.ndarray:
        """Decode latent rows to feature space (the data's units): float32 (n, dim_feature)."""
        latents = check_latents(z, self.dim_latent, name)

        def decode(t: torch.Tensor) -> torch.Tensor:
            x = self.decode_tensor(t)
            _check_finite(x, "decoding")
            return x

        return self._map(latents, decode, batch_size)

    def scores(self, X: Any, samples: int = 8, seed: int = 0,
               batch_size: int | None = None) -> Scores:
        """Per-row negative ELBO (mean over ``samples`` fixed draws) and reconstruction error.

        The draws come from ``seed`` and are the same for every row and batch, so a row's score
        does not depend on batching, ordering or the worker that computed it.
        """
        rows = check_features(X, "X", self.dim_feature)
        generator = torch.Generator().manual_seed(int(seed))
        draws = torch.randn((int(samples), self.dim_latent), generator=generator).to(self.device)

        def score(x: torch.Tensor) -> torch.Tensor:
            xn = self._norm.normalize(x)
            zeros = torch.zeros((x.shape[0], self.dim_latent), dtype=x.dtype, device=x.device)
            recon = self.model(xn, 1.0, zeros).recon
            total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for eps in draws:
                out = self.model(xn, 1.0, eps.expand_as(zeros))
                total += out.recon + out.kl
            return torch.stack([total / len(draws), recon], dim=1)

        both = self._map(rows, score, batch_size)
        return Scores(both[:, 0].copy(), both[:, 1].copy())
