"""Bulk embedding beyond the basics: anomaly scores, registered models, the job's MLflow run.

``tests/test_bulk_embed.py`` covers ids, equality with the estimator, outputs and refusals;
these tests cover what the job adds on top.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cvae_model import CompressionVAE
from jobs import embed as embed_job
from pipeline.errors import DataValidationError
from pipeline.inference import EmbedConfig, run_bulk_embedding
from pipeline.model_uri import resolve_model
from pipeline.outputs import read_manifest, read_output
from pipeline.registry import publish
from pipeline.sources import SourceSpec
from pipeline.tracking import RunTracker, tracking_uri

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("cvae_home")]
N, D = 600, 16


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(N, 3)) @ rng.normal(size=(3, D))).astype(np.float32)
    x[17] = 30.0  # far from everything else: the anomaly
    return x


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    logdir = tmp_path_factory.mktemp("model")
    CompressionVAE(rows, logdir=logdir, random_state=0, iaf_flow_length=1,
                   cells_encoder=[16, 8]).train(num_steps=30, test_every=10, verbose=False)
    return logdir


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory, rows: np.ndarray) -> Path:
    folder = tmp_path_factory.mktemp("parquet")
    for part, chunk in enumerate(np.array_split(np.arange(N), 3)):
        pq.write_table(pa.table({"name": [f"r{i}" for i in chunk],
                                 "x": pa.FixedShapeTensorArray.from_numpy_ndarray(rows[chunk])}),
                       folder / f"{part}.parquet")
    return folder


def _expected_scores(model_dir: Path, x: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Negative ELBO averaged over ``samples`` fixed-seed draws, computed without Ray."""
    checkpoint = resolve_model(str(model_dir)).checkpoint  # as the job resolves it
    model = checkpoint.build_model().eval()
    xn = torch.from_numpy(checkpoint.normalizer.transform(x).astype(np.float32))
    eps = torch.randn((samples, checkpoint.model_config.dim_latent),
                      generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        outs = [model(xn, 1.0, e.expand(len(xn), -1)) for e in eps]
    return (sum(out.recon + out.kl for out in outs) / samples).numpy()


@pytest.mark.timeout(180)
def test_scores_do_not_depend_on_batching_or_actors(ray_session: Any, parquet: Path,
                                                    model_dir: Path, rows: np.ndarray,
                                                    tmp_path: Path) -> None:
    source = SourceSpec(str(parquet), column="x", id_column="name")
    frames = []
    for name, batch, actors in (("a", 37, 1), ("b", 500, 2)):
        run_bulk_embedding(source, EmbedConfig(str(model_dir), str(tmp_path / name),
                                               batch_size=batch, num_actors=actors, with_score=True,
                                               score_samples=4, track=False, progress=False))
        # pandas alone reads the output (no Ray, no pyarrow call of ours).
        frame = pd.read_parquet(tmp_path / name).set_index("id")
        frames.append(frame.loc[[f"r{i}" for i in range(N)]])
    a, b = frames
    np.testing.assert_allclose(a["neg_elbo"], b["neg_elbo"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["reconstruction_error"], b["reconstruction_error"], rtol=1e-5,
                               atol=1e-5)
    # The score is the Monte-Carlo negative ELBO with the fixed seed, and flags the anomaly.
    np.testing.assert_allclose(a["neg_elbo"], _expected_scores(model_dir, rows, 4, 0),
                               rtol=1e-4, atol=1e-4)
    assert a["neg_elbo"].idxmax() == "r17" and a["reconstruction_error"].idxmax() == "r17"
    assert set(a.columns) == {"embedding", "neg_elbo", "reconstruction_error"}


@pytest.mark.timeout(240)
def test_registered_alias_is_resolved_and_the_job_is_an_mlflow_run(
        ray_session: Any, parquet: Path, model_dir: Path, rows: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = RunTracker().start("publish")
    version = publish(run.run_id, resolve_model(str(model_dir)).checkpoint, "emb",
                      aliases=["champion"])
    out = tmp_path / "z"
    code = embed_job.main(["--model", "models:/emb@champion", "--data", str(parquet),
                           "--column", "x", "--id-column", "name", "--output", str(out),
                           "--experiment", "embed-test", "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = read_manifest(out)
    assert (manifest["model_name"], manifest["model_version"]) == ("emb", version)
    assert manifest["rows_in"] == manifest["rows_out"] == N and manifest["rows_skipped"] == 0
    assert manifest["checkpoint"] == f"models:/emb/{version}" and manifest["rows_per_s"] > 0
    assert not list(Path(tempfile.gettempdir()).glob("cvae-model-*"))  # no download left behind

    client = mlflow.MlflowClient(tracking_uri())
    job_run = client.get_run(summary["mlflow_run_id"])
    assert job_run.info.status == "FINISHED"
    assert job_run.data.params["model"] == "models:/emb@champion"
    assert job_run.data.params["model_version"] == version
    assert job_run.data.params["output"] == str(out) and job_run.data.params["source.column"] == "x"
    assert job_run.data.metrics["rows_out"] == N and job_run.data.metrics["rows_per_s"] > 0
    frame = read_output(out).to_pandas()
    expected = CompressionVAE.load(model_dir).embed(rows[[int(i[1:]) for i in frame["id"]]])
    np.testing.assert_allclose(np.stack(frame["embedding"]), expected, rtol=0, atol=1e-5)

    # A failed job is a FAILED run, and leaves no output.
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "a.npy", np.ones(D, np.float32))
    np.save(bad / "b.npy", np.full(D, np.nan, np.float32))
    with pytest.raises(DataValidationError, match=r"b\.npy"):
        run_bulk_embedding(SourceSpec(str(bad)), EmbedConfig("models:/emb@champion",
                                                             str(tmp_path / "bad_z"),
                                                             experiment="embed-test", progress=False))
    assert not (tmp_path / "bad_z").exists()
    runs = client.search_runs([client.get_experiment_by_name("embed-test").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


@pytest.mark.timeout(120)
def test_skip_when_the_first_file_is_the_bad_one(ray_session: Any, model_dir: Path,
                                                 rows: np.ndarray, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    for i in range(40):
        np.save(tree / "a" / f"{i:03d}.npy", rows[i])
    (tree / "a" / "000.npy").write_bytes(b"\x93NUMPY garbage")  # the reference file, corrupt
    np.save(tree / "a" / "039.npy", rows[39].astype(np.float64))  # wrong dtype
    summary = run_bulk_embedding(SourceSpec(str(tree), on_error="skip"),
                                 EmbedConfig(str(model_dir), str(tmp_path / "z"), track=False,
                                             progress=False))
    errors = pq.read_table(tmp_path / "z" / read_manifest(tmp_path / "z")["errors"]).to_pandas()
    assert list(errors["id"]) == ["a/000.npy", "a/039.npy"]
    assert "corrupt" in errors["reason"][0] and "dtype float64" in errors["reason"][1]
    frame = read_output(tmp_path / "z").to_pandas()
    assert sorted(frame["id"]) == [f"a/{i:03d}.npy" for i in range(1, 39)]
    assert (summary.rows_in, summary.rows_out, summary.rows_skipped) == (40, 38, 2)
