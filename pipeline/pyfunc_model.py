"""The MLflow pyfunc wrapper of a cvae model, logged as "models from code".

MLflow stores this file's source with the model and executes it at load time (it ends with
``mlflow.models.set_model``); ``load_context`` then builds ``cvae_model.fitted.FittedModel``
(the one inference implementation) from the checkpoint artifact (``config.json``, ``model.pt`` loaded with
``weights_only=True``, ``normalization.npz``). No pickled instance of any cvae class is in the
load path.

``predict`` takes a 2-D float32 numpy array or a DataFrame with one column per feature::

    model = mlflow.pyfunc.load_model("models:/NAME@ALIAS")
    z = model.predict(X)                                    # (n, dim_latent) embeddings
    X_back = model.predict(z, params={"output": "decode"})  # (n, dim_feature) features

Over HTTP (``mlflow models serve``) the same choice is ``{"inputs": [[...]], "params":
{"output": "decode"}}``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

__all__ = ["OUTPUTS", "CVAEPyfunc"]

OUTPUTS = ("embed", "decode")
"""Values of the ``output`` parameter of ``predict``; ``embed`` is the default."""


class CVAEPyfunc(PythonModel):
    """Embeds rows of features, or (``params={"output": "decode"}``) decodes latent rows."""

    def load_context(self, context: PythonModelContext) -> None:
        from cvae_model.checkpoint import find_checkpoint, load_checkpoint
        from cvae_model.fitted import FittedModel

        self.fitted = FittedModel.from_checkpoint(
            load_checkpoint(find_checkpoint(context.artifacts["checkpoint"])))

    @staticmethod
    def _as_array(model_input: Any) -> Any:
        if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor input
            model_input = next(iter(model_input.values()))
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.to_numpy()
        return model_input

    # The hint is exactly np.ndarray on purpose: MLflow derives (and enforces) an input schema
    # from other predict hints, and warns at every import about a missing or unusable one
    # (Any, a Union); for ndarray and DataFrame it does neither. DataFrames arrive too.
    def predict(self, context: PythonModelContext | None, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """Embeddings (n, dim_latent) of feature rows, or features (n, dim_feature) of latent
        rows when ``params["output"] == "decode"``; float32 either way.

        ``model_input``: a 2-D array, or a DataFrame with one numeric column per feature.
        """
        output = (params or {}).get("output") or "embed"
        if output == "embed":
            return self.fitted.embed(self._as_array(model_input))
        if output == "decode":
            return self.fitted.decode(self._as_array(model_input))
        raise ValueError(f"The 'output' parameter must be one of {', '.join(OUTPUTS)}; "
                         f"got {output!r}.")


mlflow.models.set_model(CVAEPyfunc())
