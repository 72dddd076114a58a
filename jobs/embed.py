"""Embed a data set with a trained model into parquet: ``cvae embed`` / ``python -m jobs.embed``.

    cvae embed --model models:/mnist@champion --data s3://bucket/mnist_npy \\
        --output s3://bucket/mnist_z --with-score

Output: ``_manifest.json`` (written last: the output is complete when it exists) and parquet
parts with ``id`` and ``embedding`` (plus ``neg_elbo`` and ``reconstruction_error`` with
``--with-score``); rows skipped with ``--on-error skip`` are listed in the errors file the
manifest names. Exit 0 with the summary as JSON on stdout; 2 with a one-line error (an output
that may not be replaced, an unknown model, bad data).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

from jobs.runner import config_parser, run_configured

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from pipeline.inference import EmbedConfig, run_bulk_embedding
    from pipeline.sources import SourceSpec

    def body(source: SourceSpec, config: EmbedConfig) -> dict[str, Any]:
        return asdict(run_bulk_embedding(source, config))

    parser = config_parser("cvae embed", __doc__, [(SourceSpec, "data source"), (EmbedConfig, "job")])
    return run_configured(parser, argv, body, [SourceSpec, EmbedConfig])


if __name__ == "__main__":
    sys.exit(main())
