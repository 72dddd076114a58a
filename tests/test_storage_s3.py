"""Every path on an object store, against a real S3 API (moto's server, real clients):
readers, job outputs and their manifests, decoding, model references and Ray Train storage."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle as cloudpickle
from conftest import REPO, SMALL_MODEL
from ray_helpers import KillRankOneAt
from s3_helpers import S3, moto_server, s3  # noqa: F401 - fixtures

from cvae_model import CompressionVAE
from cvae_model.checkpoint import find_checkpoint, load_checkpoint
from jobs import decode as decode_job
from jobs import embed as embed_job
from jobs import train as train_job
from pipeline.model_uri import ModelNotFoundError, resolve_model, save_model
from pipeline.outputs import CommittedOutput, OutputExistsError, read_manifest, read_output
from pipeline.ray_training import DistributedConfig, reachable_from_every_node, run_distributed_training
from pipeline.sources import SourceSpec, open_source, read_source
from pipeline.storage import resolve
from pipeline.tracking import tracking_uri

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("cvae_home")]
# Ray workers cannot import this test module: ship its classes (the fault injector) by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N = 600
"""Rows of the S3 data sets: small, since every object is one PUT."""


def _put_tree(s3: S3, key: str, rows: np.ndarray) -> list[str]:
    """``rows`` as one .npy object each under ``key``; the relative paths (the ids)."""
    fs = s3.fs
    names = []
    for i, row in enumerate(rows):
        name = f"c{i % 3}/{i}.npy"
        data = io.BytesIO()
        np.save(data, row)
        with fs.open_output_stream(f"{s3.bucket}/{key}/{name}") as out:
            out.write(data.getvalue())
        names.append(name)
    return sorted(names)


def _put_parquet(s3: S3, key: str, rows: np.ndarray) -> list[str]:
    """``rows`` as 2 parquet objects with ``key`` ids (k0, k1, ...) and an ``x`` tensor column."""
    ids = [f"k{i}" for i in range(len(rows))]
    half = len(rows) // 2
    for part, chunk in enumerate((slice(0, half), slice(half, len(rows)))):
        pq.write_table(pa.table({"key": ids[chunk],
                                 "x": pa.FixedShapeTensorArray.from_numpy_ndarray(rows[chunk])}),
                       f"{s3.bucket}/{key}/{part}.parquet", filesystem=s3.fs, row_group_size=200)
    return ids


def _run(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    """A job's ``main`` in this process: (exit code, its JSON summary or {}, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out[out.index("{"):]) if code == 0 else {}), err


# ------------------------------------------------------------------------ locations
def test_an_s3_location_carries_the_drivers_settings_to_a_process_without_them(s3: S3) -> None:
    place = resolve(s3.uri("notes/a.txt"))
    assert (place.path, place.uri) == (f"{s3.bucket}/notes/a.txt", s3.uri("notes/a.txt"))
    place.write_bytes(b"hello")
    # A Ray task on another node unpickles the location where none of the AWS variables exist.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    script = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()).read_bytes().decode())"
    out = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(place), env=clean,
                         capture_output=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "hello"


