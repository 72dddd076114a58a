"""Train a CompressionVAE on Ray Train, tracked in MLflow: ``python -m jobs.train`` / ``cvae train``.

Example::

    python -m jobs.train --data ~/my_dataset --num-workers 2 --num-steps 5000 \\
        --cells-encoder 512,128 --register-as mnist --alias champion

Runs unchanged under ``ray job submit`` (it connects to ``RAY_ADDRESS`` when set) and against an
MLflow server (``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from cvae_model.config import ModelConfig, TrainConfig
from jobs.arguments import add_config_arguments, config_from_args, setup_logging

__all__ = ["build_parser", "main"]

logger = logging.getLogger("cvae.jobs.train")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.ray_training import DistributedConfig
    from pipeline.sources import add_source_arguments

    parser = argparse.ArgumentParser(prog="cvae train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--valid-data", default=None,
                        help="explicit validation source (same layout as --data); overrides the split")
    parser.add_argument("--train-valid-split", type=float, default=0.9,
                        help="fraction of rows (by a stable hash of the id) used for training")
    add_config_arguments(parser, ModelConfig, exclude=("dim_feature", "cells_hidden"),
                         title="model")
    add_config_arguments(parser, TrainConfig, title="training")
    add_config_arguments(parser, DistributedConfig, exclude=("fault_injection", "materialize"),
                         title="cluster and tracking")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run named --run-name from its latest checkpoint")
    parser.add_argument("--register-as", default=None, metavar="NAME",
                        help="register the final model in the MLflow registry under NAME")
    parser.add_argument("--alias", action="append", default=[],
                        help="alias to set on the registered version (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(not args.quiet)
    from pipeline.ray_training import DistributedConfig, run_distributed_training
    from pipeline.sources import SourceSpec, source_from_args

    if args.resume and not getattr(args, "DistributedConfig.run_name"):
        parser.error("--resume needs --run-name of the run to continue")
    if args.alias and not args.register_as:
        parser.error("--alias needs --register-as NAME")
    source = source_from_args(args)
    valid = SourceSpec(**{**asdict(source), "path": args.valid_data}) if args.valid_data else None
    model_args = {k: v for k, v in asdict(config_from_args(args, ModelConfig, dim_feature=1)).items()
                  if k not in ("dim_feature", "cells_hidden")}
    if getattr(args, "ModelConfig.cells_encoder") is None:
        model_args["cells_encoder"] = None  # the rule applies to the real feature count
    train_config = config_from_args(args, TrainConfig)
    dist = config_from_args(args, DistributedConfig)
    logger.info("model %s", json.dumps(model_args))
    logger.info("training %s", json.dumps(train_config.to_dict()))
    logger.info("cluster %s", json.dumps(asdict(dist)))
    result = run_distributed_training(source, model_args, train_config, dist,
                                      train_valid_split=args.train_valid_split,
                                      valid_source=valid, resume=args.resume)
    summary = {"mlflow_run_id": result.run_id, "step": result.step,
               "checkpoint": str(result.checkpoint_dir),
               "metrics": {k: result.metrics[k] for k in sorted(result.metrics)}}
    if args.register_as:
        from pipeline.registry import register_run_model

        version = register_run_model(result.run_id, result.checkpoint_dir, args.register_as,
                                     aliases=args.alias, metrics=result.metrics)
        summary["registered"] = f"models:/{args.register_as}/{version}"
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
