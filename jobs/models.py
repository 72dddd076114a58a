"""The model registry from the command line: ``python -m jobs.models`` / ``cvae models``.

    cvae models list                       registered models, their versions and aliases
    cvae models alias NAME ALIAS VERSION   set or move an alias (roll back by moving it back)
    cvae models show NAME VERSION|ALIAS    a version's metrics, source run and aliases
    cvae models promote NAME --candidate VERSION --alias ALIAS [--tolerance X]
                                           move ALIAS to VERSION only if its quality report
                                           (kNN accuracy, trustworthiness) is not worse than
                                           that of the version ALIAS points at; exit code 3
                                           and nothing moved otherwise

The store is ``$MLFLOW_TRACKING_URI`` (a server or a database), else the embedded SQLite store
under ``$CVAE_HOME`` (default ./cvae_runs). ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from typing import Any

from jobs.runner import setup_logging

__all__ = ["main"]

logger = logging.getLogger("cvae.jobs.models")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvae models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="registered models, versions and aliases")
    alias = commands.add_parser("alias", help="set or move an alias")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version")
    show = commands.add_parser("show", help="a version's metrics, source run and aliases")
    show.add_argument("name")
    show.add_argument("version", metavar="VERSION_OR_ALIAS")
    promote = commands.add_parser(
        "promote", help="move an alias to a version that is not worse on the quality report")
    promote.add_argument("name")
    promote.add_argument("--candidate", required=True, metavar="VERSION",
                         help="the version to promote")
    promote.add_argument("--alias", required=True, help="the alias to move, e.g. champion")
    promote.add_argument("--tolerance", type=float, default=0.0,
                         help="how far below the current version a figure may be (absolute; "
                              "default: 0, not worse at all)")
    return parser


PROMOTION_REFUSED = 3
"""Exit code of a refused promotion (1: a bad name/version/alias, 2: bad arguments)."""


def _promotion_text(result: Any) -> str:
    lines = [f"models:/{result.name}@{result.alias} -> version {result.candidate}"
             + (f" (was version {result.previous})" if result.previous else " (new alias)")]
    for figure, (new, old) in result.figures.items():
        shown = "none" if new is None else f"{new:.4f}"
        lines.append(f"  {figure}: {shown}" + (f" (was {old:.4f})" if old is not None else ""))
    return "\n".join(lines)


def _version_text(info: Any) -> str:
    lines = [f"models:/{info.name}/{info.version}  ({info.status})",
             f"  aliases:    {', '.join(info.aliases) or '(none)'}",
             f"  source run: {info.run_id or '(none)'}",
             f"  source:     {info.source}"]
    lines += [f"  {key}: {value:.6g}" for key, value in sorted(info.metrics.items())]
    return "\n".join(lines)


def _list_text(models: list[Any]) -> str:
    if not models:
        return "no registered models"
    lines = []
    for model in models:
        lines.append(f"{model.name}")
        for version in model.versions:
            aliases = f"  @{', @'.join(version.aliases)}" if version.aliases else ""
            val = version.metrics.get("val_loss")
            metric = f"  val_loss={val:.6g}" if val is not None else ""
            lines.append(f"  version {version.version}{aliases}{metric}  run {version.run_id}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(verbose=False)

    from pipeline.registry import (
        ModelNotFoundError,
        PromotionRefused,
        describe_version,
        list_models,
        promote,
        set_alias,
    )
    from pipeline.tracking import tracking_uri

    logger.info("model registry at %s", tracking_uri())
    try:
        if args.command == "list":
            models = list_models()
            print(json.dumps([asdict(m) for m in models], indent=2) if args.json
                  else _list_text(models))
        elif args.command == "alias":
            info = set_alias(args.name, args.alias, args.version)
            print(json.dumps(asdict(info), indent=2) if args.json
                  else f"models:/{args.name}@{args.alias} -> version {info.version}")
        elif args.command == "promote":
            result = promote(args.name, args.candidate, args.alias, tolerance=args.tolerance)
            print(json.dumps(asdict(result), indent=2) if args.json else _promotion_text(result))
        else:
            info = describe_version(args.name, args.version)
            print(json.dumps(asdict(info), indent=2) if args.json else _version_text(info))
    except PromotionRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return PROMOTION_REFUSED
    except (ModelNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
