"""The model learns: digits' 2-D embedding separates the classes; the original's examples run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from sklearn.datasets import load_digits
from sklearn.manifold import trustworthiness
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from cvae_model import CompressionVAE


def knn_accuracy(z: np.ndarray, y: np.ndarray) -> float:
    return float(cross_val_score(KNeighborsClassifier(10), z, y, cv=5).mean())


def readme_library_example() -> str:
    """The first Python block of README.md's "Library use" section, as a user would paste it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Library use"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_readme_library_example_runs_and_learns(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = CompressionVAE(load_digits().data, random_state=0, logdir=tmp_path / "untrained")
    before.train(num_steps=0, verbose=False)
    namespace: dict[str, object] = {}
    exec(compile(readme_library_example(), "README.md", "exec"), namespace)
    embedder, z = namespace["embedder"], namespace["z"]
    y = load_digits().target
    assert isinstance(embedder, CompressionVAE) and z.shape == (1797, 2)  # type: ignore[union-attr]
    assert knn_accuracy(before.embed(load_digits().data), y) < 0.5
    assert knn_accuracy(z, y) >= 0.80  # type: ignore[arg-type]
    history = embedder.history_  # type: ignore[union-attr]
    assert history[-1]["val_loss"] < 0.8 * history[0]["val_loss"]
    # The plateau rule stopped training before the 50k-step cap.
    assert embedder.state_.converged and embedder.state_.step < 50_000  # type: ignore[union-attr]
    for name in ("embedding.png", "grid.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_original_readme_examples_run_as_written(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The original README's code, with digits (8x8 images) instead of a download of MNIST."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    digits = load_digits()
    X = digits.data
    target = digits.target

    # Basic use.
    embedder = CompressionVAE(X)
    embedder.train(num_steps=300)  # the README trains to convergence; capped to keep tests fast
    z = embedder.embed(X)
    embedder.visualize(z, labels=[int(label) for label in target])
    X_reconstructed = embedder.decode(z)
    assert X_reconstructed.shape == X.shape
    z_interp = np.expand_dims(0.5 * z[0] + 0.5 * z[1], axis=0)
    X_interp = embedder.decode(z_interp)
    assert X_interp.shape == (1, 64)
    embedder.visualize_latent_grid(xy_range=(-4.0, 4.0), grid_size=20, shape=(8, 8), clip=(0, 16))
    assert (tmp_path / "temp").is_dir()

    # Advanced use.
    embedder = CompressionVAE(X,
                              train_valid_split=0.99,
                              dim_latent=16,
                              iaf_flow_length=10,
                              cells_encoder=[512, 256, 128],
                              initializer='lecun_normal',
                              batch_size=32,
                              batch_size_test=128,
                              logdir='~/mnist_16d',
                              feature_normalization=False,
                              tb_logging=True)
    embedder.train(learning_rate=1e-4,
                   num_steps=200,  # the README says 2000
                   dropout_keep_prob=0.6,
                   test_every=50,
                   lr_scheduling=False)
    assert embedder.embed(X).shape == (1797, 16)
    logdir = tmp_path / "mnist_16d"
    assert (logdir / "checkpoint-000000200").is_dir()
    assert any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir())

    # Restarting an existing model: parameters are ignored in favour of the stored ones.
    restored = CompressionVAE(X, logdir='~/mnist_16d', dim_latent=2)
    assert restored.embed(X).shape == (1797, 16)
    restored.train(num_steps=50, overwrite=True, verbose=False)
    assert restored.state_.step == 250


# ------------------------------------------------------------------ the neighbour term (issue 14)
SEEDS = (0, 1, 2)
# Issue 14's bounds. Measured with the defaults (seeds 0, 1, 2): 10-NN accuracy 0.955, 0.955,
# 0.953 (weight 0: 0.832, 0.861, 0.811); trustworthiness 0.983, 0.981, 0.983 (weight 0: 0.948,
# 0.954, 0.944). Before P was computed in the data's units (NeighbourTerm.feature_scale) the
# defaults reached 0.942, 0.942, 0.947: the margin to the bound is small, about 0.003.
KNN_MIN = 0.95
TRUST_MIN = 0.95
RAY_STEPS = 1500


