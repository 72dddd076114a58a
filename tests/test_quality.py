"""The quality report: figures equal scikit-learn's, labels used only where they form classes,
held-out rows really held out, and ``cvae train`` logs the report with the run and the version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from sklearn.manifold import trustworthiness as sk_trustworthiness
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from cvae_model import CompressionVAE
from cvae_model.config import TrainConfig
from cvae_model.fitted import FittedModel
from pipeline.quality import (
    KNN_METRIC,
    MSE_METRIC,
    TRUST_METRIC,
    held_out_sample,
    quality_report,
)
from pipeline.split import is_train_row

SMALL = {"dim_latent": 2, "iaf_flow_length": 1, "cells_encoder": [32, 16]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fitted(digits: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory
           ) -> CompressionVAE:
    """A small digits model, 300 steps with the neighbour term (a few seconds)."""
    X, _ = digits
    return CompressionVAE(X[:1200], logdir=tmp_path_factory.mktemp("q") / "m", random_state=0,
                          **SMALL).train(num_steps=300, neighbour_batch_size=128, verbose=False)


def test_figures_are_scikit_learns_on_the_same_rows(fitted: CompressionVAE,
                                                    digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits[0][1200:], digits[1][1200:]
    report = quality_report(fitted._model(), X, y)
    z = fitted.embed(X)
    assert report.rows == len(X) == 597
    assert report.trustworthiness == pytest.approx(sk_trustworthiness(X, z, n_neighbors=10), abs=1e-6)
    expected = cross_val_score(KNeighborsClassifier(10), z, y, cv=5).mean()
    assert report.knn_accuracy == pytest.approx(expected, abs=1e-9)
    assert report.reconstruction_mse == pytest.approx(float(((fitted.decode(z) - X) ** 2).mean()), rel=1e-4)
    assert set(report.metrics()) == {TRUST_METRIC, KNN_METRIC, MSE_METRIC, "quality_rows"}
    # A trained model scores far above a shuffled embedding (the figures measure something).
    assert report.knn_accuracy > 0.45 and report.trustworthiness > 0.8
    shuffled = np.random.default_rng(0).permutation(z)
    assert sk_trustworthiness(X, shuffled, n_neighbors=10) < 0.6


def test_labels_are_used_only_where_they_form_classes(fitted: CompressionVAE,
                                                      digits: tuple[np.ndarray, np.ndarray]) -> None:
    X = digits[0][1200:1500]
    model = fitted._model()
    assert quality_report(model, X).knn_accuracy is None
    assert KNN_METRIC not in quality_report(model, X).metrics()
    assert quality_report(model, X, np.zeros(300)).knn_accuracy is None  # one class
    assert quality_report(model, X, np.arange(300)).knn_accuracy is None  # a label per row
    with pytest.raises(ValueError, match=r"labels has shape \(299,\); expected \(300,\)"):
        quality_report(model, X, np.zeros(299))


def test_a_large_sample_is_cut_to_max_rows_the_same_way_each_time(
        fitted: CompressionVAE, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits
    model: FittedModel = fitted._model()
    first = quality_report(model, X, y, max_rows=400, seed=1)
    assert first.rows == 400
    assert first == quality_report(model, X, y, max_rows=400, seed=1)
    assert first != quality_report(model, X, y, max_rows=400, seed=2)
    with pytest.raises(ValueError, match="needs at least 22 rows; got 10"):
        quality_report(model, X[:10])


def test_held_out_sample_is_the_validation_side_with_folder_labels(ray_session: Any, tree: Path,
                                                                   rows: np.ndarray) -> None:
    X, labels = held_out_sample(str(tree), train_valid_split=0.9, seed=4, max_rows=300)
    assert X.shape == (300, 16) and labels is not None and labels.shape == (300,)
    # Every sampled row is a validation row of the split training used (seed 4, 0.9).
    ids = [f"shard{i % 10}/sub{i % 7}/{i}.npy" for i in range(len(rows))]
    held_out = ~is_train_row(np.array(ids), 0.9, seed=4)
    valid_rows = {rows[i].tobytes() for i in np.flatnonzero(held_out)}
    assert all(row.tobytes() in valid_rows for row in X)
    assert len(np.unique(labels)) > 10  # folders, from every part of the tree
    again, labels_again = held_out_sample(str(tree), train_valid_split=0.9, seed=4, max_rows=300)
    np.testing.assert_array_equal(again, X)
    np.testing.assert_array_equal(labels_again, labels)
    everything, _ = held_out_sample(str(tree), train_valid_split=0.9, seed=4, max_rows=10_000)
    assert len(everything) == held_out.sum()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cvae_train_logs_the_report_with_the_run_and_the_version(
        ray_session: Any, cvae_home: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Digits as a tree of .npy files, one folder per class: the report has kNN accuracy."""
    from jobs.train import main

    X, y = digits
    for i, (row, label) in enumerate(zip(X, y, strict=True)):
        (tmp_path / "tree" / f"class{label}").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "tree" / f"class{label}" / f"{i}.npy", row)
    code = main(["--data", str(tmp_path / "tree"), "--num-workers", "2", "--num-steps", "300",
                 "--test-every", "150", "--checkpoint-every", "300", "--cells-encoder", "32,16",
                 "--iaf-flow-length", "1", "--neighbour-batch-size", "128", "--run-name", "quality",
                 "--register-as", "digits", "--alias", "champion", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    quality = summary["quality"]
    assert set(quality) == {TRUST_METRIC, KNN_METRIC, MSE_METRIC, "quality_rows"}
    assert 150 <= quality["quality_rows"] <= 2000 and quality[KNN_METRIC] > 0.5
    client = mlflow.MlflowClient(f"sqlite:///{cvae_home / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics[TRUST_METRIC] == pytest.approx(quality[TRUST_METRIC])
    # The term's settings are params of the run (the default weight, the batch size given).
    assert float(run.data.params["train.neighbour_weight"]) == TrainConfig().neighbour_weight
    assert run.data.params["train.neighbour_batch_size"] == "128"
    version = client.get_model_version("digits", "1")
    assert float(version.tags[f"metric.{KNN_METRIC}"]) == pytest.approx(quality[KNN_METRIC])
    assert float(version.tags[f"metric.{TRUST_METRIC}"]) == pytest.approx(quality[TRUST_METRIC])
