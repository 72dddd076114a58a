"""Job outputs that are complete or absent: the commit protocol.

An output directory holds parts written by one attempt and a manifest written last::

    OUTPUT/_manifest.json                 the job's summary, and every part with its rows
    OUTPUT/parts-<attempt>/part-NNNNNN.parquet
    OUTPUT/parts-<attempt>/_errors.parquet   rows or files skipped (when any were)

An output is complete exactly when its manifest exists, and readers of cvae outputs read what
the manifest lists (``output_parts``, ``read_output``; ``pipeline.sources`` does it for any
source holding a manifest). On a local disk the attempt is staged in a hidden sibling
``.NAME.tmp-...`` and renamed into place, so the folder appears whole. Object stores have no
rename: parts go under the attempt's own prefix, the manifest (one PUT) makes them the output,
and the parts of older or failed attempts are deleted after it.

``--overwrite`` replaces only a cvae output (a folder holding its manifest). Never the input,
a folder holding it, the working or home directory; the commit checks again what it replaces.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cvae_model.paths import contains, replace_refusal
from pipeline.storage import Location, resolve

__all__ = ["ERRORS", "MANIFEST", "CommittedOutput", "OutputExistsError", "is_attempt_folder",
           "output_parts", "read_manifest", "read_output"]

logger = logging.getLogger("cvae.outputs")

MANIFEST = "_manifest.json"
ERRORS = "_errors.parquet"
FORMAT = "cvae-output/1"
_HOST = socket.gethostname()
_ATTEMPT_FOLDER = re.compile(r"^parts-\d{8}T\d{6}-[0-9a-f]{8}$")


def is_attempt_folder(name: str) -> bool:
    """Whether ``name`` is the folder of one attempt's parts (``parts-<time>-<id>``)."""
    return bool(_ATTEMPT_FOLDER.match(name))


class OutputExistsError(FileExistsError):
    """The output exists and may not be replaced (no --overwrite, or it is not a cvae output)."""


def read_manifest(location: str | Location) -> dict[str, Any]:
    """The manifest of a complete cvae output; FileNotFoundError if it is not one."""
    place = resolve(location)
    manifest = place.join(MANIFEST)
    if not manifest.exists():
        raise FileNotFoundError(f"{place.uri} is not a complete cvae output (no {MANIFEST}: "
                                "the job that wrote it did not finish)")
    return json.loads(manifest.read_bytes())


def output_parts(location: str | Location) -> list[Location]:
    """The data files of a complete output, as its manifest lists them."""
    place = resolve(location)
    return [place.join(part["path"]) for part in read_manifest(place)["parts"]]


def read_output(location: str | Location, columns: Sequence[str] | None = None) -> pa.Table:
    """A complete output's rows as one table (small outputs, tests, benchmarks)."""
    tables = [pq.read_table(part.path, columns=columns, filesystem=part.filesystem)
              for part in output_parts(location)]
    if not tables:
        raise ValueError(f"{resolve(location).uri} has no parts")
    return pa.concat_tables(tables)