def figures(model: CompressionVAE, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    z = model.embed(X)
    return {"knn": knn_accuracy(z, y), "trust": float(trustworthiness(X, z, n_neighbors=10)),
            "mse": float(np.mean((model.decode(z) - X) ** 2))}


FIT_SCRIPT = """
import sys, torch
from sklearn.datasets import load_digits
from cvae_model import CompressionVAE
torch.set_num_threads(1)
seed, weight, logdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
extra = {} if weight == "default" else {"neighbour_weight": float(weight)}
CompressionVAE(load_digits().data, random_state=seed, logdir=logdir).train(verbose=False, **extra)
"""


def fit_two_at_a_time(jobs: dict[str, tuple[int, str]], root: Path) -> dict[str, CompressionVAE]:
    """``train()`` on digits for each ``name: (seed, weight)`` (weight "default" or a number),
    each in its own one-thread process, two at once (the CI machine's 2 cores); the fitted
    models, loaded back from their logdirs."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pending, running, models = list(jobs.items()), [], {}
    while pending or running:
        while pending and len(running) < 2:
            name, (seed, weight) = pending.pop(0)
            proc = subprocess.Popen([sys.executable, "-c", FIT_SCRIPT, str(seed), weight,
                                     str(root / name)], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            running.append((name, proc))
        name, proc = running.pop(0)
        _, err = proc.communicate()
        assert proc.returncode == 0, f"fit {name} failed: {err[-3000:]}"
        models[name] = CompressionVAE.load(root / name)
    return models


@pytest.fixture(scope="module")
def digits_fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CompressionVAE]:
    """digits, 2-D, ``train()`` defaults (the neighbour term on) for each seed, and the original
    objective (weight 0, seed 0) as the reference."""
    jobs = {f"seed{seed}": (seed, "default") for seed in SEEDS} | {"w0": (0, "0")}
    return fit_two_at_a_time(jobs, tmp_path_factory.mktemp("digits-fits"))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_defaults_keep_neighbourhoods_on_digits_and_still_reconstruct(
        digits_fits: dict[str, CompressionVAE]) -> None:
    """Issue 14's learning line, 3 seeds: 10-NN accuracy and trustworthiness(10) of the 2-D
    embedding, and the reconstruction beside the original objective's (weight 0). One weight-0
    fit (seed 0) is the reference, to keep the suite's time down: over seeds 0-2 its MSE was
    7.53-8.17 and the defaults' 6.65-7.49, so the seed of the reference does not decide."""
    X, y = load_digits(return_X_y=True)
    scores = {seed: figures(digits_fits[f"seed{seed}"], X, y) for seed in SEEDS}
    original = digits_fits["w0"]
    baseline = figures(original, X, y)
    report = {"defaults": scores, "weight 0": baseline}  # every figure, in any failure message
    assert min(s["knn"] for s in scores.values()) >= KNN_MIN, report
    assert min(s["trust"] for s in scores.values()) >= TRUST_MIN, report
    for seed in SEEDS:
        assert scores[seed]["mse"] <= 1.10 * baseline["mse"], report
        assert scores[seed]["knn"] > baseline["knn"] + 0.05, report
        assert scores[seed]["trust"] > baseline["trust"], report
    assert original.train_config_ is not None and not original.train_config_.neighbours_on
    model = digits_fits["seed0"]
    assert model.train_config_ is not None and model.train_config_.neighbours_on
    grid = model.visualize_latent_grid(grid_size=4, shape=(8, 8), clip=(0, 16))
    assert len(grid.axes) >= 1 and model.decode(model.embed(X[:5])).shape == (5, 64)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_ray_workers_learn_what_one_process_learns(
        ray_session: object, cvae_home: Path, one_torch_thread: None, tmp_path: Path) -> None:
    """The term on 2 Ray Train workers (each embeds its half of the step's rows, the term runs
    on the gathered batch) gives the in-process figures within 0.02."""
    X, y = load_digits(return_X_y=True)
    train = {"num_steps": RAY_STEPS, "lr_scheduling": False, "test_every": 500, "verbose": False}
    local = CompressionVAE(X, random_state=0, logdir=tmp_path / "local").train(**train)
    ray_model = CompressionVAE(X, random_state=0, num_workers=2, logdir=tmp_path / "ray").train(**train)
    here, there = figures(local, X, y), figures(ray_model, X, y)
    assert abs(here["knn"] - there["knn"]) <= 0.02, (here, there)
    assert abs(here["trust"] - there["trust"]) <= 0.02, (here, there)
    assert ray_model.history_[-1]["train_neighbour_kl"] > 0
