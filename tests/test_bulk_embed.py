"""Bulk embedding with Ray: ids, equality with the estimator, outputs complete or absent, and
everything the job must refuse before it writes anything."""

from __future__ import annotations

import json
import os
import shutil
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
from conftest import REPO, wait_for_first_part

from cvae_model import CompressionVAE
from jobs import embed as embed_job
from pipeline.errors import DataValidationError
from pipeline.inference import EmbedConfig, run_bulk_embedding
from pipeline.outputs import OutputExistsError, read_manifest, read_output
from pipeline.sources import SourceSpec

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("cvae_home")]


def _frame(out: Path) -> Any:
    table = read_output(out)
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert table.schema.field("embedding").type.value_type == pa.float32()
    return table.to_pandas()


def test_npy_tree_to_parquet_matches_the_estimator(ray_session: Any, tree: Path, trained: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "z"
    summary = run_bulk_embedding(SourceSpec(str(tree)),
                                 EmbedConfig(str(trained), str(out), batch_size=512, track=False))
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.npy"))
    frame = _frame(out)
    assert sorted(frame["id"]) == files  # the ids are exactly the files
    assert summary.rows_in == summary.rows_out == 5000 and summary.rows_skipped == 0
    estimator = CompressionVAE.load(trained)
    expected = estimator.embed(np.stack([np.load(tree / f) for f in frame["id"]]))
    np.testing.assert_allclose(np.stack(frame["embedding"]), expected, rtol=0, atol=1e-5)
    manifest = read_manifest(out)
    assert manifest["rows_out"] == 5000 and manifest["errors"] is None
    # The logdir holds checkpoints 20 and 40: the job took the latest, as load() does.
    assert manifest["checkpoint"].endswith("checkpoint-000000040")
    assert sum(p["rows"] for p in manifest["parts"]) == 5000
    # A plain reader without Ray or cvae reads the same rows.
    assert len(pq.read_table(out)) == 5000


def test_the_three_inference_paths_agree(ray_session: Any, parquet: Path, trained: Path,
                                         rows: np.ndarray, tmp_path: Path) -> None:
    """Estimator, MLflow pyfunc and the bulk job embed (and decode) the same rows identically."""
    import mlflow.pyfunc

    from jobs import decode as decode_job
    from pipeline.model_uri import resolve_model
    from pipeline.registry import client_for, log_cvae_model
    from pipeline.tracking import ensure_experiment

    client_for()
    # Named, not MLflow's active experiment: an earlier test's may not exist in this store.
    with mlflow.start_run(experiment_id=ensure_experiment("cvae-test")):
        info = log_cvae_model(resolve_model(str(trained)).checkpoint)
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    estimator = CompressionVAE.load(trained)
    run_bulk_embedding(SourceSpec(str(parquet), column="x", id_column="key"),
                       EmbedConfig(str(trained), str(tmp_path / "z"), num_actors=2, batch_size=300,
                                   track=False))
    frame = _frame(tmp_path / "z").set_index("id").loc[[f"k{i}" for i in range(5000)]]
    bulk = np.stack(frame["embedding"])
    # One implementation (FittedModel): bit-identical for the same row batches ...
    z = estimator.embed(rows, batch_size=8192)
    assert np.array_equal(z, pyfunc.predict(rows))
    # ... and equal to float32 rounding where the batches differ (the job's follow row groups:
    # BLAS kernels round a row's sums differently for another batch height, by ~1e-8).
    np.testing.assert_allclose(bulk, z, rtol=0, atol=1e-6)
    assert decode_job.main(["--model", str(trained), "--latents", str(tmp_path / "z"),
                            "--output", str(tmp_path / "x"), "--no-track", "--quiet"]) == 0
    decoded = read_output(tmp_path / "x").to_pandas().set_index("id").loc[frame.index]
    back = np.stack(decoded["features"])
    expected = estimator.decode(bulk, batch_size=8192)
    assert np.array_equal(expected, pyfunc.predict(bulk, params={"output": "decode"}))
    np.testing.assert_allclose(back, expected, rtol=1e-6, atol=1e-5)


def test_a_width_mismatch_is_refused_before_any_output(ray_session: Any, trained: Path,
                                                       tmp_path: Path) -> None:
    narrow = tmp_path / "narrow.parquet"
    pq.write_table(pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(
        np.ones((10, 1), np.float32))}), narrow)
    code = embed_job.main(["--model", str(trained), "--data", str(narrow), "--output",
                           str(tmp_path / "z"), "--quiet"])
    assert code == 2
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".z.*"))
    with pytest.raises(DataValidationError, match=r"narrow\.parquet: X has 1 features, but "
                                                  r"CompressionVAE is expecting 16 features"):
        run_bulk_embedding(SourceSpec(str(narrow)), EmbedConfig(str(trained), str(tmp_path / "z")))