def _owner_alive(name: str) -> bool:
    """Whether the job that made the temporary ``.NAME.tmp-HOST-PID-ID`` still runs here."""
    try:
        host, pid = name.rsplit(".tmp-", 1)[1].rsplit("-", 2)[:2]
    except ValueError:
        return False
    if host != _HOST:
        return True  # another machine's: not ours to judge
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class CommittedOutput:
    """One attempt at writing ``target``: parts go to ``parts``; ``commit`` publishes them.

    Checks happen at construction (before any work): a refusal raises ``OutputExistsError``.
    Used as a context manager, an attempt that did not commit is removed on exit.
    """

    def __init__(self, target: str | Location, *, overwrite: bool, inputs: Sequence[str] = (),
                 flat: bool = False) -> None:
        """``flat``: on a local disk, files go to the output folder itself rather than to
        ``parts-<attempt>/`` (a tree of ``.npy`` files keeps its layout; object stores always
        use the attempt prefix)."""
        self.target = resolve(target)
        self.overwrite, self.inputs = overwrite, [resolve(i).uri for i in inputs]
        self.attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.committed = False
        self.seen_attempt = self._check()
        if self.target.is_local:
            self._sweep()
            parent = self.target.parent()
            self.root = parent.join(f".{self.target.name}.tmp-{_HOST}-{os.getpid()}-{self.attempt[-8:]}")
        else:
            self.root = self.target
        self.parts = (self.root if flat and self.target.is_local
                      else self.root.join(f"parts-{self.attempt}"))

    def _check(self) -> str | None:
        """Refuse what must not be replaced; the attempt id of an existing manifest, if any."""
        reason = replace_refusal(self.target.uri, self.inputs)
        inside = [item for item in self.inputs if contains(item, self.target.uri)]
        if reason or inside:
            why = reason or f"it is inside the input {inside[0]}"
            raise OutputExistsError(f"Not writing the output {self.target.uri}: {why}")
        if not self.target.exists():
            return None
        if self.target.is_file():
            raise OutputExistsError(f"{self.target.uri} exists and is a file; not replacing it")
        names = {info.base_name for info in self.target.children()}
        if MANIFEST in names:  # a complete cvae output: all of it is ours
            if not self.overwrite:
                raise OutputExistsError(f"{self.target.uri} already exists; pass --overwrite "
                                        "(overwrite=True) to replace it")
            return str(read_manifest(self.target).get("attempt"))
        foreign = sorted(n for n in names if not is_attempt_folder(n))  # those: failed attempts
        if foreign:
            raise OutputExistsError(f"{self.target.uri} exists and is not a cvae output (it holds "
                                    f"{', '.join(foreign[:5])}); not replacing it")
        return None

    def _sweep(self) -> None:
        """Remove temporaries of this output left by jobs that no longer run."""
        prefix = f".{self.target.name}."
        for info in self.target.parent().children():
            name = info.base_name
            stale = (name.startswith(prefix + "tmp-") and not _owner_alive(name)) or (
                name.startswith(prefix + "old-") and time.time() - info.mtime.timestamp() > 60)
            if stale:
                logger.info("removing %s, left by an earlier job", info.path)
                Location(self.target.filesystem, info.path, info.path).delete()

    def __enter__(self) -> CommittedOutput:
        self.parts.mkdir()
        return self

    @property
    def parts_path(self) -> str:
        """Where this attempt's files are, relative to the output ("." for a flat local one)."""
        return "." if self.parts == self.root else self.parts.name

    def write_file(self, name: str, data: bytes) -> str:
        """Write a file of this attempt (e.g. errors); its path relative to the output."""
        self.parts.join(name).write_bytes(data)
        return name if self.parts_path == "." else f"{self.parts_path}/{name}"

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Publish: check again what would be replaced, write the manifest last."""
        current = self._check()
        if current != self.seen_attempt and not self.overwrite:
            raise OutputExistsError(f"{self.target.uri} was completed by another job while this "
                                    "one ran; pass --overwrite to replace it")
        full = {"format": FORMAT, "attempt": self.attempt, **manifest}
        for part in full.get("parts", []):
            if not self.root.join(part["path"]).exists():
                raise RuntimeError(f"part {part['path']} of {self.target.uri} is missing")
        if self.target.is_local:
            from pathlib import Path

            from cvae_model.checkpoint import replace_directory

            self.root.join(MANIFEST).write_bytes(json.dumps(full, indent=2).encode())
            replace_directory(Path(self.root.path), Path(self.target.path))
        else:
            self.target.join(MANIFEST).write_bytes(json.dumps(full, indent=2).encode())
            for info in self.target.children():
                if is_attempt_folder(info.base_name) and info.base_name != self.parts.name:
                    self.target.join(info.base_name).delete()
        self.committed = True
        return full

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.committed:
            (self.root if self.target.is_local else self.parts).delete()
