"""Decode latent vectors into features: ``python -m jobs.decode`` / ``cvae decode``.

    cvae decode --model models:/mnist@champion --latents /data/mnist_z --output /data/mnist_back

Input: parquet with ``id`` and a latent-vector column (``--column``, default ``embedding``, as
``cvae embed`` writes). Output: parquet with ``id`` and ``features``; ``--npy-dir`` also writes one
``.npy`` per id.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.arguments import setup_logging

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvae decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="URI")
    parser.add_argument("--latents", required=True, help="parquet file or directory of latents")
    parser.add_argument("--column", default="embedding", help="the latent-vector column")
    parser.add_argument("--output", required=True, help="output parquet directory")
    parser.add_argument("--npy-dir", default=None, help="also write one .npy per id here")
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()

    from pipeline.inference import OutputExistsError, run_bulk_decoding
    from pipeline.registry import ModelNotFoundError
    from pipeline.sources import DataValidationError

    try:
        rows = run_bulk_decoding(args.model, args.latents, args.output, column=args.column,
                                 npy_dir=args.npy_dir, overwrite=args.overwrite,
                                 num_actors=args.num_actors, batch_size=args.batch_size)
    except (OutputExistsError, ModelNotFoundError, DataValidationError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"rows": rows, "output": args.output, "npy_dir": args.npy_dir}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
