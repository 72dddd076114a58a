"""The ``cvae`` console script: ``cvae train|embed|decode|models|demo ...``.

Each subcommand is the ``main(argv)`` of ``jobs.<name>``, also runnable as ``python -m jobs.<name>``.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

COMMANDS = {
    "train": "train a model on Ray Train, tracked in MLflow",
    "embed": "embed a data set with a model into parquet (Ray Data batch job)",
    "decode": "decode a parquet of latent vectors into features",
    "models": "list registered models, set aliases, show versions",
    "pack": "write a .npy tree as parquet shards with its ids (for data read many times)",
    "demo": "the end-to-end demo on scikit-learn's digits",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: cvae {" + ",".join(COMMANDS) + "} ...\n")
        for name, text in COMMANDS.items():
            print(f"  {name:8s} {text}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"jobs.{args[0]}")
    return int(module.main(args[1:]))


if __name__ == "__main__":
    sys.exit(main())
