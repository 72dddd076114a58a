"""Ray Data readers: .npy trees and parquet layouts give the same rows; bad inputs are named."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.arguments import add_config_arguments, config_from_args
from pipeline.errors import raise_data_errors
from pipeline.prepare import epoch_batches
from pipeline.sources import SourceSpec, feature_dim, read_source

D = 8


def _collect(ds: object) -> dict[str, np.ndarray]:
    with raise_data_errors():
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))  # type: ignore[attr-defined]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _read(spec: SourceSpec) -> dict[str, np.ndarray]:
    return _collect(read_source(spec))


@pytest.fixture(scope="module")
def npy_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """2,000 files of shape (D,) in nested folders, plus a few at the root."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(2000):
        folder = "" if i < 5 else f"digit{i % 10}/part{i % 3}/"
        (root / folder).mkdir(parents=True, exist_ok=True)
        rel = f"{folder}x{i:05d}.npy"
        arrays[rel] = rng.normal(size=D).astype(np.float32)
        np.save(root / rel, arrays[rel])
    return root, arrays


@pytest.mark.timeout(120)
def test_npy_tree_rows_ids_features_labels(ray_session: object,
                                           npy_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, arrays = npy_tree
    out = _read(SourceSpec(str(root)))
    assert len(out["id"]) == len(arrays) == 2000
    assert set(out["id"]) == set(arrays)
    assert out["features"].dtype == np.float32 and out["features"].shape == (2000, D)
    for rel, row, label in zip(out["id"], out["features"], out["label"], strict=True):
        np.testing.assert_array_equal(row, np.load(root / rel))
        assert label == rel.rpartition("/")[0]
    assert "" in set(out["label"]) and "digit3/part1" in set(out["label"])
    assert feature_dim(SourceSpec(str(root))) == D
    lazy = list(epoch_batches(read_source(SourceSpec(str(root))), seed=0)(0, 300))
    assert sum(len(b) for b in lazy) == 2000 and lazy[0].shape == (300, D)


# ---------------------------------------------------------------------------- parquet layouts
N_ROWS = 1000


@pytest.fixture(scope="module")
def table_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(N_ROWS, D)).astype(np.float32), np.array(
        [f"row-{i:04d}" for i in range(N_ROWS)], dtype=object)


def _layout(x: np.ndarray, layout: str) -> dict[str, pa.Array]:
    if layout == "fixed_shape_tensor":
        return {"x": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}
    if layout == "fixed_size_list":
        return {"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)}
    if layout == "list":
        return {"x": pa.array(list(x), type=pa.list_(pa.float32()))}
    return {f"f{j}": pa.array(x[:, j]) for j in range(D)}


def _write_dataset(directory: Path, columns: dict[str, pa.Array], ids: np.ndarray) -> None:
    """Three files (sorted names) with several row groups each, rows in order."""
    directory.mkdir(parents=True)
    table = pa.table({**columns, "key": pa.array(ids, pa.string())})
    for part, (start, stop) in enumerate([(0, 300), (300, 700), (700, N_ROWS)]):
        pq.write_table(table.slice(start, stop - start), directory / f"part-{part}.parquet",
                       row_group_size=128)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["fixed_shape_tensor", "fixed_size_list", "list", "scalars"])
def test_parquet_layouts_give_identical_features(
        ray_session: object, tmp_path: Path, layout: str,
        table_data: tuple[np.ndarray, np.ndarray]) -> None:
    x, keys = table_data
    _write_dataset(tmp_path / "ds", _layout(x, layout), keys)
    spec = (SourceSpec(str(tmp_path / "ds"), columns=tuple(f"f{j}" for j in range(D)))
            if layout == "scalars" else SourceSpec(str(tmp_path / "ds"), column="x"))
    out = _read(spec)  # default id: global row position over files sorted by path
    assert out["id"].dtype == np.int64
    order = np.argsort(out["id"])
    np.testing.assert_array_equal(out["id"][order], np.arange(N_ROWS))
    np.testing.assert_array_equal(out["features"][order], x)
    assert out["features"].dtype == np.float32
    keyed = _read(SourceSpec(spec.path, spec.column, spec.columns, id_column="key"))
    by_key = dict(zip(keyed["id"], keyed["features"], strict=True))
    assert len(by_key) == N_ROWS
    for i in (0, 299, 300, 999):
        np.testing.assert_array_equal(by_key[keys[i]], x[i])
    assert feature_dim(spec) == D
    # Without column/columns: the single tensor column, or every numeric column.
    guessed = _read(SourceSpec(spec.path))
    np.testing.assert_array_equal(guessed["features"][np.argsort(guessed["id"])], x)


@pytest.mark.timeout(120)
def test_ray_tensor_extension_parquet(ray_session: object, tmp_path: Path,
                                      table_data: tuple[np.ndarray, np.ndarray]) -> None:
    import ray

    x, _ = table_data
    ray.data.from_numpy(x).write_parquet(str(tmp_path / "ray"))
    out = _read(SourceSpec(str(tmp_path / "ray"), column="data"))
    assert out["features"].shape == (N_ROWS, D)
    np.testing.assert_array_equal(np.sort(out["features"], axis=0), np.sort(x, axis=0))
    np.testing.assert_array_equal(np.sort(out["id"]), np.arange(N_ROWS))


@pytest.mark.timeout(60)
def test_array_source_with_ids(ray_session: object) -> None:
    x = np.arange(30, dtype=np.float64).reshape(10, 3)
    out = _collect(read_source(x, ids=np.array([f"r{i}" for i in range(10)])))
    assert out["features"].dtype == np.float32 and out["features"].shape == (10, 3)
    np.testing.assert_array_equal(out["features"][list(out["id"]).index("r4")], x[4])
    assert feature_dim(x) == 3


# ---------------------------------------------------------------------------- CLI, batches
def test_source_arguments_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SourceSpec)
    args = parser.parse_args(["--data", "~/d", "--columns", "a, b,c", "--id-column", "k",
                              "--on-error", "skip"])
    assert config_from_args(args, SourceSpec) == SourceSpec("~/d", None, ("a", "b", "c"), "k", "skip")
    assert config_from_args(parser.parse_args(["--data", "p"]), SourceSpec) == SourceSpec("p")
    with pytest.raises(ValueError, match=r"either column .* or columns"):
        SourceSpec("p", column="x", columns=("a",))


@pytest.mark.timeout(120)
def test_epoch_batches_shuffle_per_epoch_and_drop_nothing(ray_session: object) -> None:
    x = np.arange(5000 * 2, dtype=np.float32).reshape(5000, 2)
    ds = read_source(x).repartition(10).materialize()
    epochs = {}
    for epoch in (0, 1):
        batches = list(epoch_batches(ds, seed=3)(epoch, 512))
        assert [len(b) for b in batches] == [512] * 9 + [5000 - 9 * 512]
        assert all(b.dtype == np.float32 and b.shape[1] == 2 for b in batches)
        rows = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(rows[:, 0]), x[:, 0])  # every row exactly once
        epochs[epoch] = rows[:, 0]
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], x[:, 0])
    again = np.concatenate(list(epoch_batches(ds, seed=3)(0, 512)))[:, 0]
    np.testing.assert_array_equal(again, epochs[0])  # reproducible on a materialized dataset
