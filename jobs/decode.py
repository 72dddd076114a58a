"""Decode latent vectors into features: ``cvae decode`` / ``python -m jobs.decode``.

    cvae decode --model models:/mnist@champion --latents s3://bucket/mnist_z \\
        --output s3://bucket/mnist_back [--npy-dir /data/mnist_back_npy]

Input: parquet with an id and a latent-vector column (``--column``, default ``embedding``, as
``cvae embed`` writes; a cvae output is read as its manifest lists). Output: ``_manifest.json``
and parquet parts with ``id`` and ``features``; ``--npy-dir`` also writes one ``.npy`` per id
into a new folder (ids must be relative paths; they are refused otherwise).
"""

from __future__ import annotations

import sys

from jobs.runner import config_parser, run_configured

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from pipeline.decoding import DecodeConfig, run_bulk_decoding

    parser = config_parser("cvae decode", __doc__, [(DecodeConfig, "job")])
    return run_configured(parser, argv, run_bulk_decoding, [DecodeConfig])


if __name__ == "__main__":
    sys.exit(main())
