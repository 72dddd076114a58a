"""The one door from ``cvae_model`` to ``pipeline`` (Ray, MLflow, object stores).

The estimator may stream a path, train on Ray Train or load a model by reference; it does all
three through these functions, whose imports are lazy, so ``import cvae_model`` never loads Ray,
MLflow or pyarrow's filesystems. Nothing else in ``cvae_model`` imports ``pipeline``.
"""

from __future__ import annotations

import os
from typing import Any

from cvae_model.checkpoint import Checkpoint
from cvae_model.config import TrainConfig
from cvae_model.data import TrainingData
from cvae_model.paths import is_uri

__all__ = ["is_remote_reference", "load_reference", "open_path_data", "train_on_ray"]


def is_remote_reference(reference: str | os.PathLike[str]) -> bool:
    """True for references ``pipeline`` resolves: ``models:/``, ``runs:/``, object-store URIs."""
    text = os.fspath(reference)
    return text.startswith(("models:/", "runs:/")) or (is_uri(text) and not text.startswith("file://"))


def load_reference(reference: str) -> Checkpoint:
    """The checkpoint a model reference names (``pipeline.model_uri.resolve_model``)."""
    from pipeline.model_uri import resolve_model

    return resolve_model(reference).checkpoint


def open_path_data(X: Any, X_valid: Any, train_valid_split: float, seed: int,
                   dim_feature: int | None) -> TrainingData:
    """A ``.npy`` tree or parquet data set (a path or URI) as training data, streamed."""
    from pipeline.streaming import StreamingData

    return StreamingData.open(X, X_valid, train_valid_split, seed=seed, dim_feature=dim_feature)


def train_on_ray(initial: Checkpoint, data: TrainingData, config: TrainConfig,
                 num_workers: int) -> tuple[Checkpoint, list[dict[str, float]]]:
    """Continue ``initial`` for ``config.num_steps`` on ``num_workers`` Ray Train workers.

    Returns the final checkpoint and the validation history (one dict per validation).
    """
    from pipeline.ray_training import train_estimator_on_ray

    return train_estimator_on_ray(initial, data, config, num_workers)
