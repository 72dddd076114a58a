"""The end-to-end demo on scikit-learn's digits (shipped inside the package; nothing downloaded).

Writes the digits as a ``.npy`` tree and as parquet, trains on Ray Train with 2 workers tracked in
MLflow, registers the model as ``cvae-demo@champion``, bulk-embeds the parquet with the registered
model, decodes a latent grid, and writes the plots (embedding scatter, latent grid, training
curves) to one folder and to the MLflow run. ``--smoke`` runs a few hundred steps only (tests).

    python -m jobs.demo [--output demo_output] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from jobs.arguments import setup_logging

__all__ = ["main", "write_digits"]

logger = logging.getLogger("cvae.jobs.demo")

MODEL_NAME = "cvae-demo"


def write_digits(root: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Digits as ``root/npy/<label>/<index>.npy`` and ``root/digits.parquet`` (id, label, features)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    tree = root / "npy"
    if tree.exists():
        shutil.rmtree(tree)
    for i, (row, label) in enumerate(zip(X, y, strict=True)):
        folder = tree / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i:04d}.npy", row)
    table = pa.table({
        "id": pa.array([f"{label}/{i:04d}.npy" for i, label in enumerate(y)]),
        "label": pa.array(y),
        "features": pa.FixedShapeTensorArray.from_numpy_ndarray(X),
    })
    parquet = root / "digits.parquet"
    pq.write_table(table, parquet)
    return tree, parquet, X, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvae demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for data, plots, embeddings")
    parser.add_argument("--smoke", action="store_true", help="a few hundred steps (for tests)")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)
    setup_logging()
    started = time.perf_counter()

    import mlflow
    import ray

    from cvae_model import CompressionVAE
    from cvae_model.config import TrainConfig
    from cvae_model.plotting import latent_grid_figure, scatter_figure, training_curves_figure
    from pipeline.inference import EmbedConfig, run_bulk_embedding
    from pipeline.ray_training import DistributedConfig, run_distributed_training
    from pipeline.registry import register_run_model
    from pipeline.sources import SourceSpec
    from pipeline.tracking import tracking_uri

    out = Path(args.output).resolve()
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    logger.info("writing digits to %s", out / "data")
    tree, parquet, X, y = write_digits(out / "data")

    if not ray.is_initialized():
        ray.init()
    train_config = TrainConfig(num_steps=300 if args.smoke else 12000, test_every=50,
                               checkpoint_every=150 if args.smoke else 1000, seed=0)
    result = run_distributed_training(
        SourceSpec(path=str(tree)),
        {"dim_latent": 2, "iaf_flow_length": 5, "cells_encoder": None},
        train_config,
        DistributedConfig(num_workers=args.num_workers, experiment="cvae-demo",
                          run_name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}"),
    )
    version = register_run_model(result.run_id, result.checkpoint_dir, MODEL_NAME,
                                 aliases=["champion"], metrics=result.metrics)
    model_uri = f"models:/{MODEL_NAME}@champion"
    logger.info("registered %s (version %s)", model_uri, version)

    embeddings_dir = out / "embeddings"
    summary = run_bulk_embedding(EmbedConfig(
        model_uri=model_uri, source=SourceSpec(path=str(parquet), column="features",
                                               id_column="id"),
        output=str(embeddings_dir), overwrite=True, num_actors=1, experiment="cvae-demo"))

    import pyarrow.parquet as pq

    table = pq.read_table(embeddings_dir).to_pandas()
    labels = {f"{label}/{i:04d}.npy": int(label) for i, label in enumerate(y)}
    z = np.stack(table["embedding"].to_numpy()).astype(np.float32)
    point_labels = [labels[i] for i in table["id"]]
    estimator = CompressionVAE.load(model_uri)

    client = mlflow.MlflowClient(tracking_uri())
    history = [
        {"step": m.step, "train_loss": m.value} for m in
        client.get_metric_history(result.run_id, "train_loss")
    ]
    val = {m.step: m.value for m in client.get_metric_history(result.run_id, "val_loss")}
    lr = {m.step: m.value for m in client.get_metric_history(result.run_id, "learning_rate")}
    curves = [{**h, "val_loss": val.get(h["step"], np.nan), "learning_rate": lr.get(h["step"], np.nan)}
              for h in sorted({h["step"]: h for h in history}.values(), key=lambda h: h["step"])]
    files = {
        "embedding": plots / "embedding.png",
        "latent_grid": plots / "latent_grid.png",
        "training_curves": plots / "training_curves.png",
    }
    scatter_figure(z, point_labels, filename=files["embedding"],
                   title=f"digits embedded by {model_uri}")
    latent_grid_figure(estimator.decode, grid_size=15, shape=(8, 8), clip=(0, 16),
                       filename=files["latent_grid"])
    training_curves_figure(curves, filename=files["training_curves"])
    for path in files.values():
        client.log_artifact(result.run_id, str(path), "plots")

    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = float(cross_val_score(KNeighborsClassifier(10), z, point_labels, cv=5).mean())
    report = {
        "mlflow_run_id": result.run_id,
        "registered_model": model_uri,
        "registered_version": str(version),
        "final_metrics": {k: float(f"{v:.6g}") for k, v in sorted(result.metrics.items())},
        "knn10_accuracy_of_embedding": round(knn, 4),
        "embeddings_parquet": str(embeddings_dir),
        "embedded_rows": summary.rows_out,
        "plots": {k: str(v) for k, v in files.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "mlflow_ui": f"mlflow ui --backend-store-uri {tracking_uri()} --port 5000",
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    sys.exit(main())
