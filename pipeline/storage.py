"""Every path a user gives, as a pyarrow filesystem and a path inside it.

``resolve`` turns a local path (``~`` expanded, made absolute), a ``file://`` URI or an
object-store URI (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``) into a ``Location``.
Credentials and endpoints come from the usual environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_DEFAULT_REGION``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...);
``CVAE_FS_OPTIONS`` (JSON) or a job's ``--fs-option KEY=VALUE`` pass constructor arguments to the
filesystem (for ``pyarrow.fs.S3FileSystem``: ``endpoint_override``, ``region``, ``scheme``, ...)
and win over the environment. Listing, reading, writing and existence checks all go through the
filesystem.

A ``Location`` pickles, so Ray tasks on other nodes use the same filesystem. For ``s3://`` the
settings the driver found in its environment (endpoint, region, and keys when they are given as
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) are written into the filesystem object, so a
task on a node without them reads as the driver does (pyarrow's own ``from_uri`` keeps the
endpoint but drops environment keys when pickled, and the other node would then look for
credentials of its own). Without keys in the environment (an instance role, a profile) each node
uses its own credential chain, as pyarrow does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from cvae_model.paths import is_uri, local_path

__all__ = ["FS_OPTIONS_ENV", "Location", "resolve"]

FS_OPTIONS_ENV = "CVAE_FS_OPTIONS"
_FILESYSTEMS = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem",
                "abfs": "AzureFileSystem", "abfss": "AzureFileSystem"}


def _options(given: Mapping[str, Any] | None) -> dict[str, Any]:
    if given is not None:
        return dict(given)
    text = os.environ.get(FS_OPTIONS_ENV)
    if not text:
        return {}
    try:
        return dict(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{FS_OPTIONS_ENV} must be a JSON object of filesystem options, got "
                         f"{text!r} ({exc})") from None


def _parse_uri(text: str) -> tuple[str, str]:
    scheme, rest = text.split("://", 1)
    return scheme.lower(), rest.rstrip("/")


def _s3_filesystem(rest: str, extra: Mapping[str, Any]) -> pafs.S3FileSystem:
    """An S3 filesystem from the environment (explicit values, so it pickles whole) and ``extra``."""
    env = os.environ
    settings: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        settings["endpoint_override"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        settings["region"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        settings.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            settings["session_token"] = env["AWS_SESSION_TOKEN"]
    settings.update(extra)
    if "region" not in settings and "endpoint_override" not in settings:
        # Real AWS with no region configured: ask where the bucket is, as from_uri does.
        settings["region"] = pafs.resolve_s3_region(rest.split("/", 1)[0])
    return pafs.S3FileSystem(**settings)


def resolve(location: str | os.PathLike[str] | Location,
            options: Mapping[str, Any] | None = None) -> Location:
    """The filesystem and path of a user's path or URI.

    ``options``: filesystem constructor arguments (default: ``$CVAE_FS_OPTIONS``). Raises
    ``ValueError`` naming the URI when no filesystem can be built for it.

    Example:
        >>> resolve("~/data").uri  # doctest: +SKIP
        '/home/me/data'
        >>> resolve("s3://bucket/digits").path  # doctest: +SKIP
        'bucket/digits'
    """
    if isinstance(location, Location):
        return location
    text = os.fspath(location)
    if not is_uri(text) or text.startswith("file://"):
        path = local_path(text).as_posix()
        return Location(pafs.LocalFileSystem(), path, path)
    scheme, rest = _parse_uri(text)
    if not rest:
        raise ValueError(f"{text}: no bucket or path after {scheme}://")
    extra = _options(options)
    try:
        if scheme == "s3" and "?" not in rest:
            filesystem: pafs.FileSystem = _s3_filesystem(rest, extra)
            path = rest
        elif extra and scheme in _FILESYSTEMS:
            filesystem = getattr(pafs, _FILESYSTEMS[scheme])(**extra)
            path = rest
        else:
            filesystem, path = pafs.FileSystem.from_uri(text)
    except (OSError, TypeError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise ValueError(f"Cannot open {text}: {exc}. Object stores take their credentials and "
                         f"endpoint from the environment (AWS_ENDPOINT_URL, ...) or "
                         f"{FS_OPTIONS_ENV} / --fs-option KEY=VALUE.") from None
    return Location(filesystem, path.rstrip("/"), f"{scheme}://{rest}")


@dataclass(frozen=True)
class Location:
    """A path on a filesystem: what ``resolve`` returns. ``uri`` is for people and manifests."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.uri

    def join(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p)
        return Location(self.filesystem, f"{self.path}/{rel}", f"{self.uri}/{rel}")

    def parent(self) -> Location:
        path, uri = self.path.rsplit("/", 1)[0], self.uri.rsplit("/", 1)[0]
        return Location(self.filesystem, path or "/", uri or "/")

    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def write_bytes(self, data: bytes) -> None:
        """Write a whole object (on object stores one PUT: readers see all of it or nothing)."""
        self.parent().mkdir()
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(data)

    def mkdir(self) -> None:
        """Make this directory and its parents; nothing on an object store, which has no
        folders (a key makes its prefix), so no empty marker objects are written there."""
        if self.is_local:
            self.filesystem.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Remove a directory tree or a file; nothing if absent."""
        kind = self.info().type
        if kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.filesystem.delete_file(self.path)

    def children(self) -> list[pafs.FileInfo]:
        """Entries directly inside this directory (empty when it does not exist)."""
        if not self.is_dir():
            return []
        return self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=False))
