"""What every job's ``main`` shares: logging, SIGTERM, errors, the JSON summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["print_summary", "run_main", "setup_logging"]

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError,
                                                LookupError, TypeError)
"""Bad input, a missing model or path, an output that may not be replaced: one line, exit 2."""


def setup_logging(verbose: bool = True) -> None:
    """Plain log lines on stderr (readable in files and ``ray job logs``), quiet libraries."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("ray", "ray.data", "ray.train", "mlflow", "alembic", "urllib3", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM (ray job stop, timeout, a scheduler) unwinds like Ctrl-C: temporary outputs are
    # removed and MLflow runs end KILLED by the code they pass through.
    raise KeyboardInterrupt(f"signal {signum}")


def print_summary(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2, default=str), flush=True)


def run_main(body: Callable[[], dict[str, Any] | None], *, verbose: bool = True) -> int:
    """Run a job's body: 0 with its summary as JSON on stdout; 2 with a one-line error for bad
    input; 130 when interrupted (Ctrl-C, SIGTERM)."""
    setup_logging(verbose)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = body()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print_summary(summary)
    return 0


def config_parser(prog: str, doc: str | None, configs: list[tuple[type, str]]) -> Any:
    """A parser with one flag per field of each config dataclass, ``--quiet`` and storage flags."""
    import argparse

    from jobs.arguments import add_config_arguments, add_storage_arguments

    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls, title in configs:
        add_config_arguments(parser, cls, title=title)
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    add_storage_arguments(parser)
    return parser


def run_configured(parser: Any, argv: list[str] | None,
                   body: Callable[..., dict[str, Any] | None], configs: list[type]) -> int:
    """Parse ``argv``, build each config, and run ``body(*configs)`` under ``run_main``."""
    from jobs.arguments import apply_storage_arguments, config_from_args

    args = parser.parse_args(argv)

    def run() -> dict[str, Any] | None:
        apply_storage_arguments(args)
        return body(*(config_from_args(args, cls) for cls in configs))

    return run_main(run, verbose=not args.quiet)
