"""The registry behind real servers: an ``mlflow server`` process as the tracking/registry store,
and ``mlflow models serve`` answering ``/invocations`` for ``models:/NAME@ALIAS``."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The registry tests' fixtures (`data`, `trained`) and helpers, shared rather than copied.
from registry_helpers import data, embed_in_fresh_process, publish, trained, use_store  # noqa: F401
from server_helpers import free_port, running_mlflow_server, server_env, stop, wait_for_http

from cvae_model import CompressionVAE
from pipeline.registry import describe_version, set_alias

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture()
def mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port, artifacts proxied through it."""
    with running_mlflow_server(tmp_path) as (uri, _):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.mark.timeout(180)
def test_the_same_flow_against_a_real_mlflow_server(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: np.ndarray,
        trained: list[tuple[CompressionVAE, Path]]) -> None:
    monkeypatch.setenv("CVAE_HOME", str(tmp_path / "home"))
    (first, first_dir), (second, second_dir) = trained
    assert publish(first, first_dir, "served", ["champion"]) == "1"
    assert not (tmp_path / "home" / "mlflow.db").exists()  # nothing went to the embedded store
    assert list((tmp_path / "server-artifacts").rglob("model.pt"))  # the server holds the files
    assert describe_version("served", "champion").metrics["val_loss"] == pytest.approx(
        first.history_[-1]["val_loss"], rel=1e-12)

    z = embed_in_fresh_process("models:/served@champion", data, tmp_path)
    assert np.array_equal(z["estimator"], first.embed(data))
    assert np.array_equal(z["pyfunc"], first.embed(data))

    assert publish(second, second_dir, "served", []) == "2"
    set_alias("served", "champion", "2")
    assert np.array_equal(CompressionVAE.load("models:/served@champion").embed(data), second.embed(data))


def post_json(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.timeout(180)
def test_mlflow_models_serve_answers_invocations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: np.ndarray,
        trained: list[tuple[CompressionVAE, Path]]) -> None:
    use_store(tmp_path / "home", monkeypatch)
    model, checkpoint = trained[0]
    publish(model, checkpoint, "served", ["champion"])
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, 120)
        url = f"http://127.0.0.1:{port}/invocations"
        rows = data[:20]
        expected = model.embed(rows)
        status, as_inputs = post_json(url, {"inputs": rows.tolist()})
        assert status == 200, as_inputs
        np.testing.assert_allclose(np.asarray(as_inputs["predictions"]), expected, rtol=0, atol=1e-5)

        split = {"columns": [f"f{i}" for i in range(10)], "data": rows.tolist()}
        status, as_frame = post_json(url, {"dataframe_split": split})
        assert status == 200, as_frame
        np.testing.assert_allclose(np.asarray(as_frame["predictions"]), expected, rtol=0, atol=1e-5)

        status, decoded = post_json(url, {"inputs": expected[:5].tolist(),
                                          "params": {"output": "decode"}})
        assert status == 200, decoded
        np.testing.assert_allclose(np.asarray(decoded["predictions"]), model.decode(expected[:5]),
                                   rtol=1e-5, atol=1e-5)

        # MLflow answers 400 with a generic message; the model's own error ends the stack trace.
        status, error = post_json(url, {"inputs": np.zeros((2, 7)).tolist()})
        assert status == 400 and error["error_code"] == "BAD_REQUEST"
        assert ("ValueError: X has 7 features, but CompressionVAE is expecting 10 features"
                in error["stack_trace"])
    finally:
        stop(proc)
        log.close()
