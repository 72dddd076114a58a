"""The MLflow pyfunc wrapper of a cvae model, logged as "models from code".

MLflow stores this file's source with the model and runs it at load time; ``load_context``
rebuilds the VAE from the checkpoint artifact (``config.json``, ``model.pt`` loaded with
``weights_only=True``, ``normalization.npz``). No pickled instance of any cvae class is in the
load path.

``predict`` embeds rows (numpy array or DataFrame with one column per feature). Decoding is
reached through the unwrapped model::

    model = mlflow.pyfunc.load_model("models:/NAME@ALIAS")
    z = model.predict(X)
    X_back = model.unwrap_python_model().decode(z)
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

__all__ = ["CVAEPyfunc"]


class CVAEPyfunc(PythonModel):
    """Embeds rows of features; ``decode`` maps latent rows back to features."""

    def load_context(self, context: PythonModelContext) -> None:
        from cvae_model.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(context.artifacts["checkpoint"])
        self.model = checkpoint.build_model().eval()
        self.normalizer = checkpoint.normalizer
        self.config = checkpoint.model_config

    def _features(self, model_input: Any) -> np.ndarray:
        from cvae_model.validation import check_features

        if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor input
            model_input = next(iter(model_input.values()))
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.to_numpy()
        return check_features(model_input, "X", self.config.dim_feature)

    def predict(self, context: PythonModelContext | None, model_input: Any,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """Embeddings, float32 array of shape (n_rows, dim_latent)."""
        import torch

        x = self.normalizer.transform(self._features(model_input))
        with torch.inference_mode():
            return self.model.embed(torch.from_numpy(x)).numpy()

    def decode(self, z: Any) -> np.ndarray:
        """Features reconstructed from latent rows, shape (n_rows, n_features)."""
        import torch

        from cvae_model.validation import check_latents

        latents = check_latents(np.asarray(z), self.config.dim_latent)
        with torch.inference_mode():
            x = self.model.decode(torch.from_numpy(latents)).numpy()
        return self.normalizer.inverse_transform(x)


mlflow.models.set_model(CVAEPyfunc())
