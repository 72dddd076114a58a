"""Bulk decoding: features back from latents, and .npy files that never land outside their folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvae_model import CompressionVAE
from jobs import decode as decode_job
from pipeline.decoding import DecodeConfig, run_bulk_decoding
from pipeline.errors import DataValidationError
from pipeline.inference import EmbedConfig, run_bulk_embedding
from pipeline.outputs import OutputExistsError, read_manifest, read_output
from pipeline.sources import SourceSpec

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("cvae_home")]


def _latents(folder: Path, ids: list[Any], dim: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    z = np.linspace(-1, 1, len(ids) * dim, dtype=np.float32).reshape(len(ids), dim)
    pq.write_table(pa.table({"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(z.ravel()), dim)}), folder / "z.parquet")
    return folder


def test_decoded_rows_and_npy_files_equal_the_estimator(ray_session: Any, tree: Path, trained: Path,
                                                        tmp_path: Path) -> None:
    run_bulk_embedding(SourceSpec(str(tree / "shard4")),
                       EmbedConfig(str(trained), str(tmp_path / "z"), track=False))
    assert decode_job.main(["--model", str(trained), "--latents", str(tmp_path / "z"),
                            "--output", str(tmp_path / "x"), "--npy-dir", str(tmp_path / "npy"),
                            "--no-track", "--quiet"]) == 0
    latents = read_output(tmp_path / "z").to_pandas().set_index("id")
    decoded = read_output(tmp_path / "x").to_pandas().set_index("id").loc[latents.index]
    expected = CompressionVAE.load(trained).decode(np.stack(latents["embedding"]))
    np.testing.assert_allclose(np.stack(decoded["features"]), expected, rtol=1e-5, atol=1e-5)
    # One .npy per id, at the id's relative path (the tree's layout), equal to the parquet rows.
    files = sorted(p.relative_to(tmp_path / "npy").as_posix() for p in (tmp_path / "npy").rglob("*.npy"))
    assert files == sorted(latents.index)
    first = latents.index[0]
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / first), decoded.loc[first, "features"])
    assert read_manifest(tmp_path / "npy")["rows"] == 500


@pytest.mark.parametrize("bad_id", ["../escaped", "/tmp/abs_escape", "a/../../b", "", "a\\\\b"])
def test_ids_that_would_escape_the_npy_folder_are_refused(ray_session: Any, trained: Path,
                                                          tmp_path: Path, bad_id: str) -> None:
    latents = _latents(tmp_path / "latents", ["ok1", bad_id, "ok2"])
    with pytest.raises(DataValidationError, match=r"cannot name a file inside --npy-dir"):
        run_bulk_decoding(DecodeConfig(str(trained), str(latents), str(tmp_path / "x"),
                                       npy_dir=str(tmp_path / "npy" / "out"), track=False))
    assert not (tmp_path / "npy").exists() and not (tmp_path / "x").exists()
    assert not Path("/tmp/abs_escape.npy").exists() and not (tmp_path / "escaped.npy").exists()


def test_duplicate_and_null_ids_are_refused(ray_session: Any, trained: Path, tmp_path: Path) -> None:
    duplicated = _latents(tmp_path / "dup", ["a", "b", "a"])
    with pytest.raises(DataValidationError, match=r"holds duplicates .*'a' 2 times"):
        run_bulk_decoding(DecodeConfig(str(trained), str(duplicated), str(tmp_path / "x1"),
                                       npy_dir=str(tmp_path / "n1"), track=False))
    nulls = _latents(tmp_path / "null", ["a", None, "c"])
    with pytest.raises(DataValidationError, match=r"the id of row 1 is null"):
        run_bulk_decoding(DecodeConfig(str(trained), str(nulls), str(tmp_path / "x2"),
                                       npy_dir=str(tmp_path / "n2"), track=False))
    assert not [p for p in tmp_path.iterdir() if p.name[:2] in ("x1", "x2", "n1", "n2")]


def test_an_existing_folder_is_never_overwritten(ray_session: Any, tree: Path, trained: Path,
                                                 tmp_path: Path) -> None:
    """Ids taken from a tree, pointed back at that tree: refused, the originals intact."""
    original = shutil.copytree(tree / "shard5", tmp_path / "tree")
    before = {p: p.read_bytes() for p in original.rglob("*.npy")}
    run_bulk_embedding(SourceSpec(str(original)), EmbedConfig(str(trained), str(tmp_path / "z"),
                                                              track=False))
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"not a cvae output"):
            run_bulk_decoding(DecodeConfig(str(trained), str(tmp_path / "z"), str(tmp_path / "x"),
                                           npy_dir=str(original), overwrite=overwrite, track=False))
    assert {p: p.read_bytes() for p in original.rglob("*.npy")} == before
    run_bulk_decoding(DecodeConfig(str(trained), str(tmp_path / "z"), str(tmp_path / "x"),
                                   npy_dir=str(tmp_path / "npy"), track=False))
    with pytest.raises(OutputExistsError, match=r"already exists; pass --overwrite"):
        run_bulk_decoding(DecodeConfig(str(trained), str(tmp_path / "z"), str(tmp_path / "x2"),
                                       npy_dir=str(tmp_path / "npy"), track=False))
    run_bulk_decoding(DecodeConfig(str(trained), str(tmp_path / "z"), str(tmp_path / "x"),
                                   npy_dir=str(tmp_path / "npy"), overwrite=True, track=False))
    assert len(list((tmp_path / "npy").rglob("*.npy"))) == 500


def test_a_latent_width_mismatch_is_refused_before_any_output(ray_session: Any, trained: Path,
                                                              tmp_path: Path) -> None:
    latents = _latents(tmp_path / "wide", ["a", "b"], dim=3)
    assert decode_job.main(["--model", str(trained), "--latents", str(latents), "--output",
                            str(tmp_path / "x"), "--quiet"]) == 2
    with pytest.raises(DataValidationError, match=r"z has 3 latent dimensions, but this "
                                                  r"CompressionVAE has dim_latent=2"):
        run_bulk_decoding(DecodeConfig(str(trained), str(latents), str(tmp_path / "x"), track=False))
    assert not (tmp_path / "x").exists()
