"""The model registry from the command line: ``python -m jobs.models`` / ``cvae models``.

    cvae models list                       registered models, their versions and aliases
    cvae models alias NAME ALIAS VERSION   set or move an alias (roll back by moving it back)
    cvae models show NAME VERSION|ALIAS    a version's metrics, source run and aliases
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from jobs.arguments import setup_logging

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvae models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="registered models, versions and aliases")
    alias = commands.add_parser("alias", help="set or move an alias")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version")
    show = commands.add_parser("show", help="a version's metrics, source run and aliases")
    show.add_argument("name")
    show.add_argument("version", metavar="VERSION_OR_ALIAS")
    args = parser.parse_args(argv)
    setup_logging(verbose=False)

    from pipeline.registry import ModelNotFoundError, describe_version, list_models, set_alias

    try:
        if args.command == "list":
            models = list_models()
            if not models:
                print("no registered models")
            for model in models:
                aliases = ", ".join(f"{a}->v{v}" for a, v in model["aliases"].items()) or "none"
                print(f"{model['name']}: versions {', '.join(model['versions'])}; aliases {aliases}")
        elif args.command == "alias":
            set_alias(args.name, args.alias, args.version)
            print(f"models:/{args.name}@{args.alias} -> version {args.version}")
        else:
            print(json.dumps(asdict(describe_version(args.name, args.version)), indent=2))
    except ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
