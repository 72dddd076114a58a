"""Embed a data set with a trained model into parquet: ``python -m jobs.embed`` / ``cvae embed``.

    cvae embed --model models:/mnist@champion --data /data/mnist_npy --output /data/mnist_z \\
        --num-actors 2 --with-score

Output: parquet with ``id`` and ``embedding`` (plus ``neg_elbo`` and ``reconstruction_error``
with ``--with-score``), ``_manifest.json``, and ``_errors.parquet`` for files skipped with
``--on-error skip``. The output appears only when complete. Exit status 0 with the summary as
JSON on stdout; 2 with a one-line error (existing output, unknown model, bad data).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from jobs.arguments import setup_logging

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from pipeline.sources import add_source_arguments, source_from_args

    parser = argparse.ArgumentParser(prog="cvae embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="URI",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, a logdir")
    add_source_arguments(parser)
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--with-score", action="store_true",
                        help="add per-row negative ELBO and reconstruction error")
    parser.add_argument("--score-samples", type=int, default=8,
                        help="Monte-Carlo samples per row for the negative ELBO (fixed seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                        help="a bad input file: fail naming it, or list it in _errors.parquet")
    parser.add_argument("--experiment", default="cvae-embed", help="MLflow experiment")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(not args.quiet)

    from pipeline.inference import EmbedConfig, OutputExistsError, run_bulk_embedding
    from pipeline.registry import ModelNotFoundError
    from pipeline.sources import DataValidationError

    config = EmbedConfig(model_uri=args.model, source=source_from_args(args), output=args.output,
                         batch_size=args.batch_size, num_actors=args.num_actors,
                         use_gpu=args.use_gpu, with_score=args.with_score,
                         score_samples=args.score_samples,
                         overwrite=args.overwrite, on_error=args.on_error,
                         experiment=args.experiment)
    try:
        summary = run_bulk_embedding(config)
    except (OutputExistsError, ModelNotFoundError, DataValidationError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
