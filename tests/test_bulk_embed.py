"""Bulk embedding and decoding with Ray Data: ids, equality with the estimator, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvae_model import CompressionVAE
from jobs import decode as decode_job
from jobs import embed as embed_job
from pipeline.inference import EmbedConfig, OutputExistsError, run_bulk_embedding
from pipeline.sources import DataValidationError, SourceSpec

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("cvae_home")]
D = 16


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(5000, 4)) @ rng.normal(size=(4, D))).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    logdir = tmp_path_factory.mktemp("model")
    CompressionVAE(rows[:1000], logdir=logdir, random_state=0, iaf_flow_length=2,
                   cells_encoder=[32, 16]).train(num_steps=40, test_every=20, verbose=False)
    return logdir


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for i, row in enumerate(rows):
        folder = root / f"shard{i % 10}" / f"sub{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i}.npy", row)
    return root


def _read_output(path: Path) -> pd.DataFrame:
    # Plain pyarrow and pandas, no Ray: the format is readable everywhere.
    table = pq.read_table(path)
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert table.schema.field("embedding").type.value_type == pa.float32()
    return table.to_pandas()


def test_npy_tree_to_parquet_matches_estimator(ray_session: Any, tree: Path, model_dir: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "z"
    summary = run_bulk_embedding(EmbedConfig(str(model_dir), SourceSpec(str(tree)), str(out),
                                             num_actors=1, batch_size=512, progress=False))
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.npy"))
    frame = _read_output(out)
    assert sorted(frame["id"]) == files  # the ids are exactly the files
    assert summary.rows_in == summary.rows_out == 5000 and summary.rows_skipped == 0
    estimator = CompressionVAE.load(model_dir)
    expected = estimator.embed(np.stack([np.load(tree / f) for f in frame["id"]]))
    np.testing.assert_allclose(np.stack(frame["embedding"]), expected, rtol=0, atol=1e-5)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_out"] == 5000 and manifest["checkpoint"].endswith(
        f"checkpoint-{estimator.state_.step:09d}")
    assert not (out / "_errors.parquet").exists()


def test_parquet_with_several_actors_and_scores(ray_session: Any, rows: np.ndarray,
                                                model_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rows = rows.copy()
    rows[1234] = 25.0  # far from the training data: an anomaly
    for part in range(4):
        chunk = slice(part * 1250, (part + 1) * 1250)
        pq.write_table(pa.table({
            "key": pa.array([f"k{i}" for i in range(chunk.start, chunk.stop)]),
            "x": pa.FixedShapeTensorArray.from_numpy_ndarray(rows[chunk])}), src / f"{part}.parquet")
    code = embed_job.main(["--model", str(model_dir), "--data", str(src), "--column", "x",
                           "--id-column", "key", "--output", str(tmp_path / "z"),
                           "--num-actors", "2", "--batch-size", "300", "--with-score", "--quiet"])
    assert code == 0
    frame = _read_output(tmp_path / "z").set_index("id").loc[[f"k{i}" for i in range(5000)]]
    estimator = CompressionVAE.load(model_dir)
    np.testing.assert_allclose(np.stack(frame["embedding"]), estimator.embed(rows), atol=1e-5, rtol=0)
    assert (frame["reconstruction_error"] > 0).all()
    # The anomaly score singles out the row far from the data.
    assert frame["neg_elbo"].idxmax() == "k1234"
    assert frame["reconstruction_error"].idxmax() == "k1234"


def test_rerun_is_idempotent_and_refused_without_overwrite(ray_session: Any, tree: Path,
                                                           model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "z"
    config = EmbedConfig(str(model_dir), SourceSpec(str(tree)), str(out), progress=False)
    run_bulk_embedding(config)
    first = _read_output(out).sort_values("id").reset_index(drop=True)
    with pytest.raises(OutputExistsError, match=r"already exists; pass --overwrite"):
        run_bulk_embedding(config)
    run_bulk_embedding(EmbedConfig(**{**config.__dict__, "overwrite": True}))
    second = _read_output(out).sort_values("id").reset_index(drop=True)
    assert list(first["id"]) == list(second["id"]) and len(second) == 5000  # replaced, not appended
    np.testing.assert_array_equal(np.stack(first["embedding"]), np.stack(second["embedding"]))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".z")] == []


def test_killed_job_leaves_nothing_that_looks_complete(ray_session: Any, tree: Path,
                                                       model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "z"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.embed", "--model", str(model_dir),
                             "--data", str(tree), "--output", str(out), "--batch-size", "64",
                             "--quiet"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".z.tmp-*/*.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # the partial output stayed in the hidden temporary directory


def test_corrupt_file_fails_naming_it_or_is_skipped(ray_session: Any, tree: Path, model_dir: Path,
                                                    tmp_path: Path) -> None:
    bad = tmp_path / "tree_with_bad"
    import shutil

    shutil.copytree(tree, bad)
    good = (bad / "shard0" / "sub0" / "0.npy").read_bytes()
    (bad / "shard3" / "broken.npy").write_bytes(good[:40])
    config = EmbedConfig(str(model_dir), SourceSpec(str(bad)), str(tmp_path / "z"), progress=False)
    with pytest.raises(DataValidationError, match=r"shard3/broken\.npy: corrupt or truncated"):
        run_bulk_embedding(config)
    assert not (tmp_path / "z").exists()
    summary = run_bulk_embedding(EmbedConfig(**{**config.__dict__, "on_error": "skip"}))
    errors = pq.read_table(tmp_path / "z" / "_errors.parquet").to_pandas()
    assert list(errors["id"]) == ["shard3/broken.npy"] and "corrupt" in errors["reason"][0]
    frame = _read_output(tmp_path / "z")
    assert len(frame) == 5000 and "shard3/broken.npy" not in set(frame["id"])
    assert summary.rows_in == 5001 and summary.rows_skipped == 1


def test_decode_of_the_embeddings_equals_the_estimator(ray_session: Any, tree: Path,
                                                       model_dir: Path, tmp_path: Path) -> None:
    run_bulk_embedding(EmbedConfig(str(model_dir), SourceSpec(str(tree)), str(tmp_path / "z"),
                                   progress=False))
    code = decode_job.main(["--model", str(model_dir), "--latents", str(tmp_path / "z"),
                            "--output", str(tmp_path / "x"), "--npy-dir", str(tmp_path / "npy")])
    assert code == 0
    latents = pq.read_table(tmp_path / "z").to_pandas().set_index("id")
    decoded = pq.read_table(tmp_path / "x").to_pandas().set_index("id").loc[latents.index]
    expected = CompressionVAE.load(model_dir).decode(np.stack(latents["embedding"]))
    np.testing.assert_allclose(np.stack(decoded["features"]), expected, rtol=1e-5, atol=1e-5)
    first = latents.index[0]
    np.testing.assert_allclose(np.load(tmp_path / "npy" / first), decoded.loc[first, "features"],
                               rtol=0, atol=0)


def test_unknown_model_reference(ray_session: Any, tree: Path, tmp_path: Path) -> None:
    code = embed_job.main(["--model", "models:/nothing@champion", "--data", str(tree),
                           "--output", str(tmp_path / "z"), "--quiet"])
    assert code == 2
    assert not (tmp_path / "z").exists()
