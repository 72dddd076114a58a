"""The quality report of a trained model: does its embedding keep the data's neighbourhoods?

Three figures on a held-out sample (rows training never saw), the ones the README's tables use:

- ``quality_trustworthiness``: scikit-learn's ``trustworthiness(X, Z, n_neighbors=10)`` of the
  sample's raw features ``X`` and embedding ``Z`` (1 when every embedded 10-NN is an input
  10-NN; t-SNE and UMAP reach 0.96-0.99 on digits and MNIST);
- ``quality_knn_accuracy``: 10-NN classifier accuracy on ``Z``, 5-fold cross-validated (where
  labels exist: an ``.npy`` tree's folders, or labels the caller passes);
- ``quality_reconstruction_mse``: mean squared error of ``decode(embed(X))`` in feature units.

``cvae train`` computes the report after training, logs the figures as metrics of the run and
as ``metric.quality_*`` tags of the registered version; ``cvae models promote`` compares them.
scikit-learn is a core dependency for this (MLflow already installs it): its trustworthiness is
the reference implementation the published figures were measured with.

Example:
    >>> report = quality_report(FittedModel.from_checkpoint(ckpt), X, y)  # doctest: +SKIP
    >>> report.metrics()["quality_trustworthiness"]  # doctest: +SKIP
    0.97
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvae_model.fitted import FittedModel
from cvae_model.seeds import VALIDATION, derive_seed

__all__ = [
    "KNN_METRIC",
    "MSE_METRIC",
    "QUALITY_ROWS",
    "QualityReport",
    "TRUST_METRIC",
    "held_out_sample",
    "knn_accuracy",
    "log_quality",
    "quality_report",
    "trustworthiness",
]

logger = logging.getLogger("cvae.quality")

NEIGHBOURS = 10
"""k of both figures (the issue's and the README's tables use 10)."""
FOLDS = 5
QUALITY_ROWS = 2000
"""Default held-out sample size: trustworthiness is O(n^2) in memory and time (about 1 s here)."""
KNN_METRIC = "quality_knn_accuracy"
TRUST_METRIC = "quality_trustworthiness"
MSE_METRIC = "quality_reconstruction_mse"
ROWS_METRIC = "quality_rows"


@dataclass(frozen=True)
class QualityReport:
    """Figures of one model on one held-out sample."""

    rows: int
    trustworthiness: float
    knn_accuracy: float | None
    """None when the sample has no usable labels."""
    reconstruction_mse: float
    k: int = NEIGHBOURS

    def metrics(self) -> dict[str, float]:
        """The figures under their MLflow metric names (kNN accuracy only where labels exist)."""
        out = {TRUST_METRIC: self.trustworthiness, MSE_METRIC: self.reconstruction_mse,
               ROWS_METRIC: float(self.rows)}
        if self.knn_accuracy is not None:
            out[KNN_METRIC] = self.knn_accuracy
        return out


def trustworthiness(X: np.ndarray, Z: np.ndarray, k: int = NEIGHBOURS) -> float:
    """scikit-learn's trustworthiness of embedding ``Z`` (n, k') of ``X`` (n, d), in [0, 1]."""
    from sklearn.manifold import trustworthiness as sk_trustworthiness

    n = X.shape[0]
    if n < 2 * k + 2:  # scikit-learn requires k < n / 2
        raise ValueError(f"trustworthiness with k={k} needs at least {2 * k + 2} rows; got {n}")
    return float(sk_trustworthiness(X, Z, n_neighbors=k))


def knn_accuracy(Z: np.ndarray, labels: np.ndarray, k: int = NEIGHBOURS, folds: int = FOLDS) -> float:
    """Mean accuracy of a k-NN classifier on ``Z`` (n, k'), stratified ``folds``-fold CV
    (deterministic: no shuffling; rows in a fixed order give a fixed figure)."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(k), Z, labels, cv=folds).mean())


def usable_labels(labels: Any, rows: int) -> np.ndarray | None:
    """``labels`` as an array when they make classes worth scoring, else None (logged): at
    least 2 classes and on average at least ``FOLDS`` rows per class (a folder per file is no
    class structure)."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (rows,):
        raise ValueError(f"labels has shape {labels.shape}; expected ({rows},), one per row of X")
    classes = len(np.unique(labels))
    if classes < 2 or classes * FOLDS > rows:
        logger.info("kNN accuracy skipped: %d distinct labels in %d rows", classes, rows)
        return None
    return labels


def quality_report(model: FittedModel, X: Any, labels: Any = None, *, k: int = NEIGHBOURS,
                   max_rows: int = QUALITY_ROWS, seed: int = 0) -> QualityReport:
    """The report of ``model`` on rows ``X`` (n, d) in feature units (not normalized), with
    optional ``labels`` (n,). More than ``max_rows`` rows: a seeded sample of ``max_rows``."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows, features); got shape {X.shape}")
    labels = None if labels is None else np.asarray(labels)
    if X.shape[0] > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(X.shape[0], max_rows, replace=False))
        X = X[keep]
        labels = None if labels is None else labels[keep]
    labels = usable_labels(labels, X.shape[0])
    Z = model.embed(X)
    reconstruction = model.decode(Z)
    mse = float(np.mean((reconstruction.astype(np.float64) - X) ** 2))
    accuracy = knn_accuracy(Z, labels, k) if labels is not None else None
    return QualityReport(X.shape[0], trustworthiness(X, Z, k), accuracy, mse, k)