def test_overwrite_never_replaces_the_input_or_a_foreign_folder(
        ray_session: Any, tree: Path, trained: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = shutil.copytree(tree / "shard0", tmp_path / "data")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for output in (data, data / "sub0", tmp_path):
        with pytest.raises(OutputExistsError, match=r"Not writing the output .*(holds|inside) the input"):
            run_bulk_embedding(SourceSpec(str(data)), EmbedConfig(str(trained), str(output),
                                                                  overwrite=True, track=False))
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # the input is intact
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"not a cvae output \(it holds todo\.txt\)"):
        run_bulk_embedding(SourceSpec(str(data)), EmbedConfig(str(trained), str(tmp_path / "notes"),
                                                              overwrite=True, track=False))
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(OutputExistsError, match=r"working directory"):
        run_bulk_embedding(SourceSpec(str(data)), EmbedConfig(str(trained), ".", overwrite=True,
                                                              track=False))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_rerun_is_refused_without_overwrite_and_replaces_with_it(
        ray_session: Any, tree: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "z"
    config = EmbedConfig(str(trained), str(out), track=False)
    run_bulk_embedding(SourceSpec(str(tree / "shard1")), config)
    first = _frame(out).sort_values("id").reset_index(drop=True)
    with pytest.raises(OutputExistsError, match=r"already exists; pass --overwrite"):
        run_bulk_embedding(SourceSpec(str(tree / "shard1")), config)
    run_bulk_embedding(SourceSpec(str(tree / "shard1")), EmbedConfig(**{**config.__dict__,
                                                                       "overwrite": True}))
    second = _frame(out).sort_values("id").reset_index(drop=True)
    assert list(first["id"]) == list(second["id"]) and len(second) == 500  # replaced, not appended
    np.testing.assert_array_equal(np.stack(first["embedding"]), np.stack(second["embedding"]))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".z")] == []


@pytest.fixture(scope="module")
def long_parquet(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    """40 parquet files of ``rows`` (200,000 rows, ids ``p<file>-<row>``): a job that runs for
    seconds and writes many parts, so that it can be stopped between its first part and its
    commit (the 5,000-file tree takes a fraction of a second: the window was a race)."""
    folder = tmp_path_factory.mktemp("long")
    x = pa.FixedShapeTensorArray.from_numpy_ndarray(rows)
    for part in range(40):
        pq.write_table(pa.table({"key": [f"p{part}-{i}" for i in range(len(rows))], "x": x}),
                       folder / f"{part:02d}.parquet", row_group_size=1000)
    return folder


def test_sigterm_leaves_no_temporary_output_and_ends_the_run(
        ray_session: Any, long_parquet: Path, trained: Path, tmp_path: Path, cvae_home: Path) -> None:
    out = tmp_path / "z"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "CVAE_HOME": str(cvae_home)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.embed", "--model", str(trained), "--data",
                             str(long_parquet), "--column", "x", "--id-column", "key", "--output",
                             str(out), "--batch-size", "64", "--num-actors", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert wait_for_first_part(tmp_path, "z"), "the job wrote no part in time"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".z.*"))
    client = mlflow.MlflowClient(f"sqlite:///{cvae_home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cvae-embed").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_a_killed_job_leaves_nothing_that_looks_complete_and_is_swept(
        ray_session: Any, long_parquet: Path, tree: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "z"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.embed", "--model", str(trained), "--data",
                             str(long_parquet), "--column", "x", "--id-column", "key", "--output",
                             str(out), "--batch-size", "64", "--no-track", "--quiet"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_first_part(tmp_path, "z")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".z.tmp-*"))  # only the hidden attempt
    run_bulk_embedding(SourceSpec(str(tree / "shard2")), EmbedConfig(str(trained), str(out),
                                                                     track=False))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".z")] == []  # swept
    assert read_manifest(out)["rows_out"] == 500


