"""The CompressionVAE estimator: API, persistence, resume, errors, plots."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from cvae_model import CompressionVAE, NotFittedError
from cvae_model.checkpoint import CHECKPOINT_FILES, load_checkpoint
from cvae_model.training import evaluate_batches, validation_seed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, size=(4, 12))
    return (centres[rng.integers(0, 4, 400)] + rng.normal(size=(400, 12))).astype(np.float32)


def small(data: np.ndarray, logdir: Path, **kwargs: object) -> CompressionVAE:
    params = {"dim_latent": 2, "iaf_flow_length": 2, "cells_encoder": [16, 8],
              "random_state": 0, "logdir": logdir}
    params.update(kwargs)
    return CompressionVAE(data, **params)  # type: ignore[arg-type]


def quick_train(model: CompressionVAE, steps: int = 30, **kwargs: object) -> CompressionVAE:
    params = {"num_steps": steps, "test_every": 10, "checkpoint_every": 20, "verbose": False}
    params.update(kwargs)
    return model.train(**params)  # type: ignore[arg-type]


def test_logdir_holds_exactly_the_checkpoint_files(data: np.ndarray, tmp_path: Path) -> None:
    model = quick_train(small(data, tmp_path / "run"), steps=50)
    # checkpoint_every=20 -> 20, 40, end at 50; two kept.
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-000000040", "checkpoint-000000050"]
    for name in ("checkpoint-000000040", "checkpoint-000000050"):
        assert set(os.listdir(tmp_path / "run" / name)) == CHECKPOINT_FILES
    assert model.state_.step == 50


def test_restore_gives_identical_embeddings_and_decodings(data: np.ndarray, tmp_path: Path) -> None:
    trained = quick_train(small(data, tmp_path / "run"))
    restored = CompressionVAE(logdir=tmp_path / "run")
    assert torch.equal(torch.from_numpy(trained.embed(data)), torch.from_numpy(restored.embed(data)))
    z = trained.embed(data[:10])
    assert torch.equal(torch.from_numpy(trained.decode(z)), torch.from_numpy(restored.decode(z)))
    loaded = CompressionVAE.load(tmp_path / "run")
    assert np.array_equal(loaded.embed(data), trained.embed(data))


def test_training_continues_from_the_saved_step_with_optimizer_state(data: np.ndarray,
                                                                     tmp_path: Path) -> None:
    quick_train(small(data, tmp_path / "run"), steps=30)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint-000000030")
    assert saved.train_state.step == 30 and saved.train_state.optimizer["state"]
    restored = small(data, tmp_path / "run")
    quick_train(restored, steps=10, overwrite=True)
    assert restored.state_.step == 40
    resumed = load_checkpoint(tmp_path / "run" / "checkpoint-000000040")
    # Adam's step counters continued from 30 rather than restarting at 0.
    first = next(iter(resumed.train_state.optimizer["state"].values()))
    assert int(first["step"]) == 40


def test_restored_model_needs_overwrite_to_train(data: np.ndarray, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    quick_train(small(data, tmp_path / "run"))
    restored = small(data, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="cvae"):
        quick_train(restored)
    assert restored.state_.step == 30
    assert "pass overwrite=True" in caplog.text


def test_stored_params_win_with_a_warning_naming_each(data: np.ndarray, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    quick_train(small(data, tmp_path / "run"))
    restored = small(data, tmp_path / "run", dim_latent=5, iaf_flow_length=3)
    with caplog.at_level(logging.WARNING, logger="cvae"):
        assert restored.embed(data[:3]).shape == (3, 2)  # restored at first use
    # The parameters stay as given (scikit-learn's contract); the model is the stored one.
    assert restored.model_config.dim_latent == 2 and restored.dim_latent == 5
    assert "ignoring dim_latent=5" in caplog.text
    assert "ignoring iaf_flow_length=3" in caplog.text
    assert "cells_encoder" not in caplog.text


def test_train_twice_counts_steps_per_call(data: np.ndarray, tmp_path: Path) -> None:
    model = small(data, tmp_path / "run")
    quick_train(model, steps=25, lr_scheduling=False)
    quick_train(model, steps=25, lr_scheduling=False)
    assert model.state_.step == 50
    assert [h["step"] for h in model.history_][-1] == 50


def test_validation_uses_the_whole_split(data: np.ndarray, tmp_path: Path) -> None:
    model = small(data, tmp_path / "run", train_valid_split=0.75)
    quick_train(model, steps=10)
    # The final validation saw all 100 held-out rows, not just the first batch_size_test of them.
    assert model.history_[-1]["step"] == 10
    data = model._data
    assert data is not None and data.valid_rows() == 100
    assert sum(b.shape[0] for b in data.valid_batches(64, model.normalizer_)) == 100
    rows = torch.from_numpy(model.normalizer_.transform(data.valid))  # type: ignore[attr-defined]
    seed = validation_seed(model.seed_, 0)
    loss_sum, _, _, n = evaluate_batches(model.model_, iter([rows[:64], rows[64:]]), seed=seed)
    assert n == 100
    assert model.history_[-1]["val_loss"] == pytest.approx(loss_sum / 100, rel=1e-6)


def test_tilde_is_expanded(data: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    quick_train(small(data, "~/models/m"))
    assert (tmp_path / "models" / "m" / "checkpoint-000000030").is_dir()
    assert not (tmp_path / "~").exists()


def test_temp_logdir_starts_fresh_and_deletes_only_its_own_files(
        data: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    quick_train(small(data, "temp"))
    (tmp_path / "temp" / "notes.txt").write_text("mine")
    fresh = quick_train(small(data, "temp"), steps=5)
    assert fresh.state_.step == 5  # a fresh model, not the one trained to step 30
    assert sorted(os.listdir(tmp_path / "temp")) == ["checkpoint-000000005", "notes.txt"]


def test_loading_temp_keeps_its_checkpoints(data: np.ndarray, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    trained = quick_train(small(data, "temp"))
    loaded = CompressionVAE.load("temp")
    assert np.array_equal(loaded.embed(data), trained.embed(data))
    assert sorted(os.listdir(tmp_path / "temp")) == ["checkpoint-000000020", "checkpoint-000000030"]


def test_set_params_keeps_a_fitted_model(data: np.ndarray, tmp_path: Path) -> None:
    model = quick_train(small(data, tmp_path / "run"))
    z = model.embed(data)
    model.set_params(batch_size=32)
    assert np.array_equal(model.embed(data), z)  # still fitted, same model
    quick_train(model, steps=5)
    assert model.state_.step == 35  # training continued from step 30 with the new batch size


def test_save_refuses_what_it_did_not_write(data: np.ndarray, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = quick_train(small(data, tmp_path / "run"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert model.save("~/m") == tmp_path / "home" / "m"  # ~ expanded, not a literal ./~
    with pytest.raises(FileExistsError, match=r"already holds a checkpoint; pass overwrite=True"):
        model.save(tmp_path / "home" / "m")
    model.save(tmp_path / "home" / "m", overwrite=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"not a cvae checkpoint \(it holds thesis\.tex\)"):
        model.save(tmp_path / "docs", overwrite=True)
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(tmp_path / "docs")
    with pytest.raises(FileExistsError, match=r"working directory"):
        model.save(".", overwrite=True)


def test_random_state_none_draws_a_seed_and_records_it(data: np.ndarray, tmp_path: Path) -> None:
    model = quick_train(small(data, tmp_path / "run", random_state=None))
    saved = load_checkpoint(tmp_path / "run" / "checkpoint-000000030")
    assert saved.train_config is not None and saved.train_config.seed == model.seed_
    again = quick_train(small(data, tmp_path / "again", random_state=model.seed_))
    assert np.array_equal(again.embed(data), model.embed(data))  # the recorded seed repeats it


def test_same_random_state_gives_identical_embeddings(data: np.ndarray, tmp_path: Path) -> None:
    a = quick_train(small(data, tmp_path / "a", random_state=7))
    b = quick_train(small(data, tmp_path / "b", random_state=7))
    c = quick_train(small(data, tmp_path / "c", random_state=8))
    assert np.array_equal(a.embed(data), b.embed(data))
    assert not np.array_equal(a.embed(data), c.embed(data))


def test_embed_and_decode_do_not_depend_on_batch_size(data: np.ndarray, tmp_path: Path) -> None:
    model = quick_train(small(data, tmp_path / "run"))
    z = model.embed(data, batch_size=7)
    np.testing.assert_allclose(z, model.embed(data, batch_size=400), rtol=1e-6, atol=1e-6)
    assert z.dtype == np.float32 and z.shape == (400, 2)
    x = model.decode(z, batch_size=3)
    np.testing.assert_allclose(x, model.decode(z, batch_size=1000), rtol=1e-5, atol=1e-5)
    assert x.shape == (400, 12)


def test_dataframe_input_and_sklearn_aliases(data: np.ndarray, tmp_path: Path) -> None:
    frame = pd.DataFrame(data, columns=[f"f{i}" for i in range(12)])
    model = CompressionVAE(dim_latent=2, iaf_flow_length=1, cells_encoder=[8], random_state=0,
                           logdir=tmp_path / "run")
    with pytest.raises(NotFittedError, match="no model yet"):
        model.transform(frame)
    z = model.fit_transform(frame, num_steps=20, test_every=10, verbose=False)
    assert z.shape == (400, 2)
    assert model.inverse_transform(z).shape == (400, 12)
    params = model.get_params()
    assert params["dim_latent"] == 2 and params["logdir"] == tmp_path / "run"
    with pytest.raises(ValueError, match="Invalid parameter"):
        model.set_params(bogus=1)


def test_visualize_returns_figures_and_writes_only_when_asked(data: np.ndarray, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = quick_train(small(data, tmp_path / "run"))
    z = model.embed(data)
    labels_int = np.arange(400) % 4
    for labels in (None, labels_int, list(labels_int), np.array(["a", "b", "c", "d"])[labels_int]):
        fig = model.visualize(z, labels=labels)
        assert isinstance(fig, Figure)
    assert list(tmp_path.glob("*.png")) == []
    model.visualize(z, labels=list(labels_int), categories=["w", "x", "y", "z"],
                    filename=tmp_path / "plots" / "scatter.png")
    grid = model.visualize_latent_grid(grid_size=4, shape=(3, 4), clip=(-10, 10),
                                       filename=tmp_path / "grid.png")
    assert isinstance(grid, Figure)
    assert (tmp_path / "plots" / "scatter.png").stat().st_size > 1000
    assert (tmp_path / "grid.png").stat().st_size > 1000


# ---------------------------------------------------------------------------- bad input
def test_1d_x(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected a 2D array for X, got a 1D array"):
        CompressionVAE(np.zeros(10), logdir=tmp_path).train(verbose=False)


def test_empty_x(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        CompressionVAE(np.zeros((0, 5)), logdir=tmp_path).train(verbose=False)


def test_non_numeric_x(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected numeric values"):
        CompressionVAE(np.array([["a", "b"], ["c", "d"]]), logdir=tmp_path).train(verbose=False)


def test_nan_in_x(tmp_path: Path) -> None:
    x = np.ones((10, 3))
    x[4, 2] = np.nan
    with pytest.raises(ValueError, match="X contains NaN at row 4, column 2"):
        CompressionVAE(x, logdir=tmp_path).train(verbose=False)


def test_inf_in_x(tmp_path: Path) -> None:
    x = np.ones((10, 3))
    x[7, 0] = -np.inf
    with pytest.raises(ValueError, match="X contains infinity at row 7, column 0"):
        CompressionVAE(x, logdir=tmp_path).train(verbose=False)


def test_x_valid_with_another_feature_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="X_valid has 4 features, but CompressionVAE is expecting 3"):
        CompressionVAE(np.ones((10, 3)), X_valid=np.ones((5, 4)), logdir=tmp_path).train(verbose=False)


def test_constructor_only_records(tmp_path: Path) -> None:
    model = CompressionVAE(np.zeros(10), dim_latent=-3, logdir=tmp_path / "never")
    assert model.get_params()["dim_latent"] == -3
    assert not (tmp_path / "never").exists()  # nothing read, built or written yet


def test_empty_validation_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"The validation split \(train_valid_split=1.0 of 40 rows\) "
                                         r"has 0 row\(s\); at least 1 are needed"):
        CompressionVAE(np.ones((40, 3)), train_valid_split=1.0, logdir=tmp_path).train(verbose=False)


def test_embed_with_wrong_feature_count(tmp_path: Path) -> None:
    model = CompressionVAE(np.random.default_rng(0).normal(size=(50, 64)), logdir=tmp_path)
    model.train(num_steps=1, verbose=False)
    with pytest.raises(ValueError, match="X has 10 features, but CompressionVAE is expecting 64 features"):
        model.embed(np.ones((3, 10)))


def test_decode_with_wrong_latent_dimension(tmp_path: Path) -> None:
    model = CompressionVAE(np.random.default_rng(0).normal(size=(50, 6)), logdir=tmp_path)
    model.train(num_steps=1, verbose=False)
    with pytest.raises(ValueError, match="z has 3 latent dimensions, but this CompressionVAE has dim_latent=2"):
        model.decode(np.ones((4, 3)))


def test_unknown_initializer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'initializer' parameter of CompressionVAE must be one of"):
        CompressionVAE(np.ones((10, 3)), initializer="he_uniform", logdir=tmp_path).train()


def test_negative_iaf_flow_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'iaf_flow_length' parameter of CompressionVAE must be an int in the range \\[0, inf\\)"):
        CompressionVAE(np.ones((10, 3)), iaf_flow_length=-1, logdir=tmp_path).fit()


def test_dim_latent_below_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'dim_latent' parameter of CompressionVAE must be an int in the range \\[1, inf\\)"):
        CompressionVAE(np.ones((10, 3)), dim_latent=0, logdir=tmp_path).train()


def test_progress_in_a_log_is_lines_not_bar_fragments(data: np.ndarray, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import numpy as np
        from cvae_model import CompressionVAE
        x = np.random.default_rng(0).normal(size=(300, 8)).astype("float32")
        CompressionVAE(x, logdir={str(tmp_path / "run")!r}, random_state=0, cells_encoder=[8]).train(
            num_steps=400, test_every=100)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr  # no carriage-return bar fragments in a log file
    lines = [line for line in done.stderr.splitlines() if "cvae train:" in line]
    assert lines and lines[-1].startswith("cvae train: 400 / 400 steps (100%)"), done.stderr[-2000:]
    assert len(done.stderr) < 5000


def test_train_without_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No training data"):
        CompressionVAE(logdir=tmp_path).train()


# ---------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigint_during_training_leaves_a_checkpoint_that_restores(tmp_path: Path) -> None:
    logdir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from cvae_model import CompressionVAE
        x = np.random.default_rng(0).normal(size=(2000, 32)).astype("float32")
        m = CompressionVAE(x, logdir={str(logdir)!r}, random_state=0)
        print("training", flush=True)
        m.train(num_steps=10_000_000, lr_scheduling=False, checkpoint_every=10_000_000, verbose=False)
        print("returned", m.state_.step, flush=True)
        print("embedded", m.embed(x[:5]).shape, flush=True)
    """)
    # A 10M-step run would compile first (COMPILE_MIN_STEPS): on 2 busy cores that can outlast the
    # 4 s below, and this test is about the interrupt, not the compiler.
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "CVAE_COMPILE": "0"})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "training"
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step = int(out.split("returned")[1].split()[0])
    assert step > 0
    assert "embedded (5, 2)" in out
    restored = CompressionVAE(logdir=logdir)  # records only; embed restores
    assert restored.embed(np.zeros((3, 32))).shape == (3, 2)
    assert restored.state_.step == step
