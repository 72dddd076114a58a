"""What a path names, and which paths cvae must never replace.

``replace_refusal`` is the one rule behind ``CompressionVAE.save``, job ``--overwrite`` and the
commit of an output: an overwrite may replace what cvae wrote there before, never the data it
reads, a folder that holds that data, the working directory, the home directory, or a folder
above either of them. It works on local paths and on object-store URIs (``s3://bucket/key``)
alike, by comparing normalized names; it touches no file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

__all__ = ["contains", "is_uri", "local_path", "replace_refusal"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (s3, gs, abfs, hdfs, file), False for a plain path."""
    return bool(_SCHEME.match(os.fspath(location)))


def local_path(location: str | os.PathLike[str]) -> Path:
    """A plain path (or ``file://`` URI) as an absolute path, ``~`` expanded."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(os.path.abspath(os.path.expanduser(text)))


def _parts(location: str | os.PathLike[str]) -> tuple[str, tuple[str, ...]]:
    """(scheme, path components) of a location, normalized for comparison."""
    text = os.fspath(location)
    if is_uri(text) and not text.startswith("file://"):
        scheme, rest = text.split("://", 1)
        return scheme.lower(), tuple(p for p in PurePosixPath(rest).parts if p != "/")
    return "file", local_path(text).resolve().parts


def _is_at_or_above(upper: tuple[str, tuple[str, ...]], lower: tuple[str, tuple[str, ...]]) -> bool:
    return upper[0] == lower[0] and lower[1][:len(upper[1])] == upper[1]


def contains(outer: str | os.PathLike[str], inner: str | os.PathLike[str]) -> bool:
    """True when ``inner`` is ``outer`` or lies below it (paths or URIs, normalized)."""
    return _is_at_or_above(_parts(outer), _parts(inner))


def replace_refusal(target: str | os.PathLike[str],
                    inputs: Iterable[str | os.PathLike[str]] = ()) -> str | None:
    """Why ``target`` must not be replaced, or None when replacing it is allowed.

    Example:
        >>> replace_refusal("/data/in", inputs=["/data/in/part-0.parquet"])
        'it holds the input /data/in/part-0.parquet'
    """
    place = _parts(target)
    if len(place[1]) <= 1:  # "/" locally; the bucket itself on an object store
        return "it is a filesystem root or a bucket"
    for item in inputs:
        if _is_at_or_above(place, _parts(item)):
            return f"it holds the input {os.fspath(item)}"
    if place[0] == "file":
        for name, where in (("working directory", Path.cwd()), ("home directory", Path.home())):
            if _is_at_or_above(place, _parts(where)):
                return f"it is the {name} or holds it ({where})"
    return None
