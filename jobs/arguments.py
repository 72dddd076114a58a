"""Command-line flags generated from the config dataclasses, so every field is a flag, once."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from typing import Any

__all__ = ["add_config_arguments", "config_from_args", "parse_int_list", "setup_logging"]


def parse_int_list(text: str) -> tuple[int, ...]:
    """'512,128' -> (512, 128)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 512,128, got {text!r}") from exc


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (),
                         title: str | None = None) -> None:
    """One flag per dataclass field, typed and defaulted from the field, help from its docstring."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    instance_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        hint = hints[field.name]
        default = instance_defaults[field.name]
        kwargs: dict[str, Any] = {"dest": f"{cls.__name__}.{field.name}", "default": default,
                                  "help": f"(default: {default})"}
        args = typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.name == "cells_encoder":
            kwargs["type"] = parse_int_list
            kwargs["metavar"] = "W1,W2,..."
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(args)
        else:
            base = next((a for a in args if a is not type(None)), hint) if args else hint
            kwargs["type"] = base if base in (int, float, str) else str
        group.add_argument(_flag(field.name), **kwargs)


def config_from_args(args: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    prefix = f"{cls.__name__}."
    values = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    values.update(overrides)
    return cls(**values)


def setup_logging(verbose: bool = True) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("ray.data", "ray.train", "mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
