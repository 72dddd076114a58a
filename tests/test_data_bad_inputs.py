"""Ray Data ingestion: one test per kind of bad input, and the estimator trained from a path.

(Layouts, statistics and the split: tests/test_data_sources.py, tests/test_data_stats_split.py.)
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DataValidationError, raise_data_errors
from pipeline.sources import SourceSpec, open_source, read_source

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
    rows = _rows(read_source(SourceSpec(str(tree), on_error="skip")))
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
    train_args = {"num_steps": 400, "lr_scheduling": False, "test_every": 100, "verbose": False,
                  "neighbour_weight": 0.0}  # 64-row steps: the objective is not what is tested
    from_array = CompressionVAE(train, X_valid=valid, logdir=tmp_path / "a", **params).train(**train_args)
    from_path = CompressionVAE(str(tmp_path / "train"), X_valid=str(tmp_path / "valid"),
                               logdir=tmp_path / "p", **params).train(**train_args)
    # Same data and normalization; only the batch order differs (streamed vs in memory).
    np.testing.assert_allclose(from_path.normalizer_.mean, from_array.normalizer_.mean, rtol=1e-5)
    a, p = from_array.history_[-1]["val_loss"], from_path.history_[-1]["val_loss"]
    assert abs(a - p) <= 0.05 * a, (a, p)
    assert from_path.embed(valid).shape == (len(valid), 2)


def test_integer_columns_are_not_guessed_as_features(ray_session: Any, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"row_id": np.arange(5), "label": np.arange(5) % 2,
                             "a": np.ones(5), "b": np.zeros(5, np.float32)}), path)
    with caplog.at_level("WARNING", logger="cvae.data"):
        rows = _rows(read_source(SourceSpec(str(path))))
    assert rows[0]["features"].shape == (2,)  # a and b only
    assert "left out the integer/boolean column(s) row_id, label" in caplog.text


def test_symlinked_folders_are_followed_and_loops_named(ray_session: Any, tree: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    outside = tree.parent / "elsewhere"
    outside.mkdir()
    np.save(outside / "linked.npy", np.ones(6, np.float32))
    (tree / "link").symlink_to(outside, target_is_directory=True)
    (tree / "class0" / "loop").symlink_to(tree, target_is_directory=True)
    with caplog.at_level("WARNING", logger="cvae.storage"):
        rows = _rows(read_source(SourceSpec(str(tree))))
    assert "link/linked.npy" in rows and len(rows) == 61
    assert "loop: a link to a folder already read" in caplog.text


def test_a_stray_parquet_in_a_tree_is_named(ray_session: Any, tree: Path) -> None:
    pq.write_table(pa.table({"x": [1.0]}), tree / "class1" / "stray.parquet")
    with pytest.raises(DataValidationError, match=r"holds both \.npy files \(.*\.npy\) and \.parquet "
                                                  r"files \(.*class1/stray\.parquet\)"):
        read_source(SourceSpec(str(tree)))


def test_extreme_validation_values_stop_training_with_a_named_feature(tmp_path: Path) -> None:
    from cvae_model import CompressionVAE
    from cvae_model.training import NonFiniteTrainingError

    rng = np.random.default_rng(0)
    valid = rng.normal(size=(20, 5))
    valid[7, 3] = 1e30
    model = CompressionVAE(rng.normal(size=(200, 5)), X_valid=valid, logdir=tmp_path,
                           cells_encoder=[8], random_state=0)
    with pytest.raises(NonFiniteTrainingError, match=r"validation loss of a row is not finite: its "
                                                     r"feature 3 is .*e\+(29|30) after normalization"):
        model.train(num_steps=10, verbose=False)


def test_file_with_another_dtype(ray_session: Any, tree: Path) -> None:
    np.save(tree / "class0" / "zdouble.npy", np.zeros(6, np.float64))
    with pytest.raises(DataValidationError, match=r"zdouble\.npy: .*dtype float64, expected .*float32"):
        _rows(read_source(SourceSpec(str(tree))))


def test_non_numeric_npy(ray_session: Any, tree: Path) -> None:
    np.save(tree / "class0" / "text.npy", np.array(list("abcdef")))
    with pytest.raises(DataValidationError, match=r"text\.npy: dtype <U1 is not numeric"):
        _rows(read_source(SourceSpec(str(tree))))


def test_a_bad_first_file_is_named_by_the_driver(tmp_path: Path) -> None:
    (tmp_path / "0.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(DataValidationError, match=r"0\.npy: corrupt"):
        read_source(SourceSpec(str(tmp_path)))


def test_a_2d_array_per_file(tmp_path: Path) -> None:
    np.save(tmp_path / "0.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataValidationError, match=r"0\.npy: shape \(2, 3\); each .npy file must hold one"):
        read_source(SourceSpec(str(tmp_path)))


def test_a_single_file_that_is_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataValidationError, match=r"notes\.txt: expected a directory tree"):
        read_source(SourceSpec(str(tmp_path / "notes.txt")))


def test_a_scalar_column_that_is_not_numeric(tmp_path: Path) -> None:
    pq.write_table(pa.table({"name": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(DataValidationError, match=r"column 'name' has type string; expected numbers"):
        read_source(SourceSpec(str(tmp_path / "t.parquet"), columns=("name",)))


def test_nonfinite_parquet_rows_skipped_on_request(ray_session: Any, tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0, float("inf")]])}), tmp_path / "i.parquet")
    with raise_data_errors():
        kept = read_source(SourceSpec(str(tmp_path / "i.parquet"), column="x", on_error="skip")).take_all()
    assert [row["id"] for row in kept] == [0]


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_an_unreadable_parquet_file_is_named_even_when_skipping(tmp_path: Path, on_error: str) -> None:
    """README, Limitations: ``--on-error skip`` skips bad rows and ``.npy`` files, but a parquet
    file without a readable footer stops the job (its rows cannot even be counted), named."""
    folder = tmp_path / "data"
    folder.mkdir()
    x = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((4, 3), np.float32))
    pq.write_table(pa.table({"x": x}), folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"PAR1 then nothing a parquet reader understands")
    with pytest.raises(DataValidationError, match=r"b\.parquet: not a readable parquet file"):
        open_source(SourceSpec(str(folder), column="x", on_error=on_error))
