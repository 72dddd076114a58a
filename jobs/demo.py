"""The end-to-end demo on scikit-learn's digits (shipped inside the package; nothing downloaded).

Writes the digits as a ``.npy`` tree and as parquet, trains on Ray Train with 2 workers tracked in
MLflow, registers the model as ``cvae-demo@champion``, bulk-embeds the parquet with the registered
model, decodes a latent grid, and writes the plots (embedding scatter, latent grid, training
curves) to one folder and to the MLflow run. ``--smoke`` runs a few hundred steps only (tests).
Needs the ``demo`` extra (scikit-learn), which ``make demo`` installs.

    python -m jobs.demo [--output demo_output] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.runner import run_main

__all__ = ["main", "write_digits"]

MODEL_NAME = "cvae-demo"


def write_digits(root: Path) -> tuple[Path, Path, np.ndarray]:
    """Digits as ``root/npy/<label>/<index>.npy`` and ``root/digits.parquet`` (id, label,
    features); returns the two paths and the labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    tree = root / "npy"
    if tree.exists():
        shutil.rmtree(tree)
    for i, (row, label) in enumerate(zip(X.astype(np.float32), y, strict=True)):
        (tree / str(label)).mkdir(parents=True, exist_ok=True)
        np.save(tree / str(label) / f"{i:04d}.npy", row)
    pq.write_table(pa.table({"id": [f"{label}/{i:04d}.npy" for i, label in enumerate(y)],
                             "label": y, "features": pa.FixedShapeTensorArray.from_numpy_ndarray(
                                 X.astype(np.float32))}), root / "digits.parquet")
    return tree, root / "digits.parquet", y


def _plots(out: Path, run_id: str | None, model_uri: str, z: np.ndarray, labels: list[int],
           history: list[dict[str, float]]) -> dict[str, str]:
    from cvae_model import CompressionVAE
    from cvae_model.plotting import latent_grid_figure, scatter_figure, training_curves_figure
    from pipeline.tracking import RunTracker, tracking_uri

    files = {name: out / "plots" / f"{name}.png"
             for name in ("embedding", "latent_grid", "training_curves")}
    scatter_figure(z, labels, filename=files["embedding"], title=f"digits embedded by {model_uri}")
    latent_grid_figure(CompressionVAE.load(model_uri).decode, grid_size=15, shape=(8, 8),
                       clip=(0, 16), filename=files["latent_grid"])
    training_curves_figure(history, filename=files["training_curves"])
    if run_id is not None:
        tracker = RunTracker.attach(tracking_uri(), run_id)
        for path in files.values():
            tracker.log_artifact(path, "plots")
    return {name: str(path) for name, path in files.items()}


def _demo(out: Path, smoke: bool, workers: int) -> dict[str, Any]:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from cvae_model.config import TrainConfig
    from pipeline.inference import EmbedConfig, run_bulk_embedding
    from pipeline.outputs import read_output
    from pipeline.ray_training import DistributedConfig, run_distributed_training
    from pipeline.registry import publish
    from pipeline.sources import SourceSpec
    from pipeline.tracking import tracking_uri

    started = time.perf_counter()
    tree, parquet, y = write_digits(out / "data")
    config = TrainConfig(num_steps=300 if smoke else 12000, checkpoint_every=150 if smoke else 1000,
                         seed=0)
    result = run_distributed_training(
        SourceSpec(str(tree)), {}, config, DistributedConfig(
            num_workers=workers, experiment="cvae-demo",
            run_name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}"))
    version = publish(result.run_id, result.checkpoint, MODEL_NAME, aliases=["champion"],
                      metrics=result.metrics)
    model_uri = f"models:/{MODEL_NAME}@champion"
    summary = run_bulk_embedding(
        SourceSpec(str(parquet), column="features", id_column="id"),
        EmbedConfig(model_uri, str(out / "embeddings"), overwrite=True, experiment="cvae-demo"))
    table = read_output(out / "embeddings").to_pandas()
    labels = [int(i.split("/")[0]) for i in table["id"]]
    z = np.stack(table["embedding"].to_numpy()).astype(np.float32)
    knn = float(cross_val_score(KNeighborsClassifier(10), z, labels, cv=5).mean())
    return {"mlflow_run_id": result.run_id, "registered_model": model_uri,
            "registered_version": str(version),
            "final_metrics": {k: float(f"{v:.6g}") for k, v in sorted(result.metrics.items())},
            "knn10_accuracy_of_embedding": round(knn, 4),
            "embeddings": str(out / "embeddings"), "embedded_rows": summary.rows_out,
            "plots": _plots(out, result.run_id, model_uri, z, labels, result.history),
            "seconds": round(time.perf_counter() - started, 1),
            "mlflow_ui": f"mlflow ui --backend-store-uri {tracking_uri()} --port 5000"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvae demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for data, plots, embeddings")
    parser.add_argument("--smoke", action="store_true", help="a few hundred steps (for tests)")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default: 2)")
    args = parser.parse_args(argv)

    def body() -> dict[str, Any]:
        import json

        out = Path(args.output).resolve()
        (out / "plots").mkdir(parents=True, exist_ok=True)
        report = _demo(out, args.smoke, args.num_workers)
        (out / "summary.json").write_text(json.dumps(report, indent=2))
        return report

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
