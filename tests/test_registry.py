"""The MLflow registry on the embedded SQLite store: pyfunc packaging, register, aliases,
loading by ``models:/NAME@ALIAS`` (in a fresh process), the CLI, and every bad reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from registry_helpers import (  # noqa: F401 - data and trained are fixtures
    EXPERIMENT,
    data,
    embed_in_fresh_process,
    publish,
    trained,
    use_store,
)

from cvae_model import CompressionVAE
from cvae_model.checkpoint import load_checkpoint
from jobs import models as models_cli
from pipeline.model_uri import resolve_model
from pipeline.registry import (
    ModelNotFoundError,
    client_for,
    describe_version,
    list_models,
    log_cvae_model,
    register,
    set_alias,
)
from pipeline.tracking import ensure_experiment

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """This test's own embedded store, for tests that change the registry."""
    return use_store(tmp_path / "home", monkeypatch)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory,
                 trained: list[tuple[CompressionVAE, Path]]) -> Iterator[str]:
    """One store for the tests that only read it: 'embedder' version 1, alias 'champion'."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        uri = use_store(tmp_path_factory.mktemp("shared") / "home", monkeypatch)
        publish(*trained[0], "embedder", ["champion"])
        yield uri


@pytest.fixture()
def registered(shared_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The shared store, re-selected (a test's own store may have been selected since)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    mlflow.set_tracking_uri(shared_store)
    return shared_store


def test_register_alias_and_load_by_alias_in_a_fresh_process(
        store: str, tmp_path: Path, data: np.ndarray,
        trained: list[tuple[CompressionVAE, Path]]) -> None:
    model, checkpoint = trained[0]
    assert publish(model, checkpoint, "embedder", ["champion"]) == "1"
    z = embed_in_fresh_process("models:/embedder@champion", data, tmp_path)
    assert np.array_equal(z["estimator"], model.embed(data))  # bit-identical
    assert np.array_equal(z["pyfunc"], model.embed(data))

    info = describe_version("embedder", "champion")
    assert (info.version, info.aliases, info.status) == ("1", ("champion",), "READY")
    assert info.metrics == {"val_loss": pytest.approx(model.history_[-1]["val_loss"], rel=1e-12)}
    run = mlflow.MlflowClient().get_run(info.run_id)  # the version links to its run
    assert run.info.experiment_id == ensure_experiment(EXPERIMENT)


def test_the_registered_model_holds_code_and_numbers_not_pickles(
        store: str, tmp_path: Path, trained: list[tuple[CompressionVAE, Path]]) -> None:
    model, checkpoint = trained[0]
    publish(model, checkpoint, "embedder", [])
    local = Path(mlflow.artifacts.download_artifacts("models:/embedder/1",
                                                     dst_path=str(tmp_path / "download")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert {"MLmodel", "pyfunc_model.py", "requirements.txt", "code/cvae_model/checkpoint.py",
            "code/cvae_model/fitted.py", "artifacts/checkpoint/model.pt"} <= files
    requirements = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements and "mlflow==3.17.2" in requirements
    assert resolve_model(str(local)).source == str(local / "artifacts" / "checkpoint")
    assert set(os.listdir(local / "artifacts" / "checkpoint")) == {
        "config.json", "model.pt", "normalization.npz", "train_state.pt"}


def test_the_pyfunc_loads_where_cvae_is_not_installed(
        registered: str, tmp_path: Path, data: np.ndarray,
        trained: list[tuple[CompressionVAE, Path]]) -> None:
    # A new process outside the repository, with the virtualenv's editable-install finder
    # removed: cvae_model can only come from the model's own code_paths copy.
    np.save(tmp_path / "x.npy", data)
    script = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
        "import numpy as np, mlflow\n"
        "z = mlflow.pyfunc.load_model('models:/embedder@champion').predict(np.load('x.npy'))\n"
        "np.save('z.npy', z)\n"
        "import cvae_model; print(cvae_model.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=90,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    origin = Path(done.stdout.strip().splitlines()[-1])
    assert REPO not in origin.parents and origin.parent.name == "cvae_model"
    assert np.array_equal(np.load(tmp_path / "z.npy"), trained[0][0].embed(data))


def test_moving_the_alias_changes_what_loads(store: str, data: np.ndarray, capsys: pytest.CaptureFixture[str],
                                             trained: list[tuple[CompressionVAE, Path]]) -> None:
    (first, first_dir), (second, second_dir) = trained
    publish(first, first_dir, "embedder", ["champion"])
    assert publish(second, second_dir, "embedder", ["candidate"]) == "2"
    assert np.array_equal(CompressionVAE.load("models:/embedder@champion").embed(data), first.embed(data))
    assert set_alias("embedder", "champion", 2).aliases == ("candidate", "champion")
    assert np.array_equal(CompressionVAE.load("models:/embedder@champion").embed(data), second.embed(data))

    [summary] = list_models()
    assert summary.name == "embedder" and summary.aliases == {"candidate": "2", "champion": "2"}
    assert [(v.version, v.aliases) for v in summary.versions] == [
        ("1", ()), ("2", ("candidate", "champion"))]
    # ... and back from the command line (a rollback), which reads the same store.
    assert models_cli.main(["alias", "embedder", "champion", "1"]) == 0
    assert "models:/embedder@champion -> version 1" in capsys.readouterr().out
    assert np.array_equal(CompressionVAE.load("models:/embedder@champion").embed(data), first.embed(data))
    assert models_cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "version 1  @champion" in listing and "version 2  @candidate" in listing
    assert models_cli.main(["show", "embedder", "champion"]) == 0
    assert "models:/embedder/1" in capsys.readouterr().out
    assert models_cli.main(["show", "embedder", "9"]) == 1
    assert "has no version 9; versions: 1, 2" in capsys.readouterr().err


def test_pyfunc_predicts_on_ndarray_and_dataframe_and_decodes(
        registered: str, data: np.ndarray, trained: list[tuple[CompressionVAE, Path]]) -> None:
    model = trained[0][0]
    pyfunc = mlflow.pyfunc.load_model("models:/embedder@champion")
    expected = model.embed(data)
    assert np.array_equal(pyfunc.predict(data), expected)
    frame = pd.DataFrame(data.astype(np.float64), columns=[f"f{i}" for i in range(10)])
    np.testing.assert_allclose(pyfunc.predict(frame), expected, rtol=0, atol=1e-6)
    decoded = pyfunc.predict(expected[:4], params={"output": "decode"})
    assert decoded.shape == (4, 10) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, model.decode(expected[:4]), rtol=1e-6, atol=1e-6)
    assert pyfunc.metadata.metadata["cvae"] == {"dim_feature": 10, "dim_latent": 2}


def test_pyfunc_names_the_width_it_expects(registered: str) -> None:
    pyfunc = mlflow.pyfunc.load_model("models:/embedder@champion")
    with pytest.raises(ValueError, match=r"X has 7 features, but CompressionVAE is expecting 10 features"):
        pyfunc.predict(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match=r"z has 10 latent dimensions, but this CompressionVAE has dim_latent=2"):
        pyfunc.predict(np.zeros((3, 10), np.float32), params={"output": "decode"})
    with pytest.raises(ValueError, match=r"'output' parameter must be one of embed, decode; got 'logits'"):
        pyfunc.predict(np.zeros((3, 10), np.float32), params={"output": "logits"})


def test_register_takes_the_runs_validation_metrics(store: str,
                                                    trained: list[tuple[CompressionVAE, Path]]) -> None:
    client_for()
    mlflow.set_experiment(experiment_id=ensure_experiment(EXPERIMENT))
    with mlflow.start_run():
        mlflow.log_metrics({"val_loss": 1.25, "val_kl": 0.5, "train_loss": 9.0})
        info = log_cvae_model(load_checkpoint(trained[0][1]))
    version = register(info.model_uri, "embedder", ["champion"])
    assert describe_version("embedder", version.version).metrics == {"val_loss": 1.25, "val_kl": 0.5}


def test_runs_uri_and_local_directory_resolve_to_the_checkpoint(
        store: str, data: np.ndarray, trained: list[tuple[CompressionVAE, Path]]) -> None:
    model, checkpoint = trained[0]
    client_for()
    mlflow.set_experiment(experiment_id=ensure_experiment(EXPERIMENT))
    with mlflow.start_run() as run:
        log_cvae_model(load_checkpoint(checkpoint))  # MLflow 3 keeps it outside the run's artifacts
        mlflow.log_artifacts(str(checkpoint), "checkpoints/final")
    for uri in (f"runs:/{run.info.run_id}/model", f"runs:/{run.info.run_id}/checkpoints/final"):
        assert np.array_equal(CompressionVAE.load(uri).embed(data[:20]), model.embed(data[:20]))
    assert resolve_model(str(checkpoint)).source == str(checkpoint)


def test_log_outside_a_run_says_so(store: str, trained: list[tuple[CompressionVAE, Path]]) -> None:
    with pytest.raises(RuntimeError, match=r"logs into the active MLflow run"):
        log_cvae_model(load_checkpoint(trained[0][1]))


# ---------------------------------------------------------------------- bad references
def test_loading_by_alias_leaves_no_temporary_folder(registered: str, data: np.ndarray, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``models:/`` load downloads into a temporary folder; none is left behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert tempfile.gettempdir() == str(tmp)
    for _ in range(2):
        assert CompressionVAE.load("models:/embedder@champion").embed(data[:3]).shape == (3, 2)
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("cvae-")) == []


def test_unknown_model_lists_the_registered_ones(registered: str) -> None:
    with pytest.raises(ModelNotFoundError, match=r"No registered model 'embeder'; registered models: embedder$"):
        CompressionVAE.load("models:/embeder@champion")


def test_unknown_alias_lists_the_aliases(registered: str) -> None:
    with pytest.raises(ModelNotFoundError,
                       match=r"Model 'embedder' has no alias 'prod'; aliases: champion \(version 1\)"):
        resolve_model("models:/embedder@prod")


def test_unknown_version_lists_the_versions(registered: str) -> None:
    with pytest.raises(ModelNotFoundError, match=r"Model 'embedder' has no version 9; versions: 1$"):
        resolve_model("models:/embedder/9")


def test_unknown_run_artifact_lists_what_the_run_has(registered: str) -> None:
    run_id = describe_version("embedder", "1").run_id
    with pytest.raises(ModelNotFoundError,
                       match=rf"runs:/{run_id}/modle: run {run_id} has no artifact or logged model "
                             r"'modle'; it has: model \(logged model\)"):
        resolve_model(f"runs:/{run_id}/modle")


def test_deleted_artifacts_are_named(store: str, trained: list[tuple[CompressionVAE, Path]]) -> None:
    publish(*trained[0], "embedder", ["champion"])
    artifacts = Path(os.environ["CVAE_HOME"]) / "artifacts" / EXPERIMENT
    for weights in artifacts.rglob("model.pt"):  # the registered files vanish from the store
        weights.unlink()
    with pytest.raises(ModelNotFoundError, match=r"models:/embedder@champion: The checkpoint in .* "
                                                 r"is incomplete: missing model\.pt"):
        CompressionVAE.load("models:/embedder@champion")


def test_an_incomplete_local_checkpoint_names_the_missing_files(tmp_path: Path,
                                                                 trained: list[tuple[CompressionVAE, Path]]) -> None:
    partial = shutil.copytree(trained[0][1], tmp_path / "partial")
    (partial / "normalization.npz").unlink()
    with pytest.raises(ModelNotFoundError, match=r"is incomplete: missing normalization\.npz"):
        resolve_model(str(partial))