def held_out_sample(source: Any, *, valid_source: Any = None, train_valid_split: float = 0.9,
                    seed: int, max_rows: int = QUALITY_ROWS) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to about ``max_rows`` rows that training did not see, and their labels (``.npy``
    trees: each file's folder; else None), ordered by id. Needs Ray.

    The rows come from ``valid_source`` when given, else from the validation side of the split
    by id hash that training used (``seed``, ``train_valid_split``); among them a row is taken
    when a second, independent hash of its id falls below the sampling fraction, so the sample
    is the same whatever the blocks or workers. One pass over the source.
    """
    from pipeline.prepare import as_source
    from pipeline.sources import SourceSpec, open_source, raise_data_errors, read_source
    from pipeline.split import split_by_id

    spec = as_source(valid_source if valid_source is not None else source)
    opened = open_source(spec) if isinstance(spec, SourceSpec) else np.asarray(spec)
    expected = float(opened.rows if not isinstance(opened, np.ndarray) else opened.shape[0])
    dataset = read_source(opened)
    if valid_source is None and train_valid_split < 1.0:
        _, dataset = split_by_id(dataset, train_valid_split, seed=seed)
        expected *= 1.0 - train_valid_split
    fraction = min(1.0, 1.2 * max_rows / max(expected, 1.0))
    if fraction < 1.0:
        dataset, _ = split_by_id(dataset, fraction, seed=derive_seed(seed, VALIDATION, 1))
    ids, rows, labels = [], [], []
    with raise_data_errors():
        for batch in dataset.iter_batches(batch_size=8192, batch_format="numpy"):
            ids.append(np.asarray(batch["id"]))
            rows.append(np.asarray(batch["features"], dtype=np.float32).reshape(len(batch["id"]), -1))
            if "label" in batch:
                labels.append(np.asarray(batch["label"]))
    if not rows:
        raise ValueError(f"No held-out rows to report quality on (train_valid_split="
                         f"{train_valid_split}); pass a validation source or lower the split")
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids.astype(str), kind="stable")  # a fixed order, whatever the blocks
    if order.size > max_rows:  # the hash overshoots a little: trim at random, not by id order
        order = order[np.sort(np.random.default_rng(seed).choice(order.size, max_rows, replace=False))]
    X = np.concatenate(rows)[order]
    y = np.concatenate(labels)[order] if len(labels) == len(rows) else None
    return X, y


def log_quality(run_id: str | None, report: QualityReport, step: int) -> None:
    """Log the report's figures as metrics of MLflow run ``run_id`` at ``step`` (best-effort,
    as all tracking: an unreachable server is logged and the job goes on)."""
    if run_id is None:
        return
    from pipeline.tracking import RunTracker, tracking_uri

    tracker = RunTracker.attach(tracking_uri(), run_id)
    tracker.log_metrics(report.metrics(), step)
    tracker.set_tags({"cvae.quality_k": str(report.k)})
