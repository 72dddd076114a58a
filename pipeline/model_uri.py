"""A model reference, resolved once, into a checkpoint in memory.

References: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/m-<id>`` (a logged
model), ``runs:/RUN_ID/PATH`` (an artifact folder of the run, or a model the run logged under
that name), or a path or URI (``s3://...``) of a checkpoint directory or of a logdir (its latest
complete checkpoint, the one choice everywhere). An alias is resolved to a version here, once,
so a job uses one version even if the alias moves while it runs. MLflow downloads go to a
temporary folder that is deleted before ``resolve_model`` returns: the model then travels as
bytes (to Ray's object store, to actors), never as a local path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvae_model.checkpoint import (
    CHECKPOINT_FILES,
    CONFIG_FILE,
    Checkpoint,
    checkpoint_step,
    find_checkpoint,
    read_checkpoint_files,
    save_checkpoint,
)
from cvae_model.paths import is_uri
from pipeline.storage import Location, resolve

__all__ = ["ModelNotFoundError", "ResolvedModel", "resolve_model", "save_model"]

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")
"""``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the registry's references)."""
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/?(?P<path>.*)$")


class ModelNotFoundError(LookupError):
    """A model reference that names no registered model, alias, version, run or checkpoint."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model found by its reference: the checkpoint and where it came from."""

    reference: str
    files: dict[str, bytes]
    """The checkpoint's files (what travels to workers)."""
    checkpoint: Checkpoint
    name: str | None = None
    """The registered model's name (models:/ references), else None."""
    version: str | None = None
    """The registered version a models:/ reference resolved to (aliases included)."""
    source: str = ""
    """Where the files were read: a path, a URI, or the MLflow artifact URI."""


def checkpoint_files_at(place: Location) -> dict[str, bytes]:
    """The checkpoint files (of ``CHECKPOINT_FILES``) that the folder ``place`` holds, by name."""
    present = {info.base_name for info in place.children()}
    return {name: place.join(name).read_bytes() for name in CHECKPOINT_FILES if name in present}


def _from_location(location: Location, reference: str) -> tuple[dict[str, bytes], str]:
    """The files of the checkpoint at or (latest complete) under an object-store location."""
    found = checkpoint_files_at(location)
    if set(found) == CHECKPOINT_FILES:
        return found, location.uri
    numbered = sorted((checkpoint_step(info.base_name), info.base_name) for info in location.children()
                      if checkpoint_step(info.base_name) is not None)
    for _, name in reversed(numbered):
        candidate = checkpoint_files_at(location.join(name))
        if set(candidate) == CHECKPOINT_FILES:
            return candidate, location.join(name).uri
    if found:
        return found, location.uri  # incomplete: Checkpoint.from_files names what is missing
    raise ModelNotFoundError(f"No cvae model at {location.uri}: expected a checkpoint directory "
                             "or a logdir containing checkpoint-* directories")


def _registered(client: Any, reference: str) -> tuple[str, str, str]:
    from pipeline.registry import resolve_model_uri

    name, version = resolve_model_uri(reference, client)
    return name, version, f"models:/{name}/{version}"


def _download(client: Any, reference: str, source: str) -> tuple[dict[str, bytes], str]:
    import mlflow
    from mlflow.exceptions import MlflowException

    folder = Path(tempfile.mkdtemp(prefix="cvae-model-"))
    try:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder),
                                                        tracking_uri=client.tracking_uri)
        except (MlflowException, OSError) as exc:
            raise ModelNotFoundError(f"{reference}: the model's artifacts could not be downloaded "
                                     f"from {source} ({exc})") from None
        try:
            found = find_checkpoint(local)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"{reference}: {exc}") from None
        return read_checkpoint_files(found), source
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def resolve_model(reference: str | os.PathLike[str]) -> ResolvedModel:
    """Find the model ``reference`` names and read its checkpoint (see the module docstring).

    Raises ``ModelNotFoundError`` naming what exists (registered models, aliases, versions, a
    run's artifacts) when the reference names nothing, and ``FileNotFoundError`` naming the
    missing files of an incomplete checkpoint.
    """
    text = os.fspath(reference)
    name = version = None
    if text.startswith(("models:/", "runs:/")):
        from pipeline.registry import client_for, run_artifact_source

        client = client_for()
        if MODELS_URI.match(text):
            name, version, source = _registered(client, text)
        elif (match := _RUNS_URI.match(text)) is not None:
            source = run_artifact_source(client, text, match["run_id"], match["path"])
        else:
            source = text
        files, where = _download(client, text, source)
    elif is_uri(text) and not text.startswith("file://"):
        files, where = _from_location(resolve(text), text)
    else:
        try:
            found = find_checkpoint(text)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(str(exc)) from None
        files, where = read_checkpoint_files(found), str(found)
    return ResolvedModel(text, files, Checkpoint.from_files(files, where), name, version, where)


def save_model(checkpoint: Checkpoint, destination: str | os.PathLike[str]) -> str:
    """Write ``checkpoint`` as a checkpoint directory at a path or URI; its location.

    A local directory is replaced only if it is a checkpoint (atomically); on an object store
    the files are written with ``config.json`` last, so a reader never loads a partial model.
    """
    location = resolve(destination)
    if location.is_local:
        return str(save_checkpoint(checkpoint, location.path, overwrite=True))
    present = {info.base_name for info in location.children()}
    if present - CHECKPOINT_FILES:
        raise FileExistsError(f"Not writing a model to {location.uri}: it holds other files "
                              f"({', '.join(sorted(present - CHECKPOINT_FILES)[:5])})")
    files = checkpoint.to_files()
    for name in sorted(files, key=lambda n: n == CONFIG_FILE):
        location.join(name).write_bytes(files[name])
    return location.uri