def test_corrupt_file_fails_naming_it_or_is_skipped(ray_session: Any, tree: Path, trained: Path,
                                                    tmp_path: Path) -> None:
    bad = shutil.copytree(tree / "shard3", tmp_path / "tree_with_bad")
    good = next(bad.rglob("*.npy")).read_bytes()
    (bad / "broken.npy").write_bytes(good[:40])
    config = EmbedConfig(str(trained), str(tmp_path / "z"), track=False)
    with pytest.raises(DataValidationError, match=r"broken\.npy: corrupt or truncated"):
        run_bulk_embedding(SourceSpec(str(bad)), config)
    assert not (tmp_path / "z").exists()
    summary = run_bulk_embedding(SourceSpec(str(bad), on_error="skip"), config)
    manifest = read_manifest(tmp_path / "z")
    errors = pq.read_table(tmp_path / "z" / manifest["errors"]).to_pandas()
    assert list(errors["id"]) == ["broken.npy"] and "corrupt" in errors["reason"][0]
    frame = _frame(tmp_path / "z")
    assert len(frame) == 500 and "broken.npy" not in set(frame["id"])
    assert (summary.rows_in, summary.rows_skipped) == (501, 1)


def test_duplicate_and_null_ids_are_refused(ray_session: Any, trained: Path, tmp_path: Path) -> None:
    x = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((4, 16), np.float32))
    pq.write_table(pa.table({"key": ["a", "b", "a", "c"], "x": x}), tmp_path / "dup.parquet")
    pq.write_table(pa.table({"key": ["a", None, "b", "c"], "x": x}), tmp_path / "null.parquet")
    with pytest.raises(DataValidationError, match=r"id column 'key' holds duplicates .*'a' 2 times"):
        run_bulk_embedding(SourceSpec(str(tmp_path / "dup.parquet"), id_column="key"),
                           EmbedConfig(str(trained), str(tmp_path / "z1"), track=False))
    with pytest.raises(DataValidationError, match=r"null\.parquet.*the id of row 1 in this block is null"):
        run_bulk_embedding(SourceSpec(str(tmp_path / "null.parquet"), id_column="key"),
                           EmbedConfig(str(trained), str(tmp_path / "z2"), track=False))
    assert not (tmp_path / "z1").exists() and not (tmp_path / "z2").exists()


@pytest.fixture()
def extreme(tmp_path: Path) -> str:
    """Six rows with ids r0..r5; row r4 is finite but far beyond float32's comfortable range."""
    x = np.ones((6, 16), np.float32)
    x[4] = 3e38
    pq.write_table(pa.table({"key": [f"r{i}" for i in range(6)],
                             "x": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}), tmp_path / "e.parquet")
    return str(tmp_path / "e.parquet")


def test_extreme_rows_give_a_named_error_not_infinite_embeddings(
        ray_session: Any, trained: Path, tmp_path: Path, extreme: str) -> None:
    with pytest.raises(DataValidationError, match=r"embedding of 1 row\(s\) is not finite.*'r4'"):
        run_bulk_embedding(SourceSpec(extreme, id_column="key"),
                           EmbedConfig(str(trained), str(tmp_path / "z"), track=False))
    assert not (tmp_path / "z").exists()


def test_extreme_rows_are_skipped_on_request(ray_session: Any, trained: Path, tmp_path: Path,
                                             extreme: str) -> None:
    summary = run_bulk_embedding(SourceSpec(extreme, id_column="key", on_error="skip"),
                                 EmbedConfig(str(trained), str(tmp_path / "z"), track=False))
    assert (summary.rows_out, summary.rows_skipped) == (5, 1)
    assert np.isfinite(np.stack(_frame(tmp_path / "z")["embedding"])).all()


def test_progress_moves_during_a_tree_job(ray_session: Any, tree: Path, trained: Path,
                                          tmp_path: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "CVAE_PROGRESS_EVERY_S": "0.05"}
    done = subprocess.run([sys.executable, "-m", "jobs.embed", "--model", str(trained), "--data",
                           str(tree), "--output", str(tmp_path / "z"), "--no-track", "--batch-size",
                           "256", "--num-actors", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [int(line.split("cvae embed: ")[1].split(" /")[0].replace(",", ""))
              for line in done.stderr.splitlines() if "cvae embed: " in line]
    assert counts[-1] == 5000 and len(set(counts)) >= 2, counts  # it moved, and finished
    assert counts == sorted(counts) and "\r" not in done.stderr
    assert json.loads(done.stdout)["rows_out"] == 5000


def test_unknown_model_reference(ray_session: Any, tree: Path, tmp_path: Path) -> None:
    code = embed_job.main(["--model", "models:/nothing@champion", "--data", str(tree),
                           "--output", str(tmp_path / "z"), "--quiet"])
    assert code == 2
    assert not (tmp_path / "z").exists()
