"""The MLflow model registry: log a checkpoint as a pyfunc model, register, alias, describe.

A registered cvae model is an MLflow pyfunc model (``pipeline/pyfunc_model.py``, logged as
"models from code") whose artifact ``checkpoint`` is a cvae checkpoint directory, so
``CompressionVAE.load`` and ``mlflow.pyfunc.load_model`` read the same files. Finding a model
again by reference is ``pipeline.model_uri.resolve_model``.

Example (inside an active run)::

    info = log_cvae_model(checkpoint)
    version = register(info.model_uri, "embedder", ["champion"], metrics={"val_loss": 0.42})
    CompressionVAE.load("models:/embedder@champion")

Every function uses ``pipeline.tracking.tracking_uri()``: the embedded SQLite store by default,
the server named by ``MLFLOW_TRACKING_URI`` otherwise.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvae_model.checkpoint import Checkpoint
from pipeline.model_uri import MODELS_URI, ModelNotFoundError
from pipeline.quality import KNN_METRIC, TRUST_METRIC

__all__ = [
    "METRIC_TAG_PREFIX",
    "ModelNotFoundError",
    "ModelSummary",
    "PromotionRefused",
    "PromotionResult",
    "QUALITY_FIGURES",
    "VersionInfo",
    "client_for",
    "describe_version",
    "list_models",
    "log_cvae_model",
    "promote",
    "publish",
    "register",
    "resolve_model_uri",
    "run_artifact_source",
    "set_alias",
]

logger = logging.getLogger("cvae.registry")

PYFUNC_SOURCE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT = "model"
CHECKPOINT_ARTIFACT = "checkpoint"
METRIC_TAG_PREFIX = "metric."
"""Version tags ``metric.<name>`` hold the validation metrics the version was registered with."""
REGISTRATION_TIMEOUT_S = 300
QUALITY_FIGURES = (KNN_METRIC, TRUST_METRIC)
"""What ``promote`` compares (``pipeline.quality``'s names; higher is better for both)."""


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version, as ``describe_version`` and ``list_models`` report it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    """The MLflow run that logged the model (MLflow links the version to it)."""
    source: str
    status: str
    metrics: dict[str, float]
    """Validation metrics from the version's ``metric.*`` tags."""
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class ModelSummary:
    """A registered model: its versions (oldest first, each with its aliases) and alias map."""

    name: str
    versions: tuple[VersionInfo, ...]
    aliases: dict[str, str]
    """alias -> version"""


# ------------------------------------------------------------------------------------- helpers
def client_for() -> Any:
    """An MLflow client of ``tracking_uri()`` (also made MLflow's current tracking URI, which
    ``mlflow.register_model`` and logging into an active run use)."""
    import mlflow

    from pipeline.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    def pin(name: str) -> str:  # torch reports "2.13.0+cpu"; pip wants the public version
        return f"{name}=={version(name).split('+')[0]}"

    # What the model file and cvae_model import at load time (cvae_model.estimator imports
    # matplotlib's Figure at module level).
    return [pin("torch"), pin("numpy"), pin("pandas"), pin("matplotlib"), pin("mlflow")]


def _version_info(version: Any, aliases: Iterable[str] = ()) -> VersionInfo:
    tags = dict(version.tags or {})
    metrics = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX):]] = float(value)
            except ValueError:
                logger.warning("tag %s=%r of %s/%s is not a number", key, value, version.name,
                               version.version)
    return VersionInfo(
        name=version.name, version=str(version.version),
        aliases=tuple(sorted(set(aliases) | set(getattr(version, "aliases", None) or ()))),
        run_id=version.run_id or None, source=str(version.source), status=str(version.status),
        metrics=metrics, tags=tags)


def _aliases_of(model: Any) -> dict[str, str]:
    """alias -> version of a RegisteredModel (MLflow gives versions as str or int)."""
    return {alias: str(v) for alias, v in sorted((getattr(model, "aliases", None) or {}).items())}


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