def test_fs_options_configure_the_filesystem_and_bad_ones_are_named(s3: S3,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.arguments import apply_storage_arguments

    s3.fs.open_output_stream(f"{s3.bucket}/o/x.bin").close()
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only --fs-option says where the server is
    parser = embed_job.config_parser("t", None, [])
    args = parser.parse_args(["--fs-option", f"endpoint_override={s3.endpoint}",
                              "--fs-option", "connect_timeout=5", "--fs-option", "region=us-east-1"])
    apply_storage_arguments(args)
    assert json.loads(os.environ["CVAE_FS_OPTIONS"]) == {
        "endpoint_override": s3.endpoint, "connect_timeout": 5, "region": "us-east-1"}
    assert resolve(s3.uri("o/x.bin")).is_file()
    with pytest.raises(ValueError, match=r"--fs-option takes KEY=VALUE .*got 'scheme'"):
        apply_storage_arguments(parser.parse_args(["--fs-option", "scheme"]))
    monkeypatch.setenv("CVAE_FS_OPTIONS", '{"no_such_option": 1}')
    with pytest.raises(ValueError, match=r"Cannot open s3://.*no_such_option.*--fs-option"):
        resolve(s3.uri("o"))


def test_workers_get_a_tracking_uri_they_can_reach() -> None:
    for server in ("http://mlflow:5000", "https://mlflow.example", "databricks", "postgresql://u@db/mlflow"):
        assert reachable_from_every_node(server), server
    for local in ("sqlite:////home/me/cvae_runs/mlflow.db", "file:///tmp/mlruns", "./mlruns"):
        assert not reachable_from_every_node(local), local  # these go through the relay actor


# ------------------------------------------------------------------------ readers
def test_parquet_and_npy_trees_on_s3_read_as_on_disk(ray_session: Any, s3: S3, rows: np.ndarray) -> None:
    data = rows[:N]
    names = _put_tree(s3, "tree", data)
    ids = _put_parquet(s3, "table", data)
    tree = open_source(SourceSpec(s3.uri("tree")))
    assert (tree.kind, tree.rows, tree.width) == ("npy", N, 16)
    batch = read_source(tree).take_batch(N, batch_format="numpy")
    order = np.argsort(batch["id"])
    assert list(batch["id"][order]) == names  # ids: the paths under the root
    expected = {f"c{i % 3}/{i}.npy": row for i, row in enumerate(data)}
    np.testing.assert_array_equal(batch["features"][order], np.stack([expected[n] for n in names]))
    table = open_source(SourceSpec(s3.uri("table"), column="x", id_column="key"))
    assert (table.kind, table.rows, len(table.items)) == ("parquet", N, 4)  # 2 files x 2 row groups
    batch = read_source(table).take_batch(N, batch_format="numpy")
    order = np.argsort([int(i[1:]) for i in batch["id"]])
    assert list(batch["id"][order]) == ids
    np.testing.assert_array_equal(batch["features"][order], data)
    with pytest.raises(FileNotFoundError, match=rf"No such file or directory: s3://{s3.bucket}/nothing"):
        open_source(SourceSpec(s3.uri("nothing")))


# ------------------------------------------------------------------------ models
def test_models_saved_to_s3_load_by_uri(s3: S3, trained: Path, rows: np.ndarray) -> None:
    checkpoint = load_checkpoint(find_checkpoint(trained))
    assert save_model(checkpoint, s3.uri("models/m")) == s3.uri("models/m")
    assert s3.keys("models/m") == [f"models/m/{n}" for n in
                                   ("config.json", "model.pt", "normalization.npz", "train_state.pt")]
    local, remote = CompressionVAE.load(trained), CompressionVAE.load(s3.uri("models/m"))
    np.testing.assert_array_equal(remote.embed(rows[:50]), local.embed(rows[:50]))
    # A logdir on S3: its latest complete checkpoint, as on a disk; an incomplete newer one is passed over.
    save_model(checkpoint, s3.uri("logdir/checkpoint-000000040"))
    save_model(checkpoint, s3.uri("logdir/checkpoint-000000099"))
    resolve(s3.uri("logdir/checkpoint-000000099/model.pt")).delete()
    assert resolve_model(s3.uri("logdir")).source == s3.uri("logdir/checkpoint-000000040")
    with pytest.raises(FileNotFoundError, match=r"checkpoint-000000099 is incomplete: missing model.pt"):
        resolve_model(s3.uri("logdir/checkpoint-000000099"))
    with pytest.raises(ModelNotFoundError, match=rf"No cvae model at s3://{s3.bucket}/nothing"):
        resolve_model(s3.uri("nothing"))
    resolve(s3.uri("data/x.parquet")).write_bytes(b"not a model")
    with pytest.raises(FileExistsError, match=r"Not writing a model to s3://.*/data: it holds other files \(x.parquet\)"):
        save_model(checkpoint, s3.uri("data"))


# ------------------------------------------------------------------------ jobs and outputs
def test_embed_and_decode_on_s3_match_the_estimator_and_write_nothing_locally(
        ray_session: Any, s3: S3, rows: np.ndarray, trained: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = rows[:N]
    names = _put_tree(s3, "tree", data)
    ids = _put_parquet(s3, "table", data)
    save_model(load_checkpoint(find_checkpoint(trained)), s3.uri("model"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    common = ["--model", s3.uri("model"), "--num-actors", "1", "--no-track", "--no-progress", "--quiet"]

    code, summary, err = _run(embed_job.main, ["--data", s3.uri("table"), "--column", "x",
                                               "--id-column", "key", "--output", s3.uri("z"), *common], capsys)
    assert code == 0, err
    assert summary["output"] == s3.uri("z") and summary["rows_out"] == N
    table = read_output(s3.uri("z")).to_pandas()
    assert sorted(table["id"]) == sorted(ids)
    estimator = CompressionVAE.load(s3.uri("model"))
    by_id = table.set_index("id").loc[ids]
    np.testing.assert_allclose(np.stack(by_id["embedding"]), estimator.embed(data), rtol=0, atol=1e-5)

    code, summary, err = _run(embed_job.main, ["--data", s3.uri("tree"), "--output", s3.uri("zt"),
                                               *common], capsys)
    assert code == 0, err
    tree_z = read_output(s3.uri("zt")).to_pandas().set_index("id")
    assert sorted(tree_z.index) == names
    np.testing.assert_allclose(np.stack(tree_z.loc[[f"c{i % 3}/{i}.npy" for i in range(N)], "embedding"]),
                               estimator.embed(data), rtol=0, atol=1e-5)

    # Decode reads what the manifest lists: a stale attempt's part beside it is not read.
    stale = f"{s3.bucket}/z/parts-20000101T000000-0000dead/part-000000.parquet"
    pq.write_table(pa.table({"id": ["stale"], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array([0.0, 0.0], pa.float32()), 2)}), stale, filesystem=s3.fs)
    code, summary, err = _run(decode_job.main, ["--latents", s3.uri("z"), "--output", s3.uri("x"),
                                                "--npy-dir", s3.uri("xn"), *common], capsys)
    assert code == 0, err
    assert summary["rows"] == N
    decoded = read_output(s3.uri("x")).to_pandas().set_index("id").loc[ids]
    np.testing.assert_allclose(np.stack(decoded["features"]),
                               estimator.decode(np.stack(by_id["embedding"])), rtol=0, atol=1e-5)
    npy = read_manifest(s3.uri("xn"))
    files = [k for k in s3.keys("xn/") if k.endswith(".npy")]
    assert npy["kind"] == "npy" and len(files) == N
    assert all(k.startswith(f"xn/{npy['tree']}/k") for k in files)
    assert sorted(k.rsplit("/", 1)[1] for k in files) == sorted(f"{i}.npy" for i in ids)

    assert list(cwd.iterdir()) == []  # no "s3:" folder, no local staging, nothing


def test_an_interrupted_s3_output_is_incomplete_and_a_rerun_replaces_it(
        ray_session: Any, s3: S3, rows: np.ndarray, trained: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _put_parquet(s3, "table", rows[:N])
    out = s3.uri("z")
    # A job killed while writing: its parts are there, its manifest never was.
    script = f"""
import os, signal, pyarrow as pa, pyarrow.parquet as pq
from pipeline.outputs import CommittedOutput
output = CommittedOutput({out!r}, overwrite=False).__enter__()
pq.write_table(pa.table({{"id": [1]}}), output.parts.path + "/part-000000.parquet",
               filesystem=output.parts.filesystem)
os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    (interrupted,) = {k.split("/")[1] for k in s3.keys("z/")}
    assert interrupted.startswith("parts-") and not [k for k in s3.keys("z/") if "_manifest" in k]
    with pytest.raises(FileNotFoundError, match=r"is not a complete cvae output \(no _manifest.json"):
        read_manifest(out)
    with pytest.raises(FileNotFoundError, match=r"incomplete cvae output: it holds the parts of an attempt"):
        open_source(SourceSpec(out))

    monkeypatch.chdir(tmp_path)
    argv = ["--data", s3.uri("table"), "--column", "x", "--model", str(trained), "--output", out,
            "--num-actors", "1", "--no-track", "--no-progress", "--quiet"]
    code, summary, err = _run(embed_job.main, argv, capsys)  # no --overwrite needed: it was never complete
    assert code == 0, err
    first = read_manifest(out)
    assert {k.split("/")[1] for k in s3.keys("z/")} == {"_manifest.json", f"parts-{first['attempt']}"}
    assert len(read_output(out)) == N

    code, _, err = _run(embed_job.main, argv, capsys)
    assert code == 2 and f"{out} already exists; pass --overwrite" in err
    code, _, err = _run(embed_job.main, [*argv, "--overwrite"], capsys)
    assert code == 0, err
    second = read_manifest(out)
    assert second["attempt"] != first["attempt"]
    assert {k.split("/")[1] for k in s3.keys("z/")} == {"_manifest.json", f"parts-{second['attempt']}"}

    # Never replaced: what is not a cvae output, the input, a bucket.
    s3.fs.open_output_stream(f"{s3.bucket}/mine/notes.txt").close()
    with pytest.raises(OutputExistsError, match=r"s3://.*/mine exists and is not a cvae output \(it holds notes.txt\)"):
        CommittedOutput(s3.uri("mine"), overwrite=True)
    with pytest.raises(OutputExistsError, match=r"it holds the input"):
        CommittedOutput(s3.uri("table"), overwrite=True, inputs=[s3.uri("table/0.parquet")])
    with pytest.raises(OutputExistsError, match=r"it is a filesystem root or a bucket"):
        CommittedOutput(f"s3://{s3.bucket}", overwrite=True)
    assert list(tmp_path.glob("s3*")) == []


# ------------------------------------------------------------------------ Ray Train storage
@pytest.mark.slow
def test_ray_train_storage_on_s3_restarts_a_lost_worker_and_resumes(
        ray_session: Any, cvae_home: Path, s3: S3, rows: np.ndarray, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cvae_model.config import TrainConfig

    _put_tree(s3, "tree", rows[:N])
    marker = tmp_path / "killed"
    config = TrainConfig(num_steps=60, batch_size=64, test_every=20, checkpoint_every=20,
                         lr_scheduling=False, seed=0)
    dist = DistributedConfig(num_workers=2, storage_path=s3.uri("ray"), run_name="s3run", max_failures=1)
    result = run_distributed_training(s3.uri("tree"), SMALL_MODEL, config, dist,
                                      callbacks=[KillRankOneAt(30, str(marker))])
    assert marker.read_text() == "30"
    assert result.checkpoint.train_state.step == 60
    checkpoints = {k.split("/")[2] for k in s3.keys("ray/s3run/") if k.count("/") == 3}
    assert 1 <= len(checkpoints) <= config.keep_checkpoints
    assert {k.rsplit("/", 1)[1] for k in s3.keys(f"ray/s3run/{max(checkpoints)}/")} == {
        "config.json", "model.pt", "normalization.npz", "train_state.pt", "history.json"}
    assert not (cvae_home / "ray_results").exists()  # nothing went to the local default
    client = mlflow.MlflowClient(tracking_uri())
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "val_loss"))
    assert steps == [0, 20, 40, 60]  # continuous: the restart resumed from the step-20 checkpoint
    # The embedded SQLite store is on the driver's disk: rank 0 logged through the relay actor.
    logged = [a.path for a in client.list_artifacts(result.run_id, "checkpoints")]
    assert "checkpoints/checkpoint-000000060" in logged

    monkeypatch.chdir(tmp_path)
    code, summary, err = _run(train_job.main, [
        "--data", s3.uri("tree"), "--storage-path", s3.uri("ray"), "--run-name", "s3run", "--resume",
        "--num-workers", "2", "--num-steps", "20", "--test-every", "20", "--checkpoint-every", "20",
        "--no-lr-scheduling", "--save-model", s3.uri("final"), "--quiet"], capsys)
    assert code == 0, err
    assert summary["step"] == 80 and summary["model"] == s3.uri("final")
    assert summary["mlflow_run_id"] == result.run_id
    assert CompressionVAE.load(s3.uri("final")).state_.step == 80
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "val_loss"))
    assert steps == [0, 20, 40, 60, 80]  # it continued from the step-60 checkpoint on S3
