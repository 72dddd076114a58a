"""The MLflow model registry: log a checkpoint as a pyfunc model, register, alias, find again.

A registered cvae model is an MLflow pyfunc model (``pipeline/pyfunc_model.py``, logged as code)
whose artifact ``checkpoint`` is a cvae checkpoint directory, so ``CompressionVAE.load`` and
``mlflow.pyfunc.load_model`` read the same files. References: ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``, or a local directory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvae_model.checkpoint import CHECKPOINT_FILES, load_checkpoint

__all__ = [
    "ModelNotFoundError",
    "VersionInfo",
    "describe_version",
    "download_checkpoint",
    "list_models",
    "log_cvae_model",
    "register",
    "register_run_model",
    "resolve_model_uri",
    "set_alias",
]

logger = logging.getLogger("cvae.registry")

PYFUNC_SOURCE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT = "model"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")


class ModelNotFoundError(LookupError):
    """A model reference that names no registered model, alias, version or artifact."""


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    source: str
    metrics: dict[str, float]
    tags: dict[str, str]


def _client() -> Any:
    import mlflow

    from pipeline.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    def pin(name: str) -> str:
        return f"{name}=={version(name).split('+')[0]}"

    return [pin("torch"), pin("numpy"), pin("pandas"), pin("mlflow")]


def log_cvae_model(checkpoint_dir: str | os.PathLike[str], *, name: str = MODEL_ARTIFACT,
                   input_example_rows: int = 5) -> Any:
    """Log ``checkpoint_dir`` as a pyfunc model into the active MLflow run; returns ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    checkpoint = load_checkpoint(checkpoint_dir)
    d, k = checkpoint.model_config.dim_feature, checkpoint.model_config.dim_latent
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, d))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k))]),
    )
    example = np.tile(checkpoint.normalizer.mean, (input_example_rows, 1)).astype(np.float32)
    code_root = Path(__file__).resolve().parents[1]
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PYFUNC_SOURCE),
        artifacts={"checkpoint": str(checkpoint_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),  # given: inferring them costs seconds
        code_paths=[str(code_root / "cvae_model")],  # loads where cvae is not installed
    )


def register(model_uri: str, name: str, aliases: tuple[str, ...] | list[str] = (), *,
             metrics: dict[str, float] | None = None) -> Any:
    """Register ``model_uri`` under ``name``, set ``aliases``, tag it with ``metrics``."""
    import mlflow

    client = _client()
    version = mlflow.register_model(model_uri, name, await_registration_for=60)
    for key, value in sorted((metrics or {}).items()):
        client.set_model_version_tag(name, version.version, f"metric.{key}", f"{value:.6g}")
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def register_run_model(run_id: str, checkpoint_dir: str | os.PathLike[str], name: str, *,
                       aliases: tuple[str, ...] | list[str] = (),
                       metrics: dict[str, float] | None = None) -> str:
    """Log the checkpoint into run ``run_id`` as a pyfunc model and register it; the version."""
    import mlflow

    _client()
    with mlflow.start_run(run_id=run_id):
        info = log_cvae_model(checkpoint_dir)
    version = register(info.model_uri, name, aliases, metrics=metrics)
    logger.info("registered models:/%s/%s (aliases %s) from run %s", name, version.version,
                ", ".join(aliases) or "none", run_id)
    return str(version.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    client = _client()
    _check_model(client, name)
    _check_version(client, name, str(version))
    client.set_registered_model_alias(name, alias, str(version))


def _registered_names(client: Any) -> list[str]:
    return sorted(m.name for m in client.search_registered_models())


def _check_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        names = _registered_names(client)
        raise ModelNotFoundError(f"No registered model {name!r}; registered models: "
                                 f"{', '.join(names) or '(none)'}") from None


def _versions(client: Any, name: str) -> list[str]:
    return sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)


def _check_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise ModelNotFoundError(f"Model {name!r} has no version {version}; versions: "
                                 f"{', '.join(_versions(client, name)) or '(none)'}") from None


def _resolve_alias(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    model = _check_model(client, name)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        aliases = sorted(getattr(model, "aliases", {}) or {})
        raise ModelNotFoundError(f"Model {name!r} has no alias {alias!r}; aliases: "
                                 f"{', '.join(aliases) or '(none)'}") from None


def resolve_model_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version); raises naming
    what exists when the model, alias or version does not."""
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    client = _client()
    name = match["name"]
    if match["alias"]:
        return name, str(_resolve_alias(client, name, match["alias"]).version)
    _check_model(client, name)
    return name, str(_check_version(client, name, match["version"]).version)


def _find_checkpoint(root: Path, uri: str) -> Path:
    for config in sorted(root.rglob("config.json")):
        if all((config.parent / f).is_file() for f in CHECKPOINT_FILES):
            return config.parent
    raise ModelNotFoundError(f"{uri}: no cvae checkpoint among the downloaded artifacts (need "
                             f"{', '.join(sorted(CHECKPOINT_FILES))})")


def download_checkpoint(uri: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None) -> Path:
    """A local cvae checkpoint directory for a model reference (downloaded when remote)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    text = os.fspath(uri)
    local = Path(os.path.expanduser(text))
    if "://" not in text and ":/" not in text:
        if not local.exists():
            raise ModelNotFoundError(f"No model at {local.resolve()}")
        return _find_checkpoint(local, text)
    if text.startswith("models:/"):
        name, version = resolve_model_uri(text)
        source = f"models:/{name}/{version}"
    else:
        _client()
        source = text
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="cvae-model-"))
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target)))
    except (MlflowException, OSError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ModelNotFoundError(f"{text}: could not download the model's artifacts ({exc})") from None
    return _find_checkpoint(path, text)


def describe_version(name: str, version_or_alias: str) -> VersionInfo:
    """A version's aliases, source run and metrics (from its tags)."""
    client = _client()
    _check_model(client, name)
    if version_or_alias.isdigit():
        version = _check_version(client, name, version_or_alias)
    else:
        version = _resolve_alias(client, name, version_or_alias)
    tags = dict(version.tags or {})
    metrics = {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")}
    return VersionInfo(name, str(version.version), tuple(sorted(version.aliases or ())),
                       version.run_id, version.source, metrics, tags)


def list_models() -> list[dict[str, Any]]:
    """Every registered model with its versions and aliases."""
    client = _client()
    out = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        versions = _versions(client, model.name)
        out.append({"name": model.name, "versions": versions,
                    "aliases": dict(sorted((getattr(model, "aliases", {}) or {}).items()))})
    return out