def _versions(client: Any, name: str) -> list[Any]:
    found = client.search_model_versions(f"name='{name}'")
    return sorted(found, key=lambda v: int(v.version))


def _check_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        if not version.isdigit():
            raise MlflowException(f"not a version number: {version!r}")
        return client.get_model_version(name, version)
    except MlflowException:
        existing = ", ".join(str(v.version) for v in _versions(client, name)) or "(none)"
        raise ModelNotFoundError(f"Model {name!r} has no version {version}; versions: "
                                 f"{existing}") from None


def _resolve_alias(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    model = _check_model(client, name)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        aliases = ", ".join(f"{a} (version {v})" for a, v in _aliases_of(model).items())
        raise ModelNotFoundError(f"Model {name!r} has no alias {alias!r}; aliases: "
                                 f"{aliases or '(none)'}") from None


def _get_version(client: Any, name: str, version_or_alias: str | int) -> Any:
    text = str(version_or_alias)
    if text.isdigit():
        _check_model(client, name)
        return _check_version(client, name, text)
    return _resolve_alias(client, name, text)


# --------------------------------------------------------------------------------- logging
def log_cvae_model(checkpoint: Checkpoint, *, name: str = MODEL_ARTIFACT,
                   input_example_rows: int = 5) -> Any:
    """Log ``checkpoint`` as a pyfunc model into the active MLflow run.

    The checkpoint's files become the model's artifact ``checkpoint``; the signature is a 2-D
    float32 tensor out plus the parameter ``output`` (``"embed"``, the default, maps
    (n, dim_feature) -> (n, dim_latent); ``"decode"`` maps (n, dim_latent) -> (n, dim_feature)).
    Widths are not fixed in the signature, so one model serves both directions; the model checks
    them itself and its metadata records them (``cvae.dim_feature``, ``cvae.dim_latent``).

    Returns MLflow's ``ModelInfo``: ``.model_uri`` (``models:/m-<id>``) is what ``register`` takes.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    if mlflow.active_run() is None:
        raise RuntimeError("log_cvae_model logs into the active MLflow run; call it inside "
                           "`with mlflow.start_run(...):` (or use publish)")
    cfg = checkpoint.model_config
    # No input schema on purpose: MLflow enforces one before the model sees the data, and none
    # fits both directions (a tensor (-1, d) rejects the latent rows of "decode", float64
    # arrays and DataFrames; (-1, -1) rejects every multi-column DataFrame). The model checks
    # width and dtype itself, with scikit-learn's message; metadata and the example give d.
    signature = ModelSignature(
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec("output", "string", "embed")]),
    )
    # Rows spread around the training mean, one scale either side: valid, realistic inputs.
    offsets = np.linspace(-1.0, 1.0, max(int(input_example_rows), 1), dtype=np.float32)[:, None]
    mean, scale = checkpoint.normalizer.mean, checkpoint.normalizer.scale
    example = (mean + offsets * scale).astype(np.float32)
    code_root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="cvae-log-") as tmp:
        folder = Path(tmp) / CHECKPOINT_ARTIFACT
        folder.mkdir()
        for file_name, data in checkpoint.to_files().items():
            (folder / file_name).write_bytes(data)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_SOURCE),
            artifacts={CHECKPOINT_ARTIFACT: str(folder)},
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),  # given: inferring them costs seconds
            code_paths=[str(code_root / "cvae_model")],  # loads where cvae is not installed
            metadata={"cvae": {"dim_feature": cfg.dim_feature, "dim_latent": cfg.dim_latent}},
        )


# -------------------------------------------------------------------------------- registry
def register(model_uri: str, name: str, aliases: Iterable[str] = (), *, run_id: str | None = None,
             metrics: Mapping[str, float] | None = None,
             timeout: float = REGISTRATION_TIMEOUT_S) -> Any:
    """Register ``model_uri`` as a new version of ``name``, wait until READY, tag, alias.

    The version is linked to the run that logged the model (MLflow's ``run_id``). Its tags
    ``metric.<name>`` hold ``metrics``; without ``metrics`` they are taken from the latest
    ``val_*`` metrics of ``run_id`` (default: the version's own run). Returns the ModelVersion
    as it is after the aliases were set.
    """
    import mlflow

    client = client_for()
    created = mlflow.register_model(model_uri, name, await_registration_for=int(timeout))
    version = str(created.version)
    source_run = run_id or created.run_id
    if run_id and created.run_id and run_id != created.run_id:
        logger.warning("models:/%s/%s was logged by run %s, not by run_id=%s", name, version,
                       created.run_id, run_id)
    if metrics is None and source_run:
        run_metrics = client.get_run(source_run).data.metrics
        metrics = {k: v for k, v in run_metrics.items() if k.startswith("val_")}
    for key, value in sorted((metrics or {}).items()):
        client.set_model_version_tag(name, version, f"{METRIC_TAG_PREFIX}{key}", repr(float(value)))
    if source_run:
        client.set_model_version_tag(name, version, "cvae.source_run_id", source_run)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    logger.info("registered models:/%s/%s from %s (aliases: %s)", name, version, model_uri,
                ", ".join(aliases) or "none")
    return client.get_model_version(name, version)


def publish(run_id: str, checkpoint: Checkpoint, name: str, *, aliases: Iterable[str] = (),
            metrics: Mapping[str, float] | None = None) -> str:
    """Log ``checkpoint`` into (finished or running) run ``run_id`` and register it; the version."""
    import mlflow

    client_for()
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        info = log_cvae_model(checkpoint)
    else:
        with mlflow.start_run(run_id=run_id):
            info = log_cvae_model(checkpoint)
    return str(register(info.model_uri, name, tuple(aliases), run_id=run_id,
                        metrics=metrics).version)


def set_alias(name: str, alias: str, version: str | int) -> VersionInfo:
    """Point ``models:/NAME@ALIAS`` at ``version`` (set, or move from another version)."""
    from mlflow.exceptions import MlflowException

    client = client_for()
    _check_model(client, name)
    _check_version(client, name, str(version))
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:  # reserved or malformed alias ("latest", "v3", ...)
        raise ValueError(f"Cannot set alias {alias!r} on {name!r}: {exc.message}") from None
    return describe_version(name, str(version))


def describe_version(name: str, version_or_alias: str | int) -> VersionInfo:
    """A version's aliases, source run, status and metrics; by number or by alias."""
    client = client_for()
    version = _get_version(client, name, version_or_alias)
    model = client.get_registered_model(name)
    aliases = [a for a, v in _aliases_of(model).items() if v == str(version.version)]
    return _version_info(version, aliases)


def list_models() -> list[ModelSummary]:
    """Every registered model with its versions (each with its aliases), sorted by name."""
    client = client_for()
    out = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        aliases = _aliases_of(model)
        versions = tuple(_version_info(v, [a for a, n in aliases.items() if n == str(v.version)])
                         for v in _versions(client, model.name))
        out.append(ModelSummary(model.name, versions, aliases))
    return out


def resolve_model_uri(uri: str, client: Any = None) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version); raises
    ModelNotFoundError naming what exists when the model, alias or version does not."""
    match = MODELS_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    client = client or client_for()
    name = match["name"]
    if match["alias"]:
        return name, str(_resolve_alias(client, name, match["alias"]).version)
    _check_model(client, name)
    return name, str(_check_version(client, name, match["version"]).version)


def run_artifact_source(client: Any, uri: str, run_id: str, path: str) -> str:
    """The artifact URI to download for ``runs:/RUN_ID/PATH``: the run's artifact folder, or the
    model that the run logged under the name PATH (MLflow 3 keeps those outside the run)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelNotFoundError(f"{uri}: no MLflow run {run_id!r} in {client.tracking_uri}") from None
    if not path or client.list_artifacts(run_id, path):
        return uri
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{path.strip('/')}'")
    if models:
        return f"models:/{models[0].model_id}"
    present = sorted({a.path for a in client.list_artifacts(run_id)})
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    present += [f"{m.name} (logged model)" for m in logged]
    raise ModelNotFoundError(f"{uri}: run {run_id} has no artifact or logged model {path!r}; "
                             f"it has: {', '.join(present) or '(nothing)'}")


# ------------------------------------------------------------------------------- promotion
class PromotionRefused(ValueError):
    """The candidate is worse than the alias's current version, or has no quality report."""


@dataclass(frozen=True)
class PromotionResult:
    """What ``promote`` did: the alias now points at ``candidate``."""

    name: str
    alias: str
    candidate: str
    previous: str | None
    """The version the alias pointed at before (None: the alias is new)."""
    figures: dict[str, tuple[float | None, float | None]]
    """figure -> (candidate's value, previous version's value)."""


def _compare(candidate: VersionInfo, current: VersionInfo,
             tolerance: float) -> tuple[dict[str, tuple[float | None, float | None]], list[str]]:
    """Each quality figure of both versions, and why the candidate is worse (empty: it is not)."""
    figures, worse = {}, []
    for figure in QUALITY_FIGURES:
        new, old = candidate.metrics.get(figure), current.metrics.get(figure)
        figures[figure] = (new, old)
        if old is None:
            continue  # the current version has no such figure: nothing to fall short of
        if new is None:
            worse.append(f"{figure}: version {candidate.version} has none, version "
                         f"{current.version} has {old:.4f}")
        elif new < old - tolerance:
            worse.append(f"{figure}: {new:.4f} < {old:.4f} (version {current.version})"
                         + (f" - tolerance {tolerance:g}" if tolerance else ""))
    return figures, worse


def promote(name: str, candidate: str | int, alias: str, *, tolerance: float = 0.0) -> PromotionResult:
    """Move ``models:/NAME@ALIAS`` to version ``candidate`` only if it is not worse.

    Not worse: for each figure of ``QUALITY_FIGURES`` that the alias's current version has, the
    candidate has it too and ``candidate >= current - tolerance``. An alias that does not exist
    yet is set (the candidate still needs a quality report). Raises ``PromotionRefused`` naming
    each figure that falls short; nothing is changed then.

    Our own rule rather than MLflow's ``validate_evaluation_results``/``MetricThreshold``: those
    take ``mlflow.evaluate`` results, and a ``MetricThreshold`` can demand a positive improvement
    but not "not worse" (``min_absolute_change`` must be > 0), which is the rule asked for here.
    """
    if not 0 <= tolerance < float("inf"):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    client = client_for()
    model = _check_model(client, name)
    new = _version_info(_check_version(client, name, str(candidate)))
    if not any(figure in new.metrics for figure in QUALITY_FIGURES):
        raise PromotionRefused(
            f"Version {new.version} of {name!r} has no quality report (tags metric."
            f"{', metric.'.join(QUALITY_FIGURES)}); register models trained by `cvae train`, or "
            f"pass metrics from pipeline.quality.quality_report to register()")
    aliases = _aliases_of(model)
    previous = aliases.get(alias)
    figures: dict[str, tuple[float | None, float | None]] = {
        figure: (new.metrics.get(figure), None) for figure in QUALITY_FIGURES}
    if previous is not None and previous != new.version:
        current = _version_info(_check_version(client, name, previous))
        figures, worse = _compare(new, current, tolerance)
        if worse:
            raise PromotionRefused(
                f"Not promoting version {new.version} of {name!r} to @{alias}: it is worse than "
                f"version {previous} on " + "; ".join(worse) + f". @{alias} stays on version "
                f"{previous}.")
    try:
        client.set_registered_model_alias(name, alias, new.version)
    except Exception as exc:  # MlflowException: a reserved or malformed alias ("latest", "v3")
        raise ValueError(f"Cannot set alias {alias!r} on {name!r}: {exc}") from None
    logger.info("models:/%s@%s -> version %s (was %s)", name, alias, new.version, previous)
    return PromotionResult(name, alias, new.version, previous, figures)

