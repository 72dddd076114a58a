"""One-pass statistics match numpy; the id-hash split is stable and near its fraction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvae_model.normalization import FeatureStats
from pipeline.errors import DataValidationError
from pipeline.sources import SourceSpec, read_source
from pipeline.split import is_train_row, split_by_id
from pipeline.stats import compute_stats, compute_stats_report


def _ids(ds: object) -> np.ndarray:
    batches = ds.iter_batches(batch_size=None, batch_format="numpy")  # type: ignore[attr-defined]
    return np.concatenate([b["id"] for b in batches])


@pytest.mark.timeout(120)
def test_stats_match_numpy_float64(ray_session: object) -> None:
    rng = np.random.default_rng(0)
    # An offset far above the spread: a naive sum of squares in float32 would lose the variance.
    x = (1000.0 + rng.normal(scale=rng.uniform(0.1, 5.0, 16), size=(200_000, 16))).astype(np.float32)
    stats = compute_stats(read_source(x).repartition(13))
    reference = x.astype(np.float64)
    assert isinstance(stats, FeatureStats) and stats.count == 200_000
    np.testing.assert_allclose(stats.mean, reference.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.std, reference.std(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.var, reference.var(axis=0), rtol=1e-6)


@pytest.mark.timeout(60)
def test_stats_errors_are_unwrapped(ray_session: object, tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.ones(2, np.float32))
    np.save(tmp_path / "9.npy", np.array([1.0, np.inf], np.float32))
    with pytest.raises(DataValidationError, match=r"row id '9\.npy' contains NaN or infinity"):
        compute_stats(read_source(SourceSpec(str(tmp_path))))
    with pytest.raises(DataValidationError, match=r"no column 'pixels'; its columns are"):
        compute_stats(read_source(np.ones((4, 2))), column="pixels")
    report = compute_stats_report(read_source(SourceSpec(str(tmp_path), on_error="skip")))
    assert (report.stats.count, report.skipped) == (3, 1)


@pytest.mark.timeout(120)
def test_split_is_stable_across_block_layouts(ray_session: object) -> None:
    n = 20_000
    ds = read_source(np.zeros((n, 2), np.float32))
    train_1, valid_1 = split_by_id(ds.repartition(1), 0.8, seed=5)
    train_7, valid_7 = split_by_id(ds.repartition(7), 0.8, seed=5)
    t1, t7 = np.sort(_ids(train_1)), np.sort(_ids(train_7))
    np.testing.assert_array_equal(t1, t7)
    np.testing.assert_array_equal(np.sort(_ids(valid_1)), np.sort(_ids(valid_7)))
    assert len(t1) + len(_ids(valid_1)) == n
    assert abs(len(t1) / n - 0.8) < 0.015  # binomial sd is 0.003
    # The in-memory rule gives the same sides.
    np.testing.assert_array_equal(np.flatnonzero(is_train_row(np.arange(n), 0.8, seed=5)), t1)


def test_split_rule_properties() -> None:
    ids = np.array([f"digit{i % 10}/x{i}.npy" for i in range(10_000)], dtype=object)
    mask = is_train_row(ids, 0.9, seed=0)
    assert mask.dtype == bool and abs(mask.mean() - 0.9) < 0.015
    assert (is_train_row(ids, 0.9, seed=1) != mask).mean() > 0.1  # the seed moves rows
    assert is_train_row(ids, 1.0).all()
    # Nested fractions nest: growing the fraction only adds rows to train.
    assert not (is_train_row(ids, 0.5) & ~mask).any()
    # Ids compare as strings: int64, Python int and their text agree.
    np.testing.assert_array_equal(is_train_row(np.arange(50), 0.5),
                                  is_train_row(np.array([str(i) for i in range(50)]), 0.5))
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\], got 0"):
        is_train_row(ids, 0.0)


def test_split_rule_is_pinned() -> None:
    """The rule must never change silently: it decides which stored rows were validation."""
    ids = np.array(["a.npy", "b/c.npy"] + [str(i) for i in range(30)], dtype=object)
    got = "".join("1" if v else "0" for v in is_train_row(ids, 0.5, seed=0))
    assert got == "11100010101000001100111110000000"


def test_split_rule_is_stable_across_processes() -> None:
    code = ("import numpy as np; from pipeline.split import is_train_row; "
            "print(''.join('1' if v else '0' for v in is_train_row(np.arange(200), 0.5, 7)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123", "PATH": ""},
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    here = "".join("1" if v else "0" for v in is_train_row(np.arange(200), 0.5, 7))
    assert other == here
