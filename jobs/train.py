"""Train a CompressionVAE on Ray Train, tracked in MLflow: ``cvae train`` / ``python -m jobs.train``.

    cvae train --data ~/my_dataset --num-workers 2 --num-steps 5000 \\
        --cells-encoder 512,128 --register-as mnist --alias champion

Runs unchanged under ``ray job submit`` (it joins ``RAY_ADDRESS`` when set), with data and Ray
Train storage on an object store (``--data s3://...``, ``--storage-path s3://...``) and against
an MLflow server (``MLFLOW_TRACKING_URI``). Prints a JSON summary: the MLflow run, the final step
and metrics, the quality report (``pipeline.quality``: trustworthiness, kNN accuracy where the
data has labels, reconstruction error, on held-out rows; logged to the run and tagged on the
registered version), where the model was saved and the registered version.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from cvae_model.config import ModelConfig, TrainConfig
from jobs.arguments import (
    add_config_arguments,
    add_storage_arguments,
    apply_storage_arguments,
    config_from_args,
)
from jobs.runner import run_main

QUALITY_ROWS = 2000
"""pipeline.quality.QUALITY_ROWS, repeated so that --help does not import the pipeline."""

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from pipeline.ray_training import DistributedConfig
    from pipeline.sources import SourceSpec

    parser = argparse.ArgumentParser(prog="cvae train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, SourceSpec, title="data source")
    parser.add_argument("--valid-data", default=None, metavar="PATH",
                        help="a validation source of the same layout as --data; replaces the split")
    parser.add_argument("--train-valid-split", type=float, default=0.9,
                        help="fraction of rows (by a stable hash of the id) used for training "
                             "(default: 0.9)")
    add_config_arguments(parser, ModelConfig, exclude=("dim_feature", "cells_hidden"), title="model")
    add_config_arguments(parser, TrainConfig, title="training")
    add_config_arguments(parser, DistributedConfig, title="cluster and tracking")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run named --run-name from its latest checkpoint")
    parser.add_argument("--save-model", default=None, metavar="PATH",
                        help="write the final model here, a path or URI (default: "
                             "$CVAE_HOME/models/RUN_NAME on the driver's disk)")
    parser.add_argument("--register-as", default=None, metavar="NAME",
                        help="register the final model in the MLflow registry under NAME")
    parser.add_argument("--alias", action="append", default=[],
                        help="alias to set on the registered version (repeatable)")
    parser.add_argument("--quality-rows", type=int, default=QUALITY_ROWS, metavar="N",
                        help="held-out rows of the quality report (trustworthiness, kNN accuracy, "
                             f"reconstruction error); 0 skips it (default: {QUALITY_ROWS})")
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    add_storage_arguments(parser)
    return parser


def _quality(result: Any, source: Any, valid: Any, split: float, rows: int) -> dict[str, float]:
    """The final model's quality report on held-out rows, logged to its run; its figures."""
    from cvae_model.fitted import FittedModel
    from pipeline.quality import held_out_sample, log_quality, quality_report

    seed = result.checkpoint.train_config.seed
    try:
        X, labels = held_out_sample(source, valid_source=valid, train_valid_split=split,
                                    seed=seed, max_rows=rows)
        report = quality_report(FittedModel.from_checkpoint(result.checkpoint), X, labels,
                                max_rows=rows, seed=seed)
    except ValueError as exc:  # too few held-out rows: the trained model still counts
        logging.getLogger("cvae.jobs.train").warning("No quality report: %s", exc)
        return {}
    log_quality(result.run_id, report, result.checkpoint.train_state.step)
    return report.metrics()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.alias and not args.register_as:
        parser.error("--alias needs --register-as NAME")

    def body() -> dict:
        from dataclasses import asdict, replace

        from pipeline.model_uri import save_model
        from pipeline.ray_training import DistributedConfig, run_distributed_training
        from pipeline.sources import SourceSpec
        from pipeline.tracking import cvae_home

        apply_storage_arguments(args)
        source = config_from_args(args, SourceSpec)
        valid = replace(source, path=args.valid_data) if args.valid_data else None
        model_args = {k: v for k, v in vars(args).items() if k.startswith("ModelConfig.")}
        model_args = {k.split(".", 1)[1]: v for k, v in model_args.items()}
        dist = config_from_args(args, DistributedConfig)
        result = run_distributed_training(source, model_args, config_from_args(args, TrainConfig),
                                          dist, train_valid_split=args.train_valid_split,
                                          valid_source=valid, resume=args.resume)
        saved = save_model(result.checkpoint, args.save_model
                           or str(cvae_home() / "models" / result.run_name))
        summary = {"mlflow_run_id": result.run_id, "run_name": result.run_name,
                   "step": result.checkpoint.train_state.step, "model": saved,
                   "metrics": dict(sorted(result.metrics.items())),
                   "seed": result.checkpoint.train_config.seed, "distributed": asdict(dist)}
        quality: dict[str, float] = {}
        if args.quality_rows > 0:
            quality = _quality(result, source, valid, args.train_valid_split, args.quality_rows)
            summary["quality"] = quality
        if args.register_as:
            from pipeline.registry import publish

            version = publish(result.run_id, result.checkpoint, args.register_as,
                              aliases=args.alias, metrics={**result.metrics, **quality})
            summary["registered"] = f"models:/{args.register_as}/{version}"
        return summary

    return run_main(body, verbose=not args.quiet)


if __name__ == "__main__":
    sys.exit(main())
