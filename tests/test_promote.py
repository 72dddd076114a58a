"""``cvae models promote``: an alias moves only to a version whose quality report is not worse,
against a real MLflow store (SQLite, as the embedded default)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from registry_helpers import EXPERIMENT, use_store

from cvae_model import CompressionVAE
from jobs.models import PROMOTION_REFUSED, main
from pipeline.quality import KNN_METRIC, TRUST_METRIC, quality_report
from pipeline.registry import client_for, log_cvae_model, register
from pipeline.tracking import ensure_experiment

SMALL = {"dim_latent": 2, "iaf_flow_length": 1, "cells_encoder": [32, 16]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def publish_with_report(model: CompressionVAE, X: np.ndarray, y: np.ndarray, name: str,
                        aliases: list[str], with_report: bool = True) -> str:
    """Log + register as ``cvae train`` does: the quality report as run metrics and version tags."""
    client_for()
    mlflow.set_experiment(experiment_id=ensure_experiment(EXPERIMENT))
    metrics = quality_report(model._model(), X, y).metrics() if with_report else {"val_loss": 1.0}
    with mlflow.start_run() as run:
        mlflow.log_metrics(metrics)
        info = log_cvae_model(model._checkpoint())
    return str(register(info.model_uri, name, aliases, run_id=run.info.run_id, metrics=metrics).version)


@pytest.fixture(scope="module")
def models(digits: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, CompressionVAE]:
    """An untrained model (poor figures) and a trained one (good figures), on digits."""
    X = digits[0][:1200]
    root = tmp_path_factory.mktemp("promote")
    poor = CompressionVAE(X, logdir=root / "poor", random_state=0, **SMALL).train(num_steps=0, verbose=False)
    good = CompressionVAE(X, logdir=root / "good", random_state=0, **SMALL).train(
        num_steps=300, neighbour_batch_size=128, verbose=False)
    return {"poor": poor, "good": good}


@pytest.fixture()
def held_out(digits: tuple[np.ndarray, np.ndarray], tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """This test's own embedded store, and the digits the models did not train on (the rows
    their quality reports are computed on)."""
    use_store(tmp_path / "home", monkeypatch)
    return digits[0][1200:], digits[1][1200:]


def alias_target(name: str, alias: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)


@pytest.mark.timeout(300)
def test_promote_moves_the_alias_for_a_better_candidate_and_refuses_a_worse_one(
        models: dict[str, CompressionVAE], held_out: tuple[np.ndarray, np.ndarray],
        capsys: pytest.CaptureFixture[str]) -> None:
    X, y = held_out
    poor = publish_with_report(models["poor"], X, y, "digits", ["champion"])
    good = publish_with_report(models["good"], X, y, "digits", [])
    figures = {v: mlflow.MlflowClient().get_model_version("digits", v).tags for v in (poor, good)}
    assert float(figures[good][f"metric.{KNN_METRIC}"]) > float(figures[poor][f"metric.{KNN_METRIC}"])

    # Better on both figures: the alias moves.
    assert main(["promote", "digits", "--candidate", good, "--alias", "champion"]) == 0
    out = capsys.readouterr().out
    assert f"models:/digits@champion -> version {good} (was version {poor})" in out
    assert alias_target("digits", "champion") == good

    # Worse: refused with each figure named, exit code 3, the alias stays.
    assert main(["promote", "digits", "--candidate", poor, "--alias", "champion"]) == PROMOTION_REFUSED
    err = capsys.readouterr().err
    assert f"Not promoting version {poor} of 'digits' to @champion: it is worse than version {good} on" in err
    assert f"{KNN_METRIC}: " in err and f"{TRUST_METRIC}: " in err
    assert f"@champion stays on version {good}" in err
    assert alias_target("digits", "champion") == good

    # A tolerance as wide as the gap lets it through; a new alias has nothing to beat.
    gap = max(float(figures[good][f"metric.{m}"]) - float(figures[poor][f"metric.{m}"])
              for m in (KNN_METRIC, TRUST_METRIC))
    assert main(["promote", "digits", "--candidate", poor, "--alias", "staging"]) == 0
    assert alias_target("digits", "staging") == poor
    assert main(["promote", "digits", "--candidate", poor, "--alias", "champion",
                 "--tolerance", str(gap + 1e-6)]) == 0
    assert alias_target("digits", "champion") == poor


@pytest.mark.timeout(300)
def test_promote_refuses_a_version_without_a_report_and_unknown_versions(
        models: dict[str, CompressionVAE], held_out: tuple[np.ndarray, np.ndarray],
        capsys: pytest.CaptureFixture[str]) -> None:
    X, y = held_out
    good = publish_with_report(models["good"], X, y, "digits", ["champion"])
    bare = publish_with_report(models["good"], X, y, "digits", [], with_report=False)
    assert main(["promote", "digits", "--candidate", bare, "--alias", "staging"]) == PROMOTION_REFUSED
    assert f"Version {bare} of 'digits' has no quality report" in capsys.readouterr().err
    assert main(["promote", "digits", "--candidate", "9", "--alias", "champion"]) == 1
    assert "Model 'digits' has no version 9; versions: 1, 2" in capsys.readouterr().err
    assert main(["promote", "nothing", "--candidate", "1", "--alias", "champion"]) == 1
    assert "No registered model 'nothing'" in capsys.readouterr().err
    assert alias_target("digits", "champion") == good
