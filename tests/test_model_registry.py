"""The MLflow registry: pyfunc packaging, aliases, loading by models:/NAME@ALIAS, serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cvae_model import CompressionVAE
from jobs import models as models_cli
from pipeline.registry import (
    ModelNotFoundError,
    describe_version,
    download_checkpoint,
    list_models,
    register_run_model,
    set_alias,
)
from pipeline.tracking import ensure_experiment

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(300, 10)).astype(np.float32)


def _trained(data: np.ndarray, logdir: Path, seed: int) -> CompressionVAE:
    model = CompressionVAE(data, logdir=logdir, random_state=seed, iaf_flow_length=1,
                           cells_encoder=[16, 8])
    return model.train(num_steps=30, test_every=10, verbose=False)


def _publish(model: CompressionVAE, tmp: Path, name: str, aliases: list[str]) -> str:
    checkpoint = model.save(tmp / f"ckpt-{len(list(tmp.glob('ckpt-*')))}")
    experiment = ensure_experiment("registry-test")  # points MLflow at this test's store
    run = mlflow.MlflowClient().create_run(experiment)
    return register_run_model(run.info.run_id, checkpoint, name, aliases=aliases,
                              metrics={"val_loss": model.history_[-1]["val_loss"]})


def _embed_in_fresh_process(uri: str, X: np.ndarray, tmp: Path, env: dict[str, str]) -> np.ndarray:
    np.save(tmp / "x.npy", X)
    script = ("import numpy as np, sys\nfrom cvae_model import CompressionVAE\n"
              f"m = CompressionVAE.load({uri!r})\n"
              f"np.save({str(tmp / 'z.npy')!r}, m.embed(np.load({str(tmp / 'x.npy')!r})))\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env=env, timeout=120)
    return np.load(tmp / "z.npy")


def test_register_alias_and_load_by_alias_in_a_fresh_process(cvae_home: Path, tmp_path: Path,
                                                             data: np.ndarray) -> None:
    model = _trained(data, tmp_path / "a", seed=0)
    version = _publish(model, tmp_path, "embedder", ["champion", "candidate"])
    assert version == "1"
    env = {**os.environ, "CVAE_HOME": str(cvae_home)}
    z = _embed_in_fresh_process("models:/embedder@champion", data, tmp_path, env)
    assert np.array_equal(z, model.embed(data))  # bit-identical

    info = describe_version("embedder", "champion")
    assert info.version == "1" and set(info.aliases) == {"champion", "candidate"}
    assert info.run_id and info.metrics["val_loss"] == pytest.approx(model.history_[-1]["val_loss"], rel=1e-5)
    restored = CompressionVAE.load("models:/embedder/1")
    assert np.array_equal(restored.decode(z[:5]), model.decode(z[:5]))


def test_moving_the_alias_changes_what_loads(cvae_home: Path, tmp_path: Path, data: np.ndarray) -> None:
    first = _trained(data, tmp_path / "a", seed=0)
    second = _trained(data, tmp_path / "b", seed=1)
    _publish(first, tmp_path, "embedder", ["champion"])
    assert _publish(second, tmp_path, "embedder", []) == "2"
    assert np.array_equal(CompressionVAE.load("models:/embedder@champion").embed(data), first.embed(data))
    set_alias("embedder", "champion", 2)
    assert np.array_equal(CompressionVAE.load("models:/embedder@champion").embed(data), second.embed(data))
    assert list_models() == [{"name": "embedder", "versions": ["1", "2"], "aliases": {"champion": 2}}]
    # ... and back again from the command line (a rollback).
    assert models_cli.main(["alias", "embedder", "champion", "1"]) == 0
    assert describe_version("embedder", "champion").version == "1"


def test_pyfunc_predicts_on_ndarray_and_dataframe(cvae_home: Path, tmp_path: Path, data: np.ndarray) -> None:
    model = _trained(data, tmp_path / "a", seed=0)
    _publish(model, tmp_path, "embedder", ["champion"])
    pyfunc = mlflow.pyfunc.load_model("models:/embedder@champion")
    expected = model.embed(data)
    np.testing.assert_allclose(pyfunc.predict(data), expected, rtol=0, atol=1e-6)
    frame = pd.DataFrame(data, columns=[f"f{i}" for i in range(10)])
    np.testing.assert_allclose(pyfunc.predict(frame), expected, rtol=0, atol=1e-6)
    decoded = pyfunc.unwrap_python_model().decode(expected[:4])
    np.testing.assert_allclose(decoded, model.decode(expected[:4]), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match=r"Shape of input \(3, 7\) does not match expected shape \(-1, 10\)"):
        pyfunc.predict(np.zeros((3, 7), np.float32))


def test_unknown_model_lists_the_registered_ones(cvae_home: Path, tmp_path: Path, data: np.ndarray) -> None:
    _publish(_trained(data, tmp_path / "a", seed=0), tmp_path, "embedder", ["champion"])
    with pytest.raises(ModelNotFoundError, match=r"No registered model 'embeder'; registered models: embedder"):
        CompressionVAE.load("models:/embeder@champion")


def test_unknown_alias_lists_the_aliases(cvae_home: Path, tmp_path: Path, data: np.ndarray) -> None:
    _publish(_trained(data, tmp_path / "a", seed=0), tmp_path, "embedder", ["champion"])
    with pytest.raises(ModelNotFoundError, match=r"has no alias 'prod'; aliases: champion"):
        download_checkpoint("models:/embedder@prod")


def test_unknown_version_lists_the_versions(cvae_home: Path, tmp_path: Path, data: np.ndarray) -> None:
    _publish(_trained(data, tmp_path / "a", seed=0), tmp_path, "embedder", ["champion"])
    with pytest.raises(ModelNotFoundError, match=r"has no version 9; versions: 1"):
        download_checkpoint("models:/embedder/9")


def test_missing_artifacts_are_named(cvae_home: Path, tmp_path: Path, data: np.ndarray) -> None:
    experiment = ensure_experiment("registry-test")
    run = mlflow.MlflowClient().create_run(experiment)
    with pytest.raises(ModelNotFoundError, match=rf"runs:/{run.info.run_id}/model: could not download"):
        download_checkpoint(f"runs:/{run.info.run_id}/model")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"no cvae checkpoint among the downloaded artifacts"):
        download_checkpoint(tmp_path / "partial")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture()
def mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 90)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_same_flow_against_a_real_mlflow_server(cvae_home: Path, mlflow_server: str,
                                                    tmp_path: Path, data: np.ndarray) -> None:
    model = _trained(data, tmp_path / "a", seed=0)
    assert _publish(model, tmp_path, "served", ["champion"]) == "1"
    assert not (cvae_home / "mlflow.db").exists()  # nothing went to the embedded store
    assert list((tmp_path / "server-artifacts").rglob("model.pt"))  # the server holds the files
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    z = _embed_in_fresh_process("models:/served@champion", data, tmp_path, env)
    assert np.array_equal(z, model.embed(data))


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(cvae_home: Path, tmp_path: Path, data: np.ndarray) -> None:
    model = _trained(data, tmp_path / "a", seed=0)
    _publish(model, tmp_path, "served", ["champion"])
    port = _free_port()
    # mlflow starts `uvicorn` by name: the virtualenv's bin must be on PATH (as when activated).
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
           "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, 120)
        body = json.dumps({"inputs": data[:20].tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    np.testing.assert_allclose(served, model.embed(data[:20]), rtol=0, atol=1e-5)
