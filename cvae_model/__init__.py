"""cvae_model: CompressionVAE in PyTorch (a VAE with Inverse Autoregressive Flow layers).

The package is torch-only and free of I/O except ``checkpoint``; ``CompressionVAE`` is the
UMAP/scikit-learn-style estimator.
"""

from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.estimator import CompressionVAE, NotFittedError

__all__ = ["CompressionVAE", "ModelConfig", "NotFittedError", "TrainConfig", "load"]


def load(uri: str) -> CompressionVAE:
    """Load a trained estimator from a logdir, checkpoint directory or MLflow model URI."""
    return CompressionVAE.load(uri)
