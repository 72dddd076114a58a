"""Command-line flags generated from the config dataclasses: every field a flag, defined once.

A field ``num_steps: int = 50_000`` with the docstring under it becomes
``--num-steps N  Optimizer steps to take ... (default: 50000)``. The docstrings are read from the
dataclass's source with ``ast`` (Python keeps no runtime record of them), so ``--help`` shows
the same text as the code. We extend argparse rather than adding jsonargparse or tyro: the
configs are flat, and argparse's help, errors and ``BooleanOptionalAction`` already fit.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from typing import Any

__all__ = ["add_config_arguments", "config_from_args", "field_docs", "parse_int_list"]


def parse_int_list(text: str) -> tuple[int, ...]:
    """'512,128' -> (512, 128)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 512,128, got {text!r}") from exc


def parse_str_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (and of its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argument(hint: Any, name: str) -> dict[str, Any]:
    """argparse keyword arguments for a field's type (``X | None`` is taken as ``X``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is typing.Literal:
        return {"choices": list(typing.get_args(base))}
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        return {"type": parse_int_list if item is int else parse_str_list,
                "metavar": "A,B,..." if item is str else "N1,N2,..."}
    if base in (int, float, str):
        return {"type": base, "metavar": {int: "N", float: "X", str: name.upper()}[base]}
    return {"type": str}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (),
                         title: str | None = None, required: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass ``cls``: typed, defaulted, help from its docstring."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        kwargs = _argument(hints[field.name], field.name)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        default = field.default if field.default is not dataclasses.MISSING else None
        is_required = field.name in required or field.default is dataclasses.MISSING
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = docs.get(field.name, "")
        kwargs["help"] = f"{text} (required)" if is_required else f"{text} (default: {shown})"
        flag = _flag(field.metadata.get("flag", field.name))  # e.g. SourceSpec.path is --data
        group.add_argument(flag, dest=f"{cls.__name__}.{field.name}",
                           default=None if is_required else default, required=is_required,
                           **kwargs)


def config_from_args(args: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    """The ``cls`` instance the flags describe (``overrides`` win)."""
    prefix = f"{cls.__name__}."
    values = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    values.update(overrides)
    return cls(**values)


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fs-option KEY=VALUE``: settings of the object-store filesystem (pipeline.storage)."""
    parser.add_argument_group("storage").add_argument(
        "--fs-option", action="append", default=[], metavar="KEY=VALUE",
        help="a constructor argument of the pyarrow filesystem of s3://, gs:// or abfs:// paths, "
             "e.g. endpoint_override=127.0.0.1:9000 or scheme=http (repeatable; default: the "
             "environment, AWS_ENDPOINT_URL and the like)")


def _option_value(text: str) -> Any:
    """A ``--fs-option`` value: a JSON number, boolean or null when it reads as one, else text."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def apply_storage_arguments(args: argparse.Namespace) -> None:
    """Make ``--fs-option`` settings the process's filesystem options (``CVAE_FS_OPTIONS``), so
    every path the job resolves uses them; values such as ``connect_timeout=5`` or
    ``force_virtual_addressing=true`` become numbers and booleans."""
    import json
    import os

    if args.fs_option:
        bad = [item for item in args.fs_option if "=" not in item or not item.split("=", 1)[0]]
        if bad:
            raise ValueError(f"--fs-option takes KEY=VALUE (e.g. endpoint_override=127.0.0.1:9000), "
                             f"got {bad[0]!r}")
        options = {key: _option_value(value)
                   for key, value in (item.split("=", 1) for item in args.fs_option)}
        os.environ["CVAE_FS_OPTIONS"] = json.dumps(options)
