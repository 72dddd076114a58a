"""cvae_model: CompressionVAE in PyTorch (a VAE with Inverse Autoregressive Flow layers).

The package is torch-only and free of I/O except ``checkpoint``; ``CompressionVAE`` is the
UMAP/scikit-learn-style estimator.

The names below are imported on first use (PEP 562): ``import cvae_model.paths``, which every
Ray Data read task does through ``pipeline.storage``, must not import torch (3 s per new worker
process, far more on a loaded machine).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cvae_model.config import ModelConfig, TrainConfig
    from cvae_model.estimator import CompressionVAE, NotFittedError

__all__ = ["CompressionVAE", "ModelConfig", "NotFittedError", "TrainConfig", "load"]

_HOMES = {"CompressionVAE": "cvae_model.estimator", "NotFittedError": "cvae_model.estimator",
          "ModelConfig": "cvae_model.config", "TrainConfig": "cvae_model.config"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'cvae_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


def load(uri: str) -> CompressionVAE:
    """Load a trained estimator from a logdir, checkpoint directory or MLflow model URI."""
    from cvae_model.estimator import CompressionVAE

    return CompressionVAE.load(uri)
