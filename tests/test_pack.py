"""``cvae pack``: a .npy tree as parquet shards of a target size, with the tree's ids, read back
exactly, embedded as the tree is; locally and on S3."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, wait_for_first_part
from s3_helpers import S3, moto_server, s3  # noqa: F401 - fixtures

from jobs.pack import PackConfig, pack_tree
from pipeline.errors import DataValidationError
from pipeline.inference import EmbedConfig, run_bulk_embedding
from pipeline.outputs import OutputExistsError, output_parts, read_manifest, read_output
from pipeline.sources import SourceSpec, open_source

pytestmark = [pytest.mark.timeout(300)]

SHARD_MB = 0.1
"""5,000 rows of 16 float32 (+ ids) are ~0.4 MB: about five shards."""


def _tree_rows(tree: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(tree).as_posix(): np.load(p) for p in tree.rglob("*.npy")}


def test_shards_hold_every_file_once_with_its_id_label_and_values(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "packed"
    env = {**os.environ, "CVAE_PROGRESS_EVERY_S": "0"}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "pack", "--data", str(tree), "--output",
                           str(out), "--shard-mb", str(SHARD_MB), "--threads", "3"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    counts = [int(line.split("cvae pack: ")[1].split(" /")[0].replace(",", ""))
              for line in done.stderr.splitlines() if "cvae pack: " in line]
    assert counts[-1] == 5000 and len(set(counts)) >= 2 and counts == sorted(counts)  # it moved

    manifest = read_manifest(out)
    assert manifest["rows"] == summary["rows"] == 5000 and manifest["rows_skipped"] == 0
    parts = output_parts(out)
    assert len(parts) == summary["shards"] >= 3
    target = SHARD_MB * 1e6
    sizes = [os.path.getsize(p.path) for p in parts]
    assert [p["bytes"] for p in manifest["parts"]] == sizes
    assert all(0.75 * target <= size <= target for size in sizes[:-1]), sizes  # "about" the target
    assert sizes[-1] <= target
    for part, listed in zip(parts, manifest["parts"], strict=True):
        assert pq.ParquetFile(part.path).metadata.num_rows == listed["rows"]

    table = read_output(out)
    expected = _tree_rows(tree)
    ids = table["id"].to_pylist()
    assert ids == sorted(expected)  # every file once, in the tree's (sorted) order
    np.testing.assert_array_equal(table["features"].combine_chunks().to_numpy_ndarray(),
                                  np.stack([expected[i] for i in ids]))
    assert table["label"].to_pylist() == [i.rpartition("/")[0] for i in ids]
    features = table.schema.field("features").type
    assert (features.extension_name, features.value_type, features.shape) == (
        "arrow.fixed_shape_tensor", pa.float32(), [16])

    # The output reads as a data set with the tree's ids, no column flags needed.
    opened = open_source(SourceSpec(str(out)))
    assert (opened.kind, opened.rows, opened.width, opened.id_column) == ("parquet", 5000, 16, "id")


def test_embedding_the_packed_shards_equals_embedding_the_tree(ray_session: Any, cvae_home: Path,
                                                               tree: Path, trained: Path,
                                                               tmp_path: Path) -> None:
    packed = tmp_path / "packed"
    pack_tree(PackConfig(str(tree), str(packed), shard_mb=SHARD_MB, progress=False))
    runs = {}
    for name, source in (("tree", tree), ("packed", packed)):
        run_bulk_embedding(SourceSpec(str(source)), EmbedConfig(str(trained), str(tmp_path / f"z_{name}"),
                                                                track=False, progress=False))
        frame = read_output(tmp_path / f"z_{name}").to_pandas().set_index("id").sort_index()
        runs[name] = frame
    assert list(runs["packed"].index) == list(runs["tree"].index)
    np.testing.assert_allclose(np.stack(runs["packed"]["embedding"]), np.stack(runs["tree"]["embedding"]),
                               rtol=0, atol=1e-6)


def test_packing_on_s3_and_what_is_refused(s3: S3, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(120, 8)).astype(np.float32)
    for i, row in enumerate(rows):
        data = io.BytesIO()
        np.save(data, row)
        with s3.fs.open_output_stream(f"{s3.bucket}/tree/d{i % 2}/{i:03d}.npy") as out:
            out.write(data.getvalue())
    summary = pack_tree(PackConfig(s3.uri("tree"), s3.uri("packed"), shard_mb=0.002, progress=False))
    assert summary["rows"] == 120 and summary["shards"] >= 2
    manifest = read_manifest(s3.uri("packed"))
    assert s3.keys("packed/") == sorted(["packed/_manifest.json",
                                         *(f"packed/{p['path']}" for p in manifest["parts"])])
    table = read_output(s3.uri("packed"))
    assert table["id"].to_pylist() == sorted(f"d{i % 2}/{i:03d}.npy" for i in range(120))
    order = [int(i.split("/")[1][:3]) for i in table["id"].to_pylist()]
    np.testing.assert_array_equal(table["features"].combine_chunks().to_numpy_ndarray(), rows[order])
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(OutputExistsError, match=r"packed already exists; pass --overwrite"):
        pack_tree(PackConfig(s3.uri("tree"), s3.uri("packed"), progress=False))
    with pytest.raises(DataValidationError, match=r"is parquet data already; cvae pack packs a directory tree"):
        pack_tree(PackConfig(s3.uri("packed"), s3.uri("again"), progress=False))
    with pytest.raises(ValueError, match=r"shard_mb must be > 0"):
        PackConfig(s3.uri("tree"), s3.uri("x"), shard_mb=0)


def test_sigterm_leaves_no_output_and_no_temporary_folder(tmp_path: Path) -> None:
    """README: SIGTERM is handled like Ctrl-C in every job; here ``cvae pack`` mid-write."""
    import signal

    tree = tmp_path / "big"
    row = io.BytesIO()
    np.save(row, np.zeros(16, np.float32))
    data = row.getvalue()
    for folder in range(100):  # 100,000 files: seconds of packing at one thread
        (tree / f"d{folder:03d}").mkdir(parents=True)
        for i in range(1000):
            (tree / f"d{folder:03d}" / f"{i:04d}.npy").write_bytes(data)
    out = tmp_path / "packed"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "pack", "--data", str(tree),
                             "--output", str(out), "--shard-mb", str(SHARD_MB), "--threads", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_first_part(tmp_path, "packed"), "no part was written in time"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".packed")] == []
