"""Ray Data ingestion: .npy trees, parquet layouts, validation errors, statistics, split."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources import (
    DataValidationError,
    SourceSpec,
    feature_dim,
    iter_feature_batches,
    raise_data_errors,
    read_source,
)
from pipeline.split import is_train_row, split_by_id
from pipeline.stats import compute_stats

pytestmark = pytest.mark.timeout(180)


def _rows(dataset: Any) -> dict[Any, dict[str, Any]]:
    with raise_data_errors():
        return {row["id"]: row for row in dataset.take_all()}


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(500, 6)).astype(np.float32)


@pytest.fixture()
def tree(tmp_path: Path, matrix: np.ndarray) -> Path:
    root = tmp_path / "tree"
    for i, row in enumerate(matrix[:60]):
        folder = root / f"class{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i}.npy", row)
    return root


def test_nested_tree_of_2000_files(ray_session: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "big"
    expected = {}
    for i in range(2000):
        rel = f"a{i % 7}/b{i % 3}/{'c/' if i % 5 == 0 else ''}{i}.npy"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        row = rng.normal(size=12).astype(np.float32)
        np.save(root / rel, row)
        expected[rel] = row
    rows = _rows(read_source(SourceSpec(str(root))))
    assert set(rows) == set(expected)
    for rel, row in rows.items():
        assert np.array_equal(row["features"], np.load(root / rel))
        assert row["features"].dtype == np.float32
        assert row["label"] == rel.rsplit("/", 1)[0]
    assert feature_dim(SourceSpec(str(root))) == 12


def _write_layouts(folder: Path, matrix: np.ndarray) -> dict[str, SourceSpec]:
    folder.mkdir()
    n, d = matrix.shape
    ids = pa.array([f"row-{i}" for i in range(n)])
    pq.write_table(pa.table({"key": ids, "x": pa.FixedShapeTensorArray.from_numpy_ndarray(matrix)}),
                   folder / "tensor.parquet")
    pq.write_table(pa.table({"key": ids, "x": pa.FixedSizeListArray.from_arrays(
        pa.array(matrix.ravel()), d)}), folder / "fsl.parquet")
    pq.write_table(pa.table({"key": ids, "x": pa.array(list(matrix), type=pa.list_(pa.float32()))}),
                   folder / "list.parquet")
    pq.write_table(pa.table({"key": ids, **{f"f{j}": matrix[:, j] for j in range(d)}}),
                   folder / "scalars.parquet")
    return {
        "tensor": SourceSpec(str(folder / "tensor.parquet"), column="x", id_column="key"),
        "fsl": SourceSpec(str(folder / "fsl.parquet"), column="x", id_column="key"),
        "list": SourceSpec(str(folder / "list.parquet"), column="x", id_column="key"),
        "scalars": SourceSpec(str(folder / "scalars.parquet"),
                              columns=tuple(f"f{j}" for j in range(d)), id_column="key"),
    }


def test_parquet_layouts_give_identical_features(ray_session: Any, tmp_path: Path,
                                                 matrix: np.ndarray) -> None:
    specs = _write_layouts(tmp_path / "pq", matrix)
    for name, spec in specs.items():
        rows = _rows(read_source(spec))
        assert len(rows) == len(matrix), name
        got = np.stack([rows[f"row-{i}"]["features"] for i in range(len(matrix))])
        assert got.dtype == np.float32
        assert np.array_equal(got, matrix), name
        assert feature_dim(spec) == matrix.shape[1]


def test_ray_tensor_extension_and_default_row_position_ids(ray_session: Any, tmp_path: Path,
                                                           matrix: np.ndarray) -> None:
    import ray

    out = tmp_path / "ray_written"
    ray.data.from_numpy(matrix).repartition(3).write_parquet(str(out))
    rows = _rows(read_source(SourceSpec(str(out), column="data")))
    assert sorted(rows) == list(range(len(matrix)))  # positions across all files
    got = np.stack([rows[i]["features"] for i in range(len(matrix))])
    # Files are read in path order; the rows as a set are the matrix's.
    assert sorted(map(tuple, got)) == sorted(map(tuple, matrix))


def test_array_source(ray_session: Any, matrix: np.ndarray) -> None:
    rows = _rows(read_source(matrix))
    assert np.array_equal(np.stack([rows[i]["features"] for i in range(len(matrix))]), matrix)


# ---------------------------------------------------------------------------- bad input
def test_file_with_another_shape(ray_session: Any, tree: Path) -> None:
    np.save(tree / "class0" / "odd.npy", np.zeros(4, np.float32))
    with pytest.raises(DataValidationError, match=r"odd\.npy: shape \(4,\) dtype float32, expected shape \(6,\)"):
        _rows(read_source(SourceSpec(str(tree))))


def test_pickled_npy_is_refused(ray_session: Any, tree: Path) -> None:
    np.save(tree / "class1" / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataValidationError, match=r"evil\.npy: holds a pickled \(object\) array"):
        _rows(read_source(SourceSpec(str(tree))))


def test_truncated_npy(ray_session: Any, tree: Path) -> None:
    good = (tree / "class0" / "0.npy").read_bytes()
    (tree / "class2" / "cut.npy").write_bytes(good[: len(good) - 7])
    with pytest.raises(DataValidationError, match=r"cut\.npy: corrupt or truncated \.npy file"):
        _rows(read_source(SourceSpec(str(tree))))


def test_garbage_file_named_npy(ray_session: Any, tree: Path) -> None:
    (tree / "class2" / "junk.npy").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataValidationError, match=r"junk\.npy"):
        _rows(read_source(SourceSpec(str(tree))))


def test_nonfinite_row_fails_naming_it(ray_session: Any, tree: Path) -> None:
    np.save(tree / "class0" / "nan.npy", np.array([1, np.nan, 0, 0, 0, 0], np.float32))
    with pytest.raises(DataValidationError, match=r"row id 'class0/nan\.npy' contains NaN"):
        _rows(read_source(SourceSpec(str(tree))))


def test_nonfinite_rows_skipped_on_request(ray_session: Any, tree: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    np.save(tree / "class0" / "inf.npy", np.array([np.inf, 0, 0, 0, 0, 0], np.float32))
    rows = _rows(read_source(SourceSpec(str(tree), on_nonfinite="skip")))
    assert len(rows) == 60 and "class0/inf.npy" not in rows


def test_nonfinite_parquet_row_named_by_id(ray_session: Any, tmp_path: Path,
                                           matrix: np.ndarray) -> None:
    bad = matrix.copy()
    bad[17, 2] = np.nan
    specs = _write_layouts(tmp_path / "pq", bad)
    with pytest.raises(DataValidationError, match=r"row id 'row-17' contains NaN"):
        _rows(read_source(specs["fsl"]))


def test_empty_tree(ray_session: Any, tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataValidationError, match=r"empty: no \.npy files found"):
        read_source(SourceSpec(str(tmp_path / "empty")))


def test_empty_parquet(ray_session: Any, tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": pa.array([], type=pa.list_(pa.float32()))}), tmp_path / "e.parquet")
    with pytest.raises(DataValidationError, match=r"e\.parquet: the parquet data set has no rows"):
        read_source(SourceSpec(str(tmp_path / "e.parquet"), column="x"))


def test_missing_column_lists_the_columns(ray_session: Any, tmp_path: Path,
                                          matrix: np.ndarray) -> None:
    specs = _write_layouts(tmp_path / "pq", matrix)
    with pytest.raises(DataValidationError, match=r"no column 'feats'; the columns are \['key', 'x'\]"):
        read_source(SourceSpec(specs["fsl"].path, column="feats"))


def test_ragged_list_column_names_the_row(ray_session: Any, tmp_path: Path) -> None:
    values = [[1.0, 2.0], [3.0, 4.0], [5.0], [6.0, 7.0]]
    pq.write_table(pa.table({"x": pa.array(values, type=pa.list_(pa.float32()))}),
                   tmp_path / "ragged.parquet")
    with pytest.raises(DataValidationError, match=r"list of length 1 at row id 2; expected 2"):
        _rows(read_source(SourceSpec(str(tmp_path / "ragged.parquet"), column="x")))


def test_non_numeric_column(ray_session: Any, tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": pa.array([["a", "b"]], type=pa.list_(pa.string()))}),
                   tmp_path / "text.parquet")
    with pytest.raises(DataValidationError, match=r"column 'x' holds string; expected numbers"):
        _rows(read_source(SourceSpec(str(tmp_path / "text.parquet"), column="x")))


def test_missing_path(ray_session: Any, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: .*nowhere"):
        read_source(SourceSpec(str(tmp_path / "nowhere")))


# ---------------------------------------------------------------------------- stats, split
def test_statistics_match_numpy_float64(ray_session: Any) -> None:
    rng = np.random.default_rng(2)
    # Large offsets make naive sums of squares cancel; the pairwise merge must not.
    data = (rng.normal(size=(200_000, 8)) * rng.uniform(0.1, 10, 8) + 1e4).astype(np.float32)
    stats = compute_stats(read_source(data).repartition(13))
    reference = data.astype(np.float64)
    assert stats.count == 200_000
    np.testing.assert_allclose(stats.mean, reference.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.std, reference.std(axis=0), rtol=1e-6)


def test_split_is_stable_across_block_layouts(ray_session: Any, matrix: np.ndarray) -> None:
    dataset = read_source(matrix)
    layouts = []
    for blocks in (1, 7):
        train, valid = split_by_id(dataset.repartition(blocks), 0.8, seed=3)
        layouts.append((sorted(r["id"] for r in train.take_all()),
                        sorted(r["id"] for r in valid.take_all())))
    assert layouts[0] == layouts[1]
    train_ids, valid_ids = layouts[0]
    assert len(train_ids) + len(valid_ids) == len(matrix) and not set(train_ids) & set(valid_ids)
    assert 0.74 < len(train_ids) / len(matrix) < 0.86
    mask = is_train_row(np.arange(len(matrix)), 0.8, seed=3)
    assert sorted(np.flatnonzero(mask).tolist()) == train_ids
    assert not np.array_equal(mask, is_train_row(np.arange(len(matrix)), 0.8, seed=4))


def test_iter_feature_batches_covers_every_row_once_per_epoch(ray_session: Any,
                                                              matrix: np.ndarray) -> None:
    dataset = read_source(matrix).repartition(5).materialize()
    epochs = []
    for epoch in range(2):
        batches = list(iter_feature_batches(dataset, 64, seed=0, epoch=epoch))
        assert all(b.shape[1] == 6 and b.dtype == np.float32 for b in batches)
        rows = np.concatenate(batches)
        assert sorted(map(tuple, rows)) == sorted(map(tuple, matrix))
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


@pytest.mark.slow
def test_estimator_trains_from_a_path_like_from_the_array(ray_session: Any, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from cvae_model import CompressionVAE

    X = load_digits().data.astype(np.float32)
    train, valid = X[:1500], X[1500:]
    for name, rows in (("train", train), ("valid", valid)):
        for i, row in enumerate(rows):
            (tmp_path / name / str(i % 10)).mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / name / str(i % 10) / f"{i}.npy", row)
    params = {"random_state": 0, "iaf_flow_length": 2, "cells_encoder": [32, 16]}
    train_args = {"num_steps": 400, "lr_scheduling": False, "test_every": 100, "verbose": False}
    from_array = CompressionVAE(train, X_valid=valid, logdir=tmp_path / "a", **params).train(**train_args)
    from_path = CompressionVAE(str(tmp_path / "train"), X_valid=str(tmp_path / "valid"),
                               logdir=tmp_path / "p", **params).train(**train_args)
    # Same data and normalization; only the batch order differs (streamed vs in memory).
    np.testing.assert_allclose(from_path.normalizer_.mean, from_array.normalizer_.mean, rtol=1e-5)
    a, p = from_array.history_[-1]["val_loss"], from_path.history_[-1]["val_loss"]
    assert abs(a - p) <= 0.05 * a, (a, p)
    assert from_path.embed(valid).shape == (len(valid), 2)
